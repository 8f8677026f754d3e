"""Generated pfsync code can be debugged: every function generated from the layouts has
a file name of its own in linecache and a per-dialect name, so a traceback from inside
one shows which dialect's function ran and the generated source line (issue 10)."""

from __future__ import annotations

import linecache
import traceback
from typing import Any

import pytest

from pfcluster.pf.constants import PFTM_MAX
from pfcluster.pfsync import convert, layout, wire

DIALECTS = layout.DIALECTS


def _state_tuple(dialect: str, **fields: Any) -> list[Any]:
    """A sound pfsync_state record of ``dialect`` as the unpacked tuple the engine gets."""
    codec = wire.TABLES[dialect][wire.ACTIONS[dialect]["INS"]][2]
    assert codec is not None
    rec = wire.State(id=7, creatorid=0x1234, af=layout.AF_INET_WIRE, proto=6, **fields)
    return list(codec.to_tuple(rec))


def _traceback_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


@pytest.mark.parametrize("dialect", DIALECTS)
def test_importer_traceback_shows_generated_line_and_dialect(dialect: str) -> None:
    t = _state_tuple(dialect, expire=30)
    timeouts = [10] * PFTM_MAX
    importer = convert.state_importer(dialect)
    st, rule, ack = importer(tuple(t), 1000.0, timeouts)  # the sound record imports
    assert st.creatorid == 0x1234 and rule == -1 and not ack
    # a seconds-left value that is not a number fails on the generated line that
    # rebuilds the expiry from it
    t[layout.STATE_LAYOUTS[dialect].index["expire"]] = "soon"
    with pytest.raises(TypeError) as info:
        importer(tuple(t), 1000.0, timeouts)
    text = _traceback_text(info.value)
    filename = f"<pfsync-generated importer {dialect}>"
    assert f'File "{filename}", line ' in text
    assert f"in import_state_{dialect}" in text
    assert "st.expire = now - max(0, timeouts[tm] - rem) if rem else now" in text
    assert 'File "<string>"' not in text
    # the line number in the traceback is the line of that statement in the source
    last = traceback.extract_tb(info.value.__traceback__)[-1]
    assert (last.filename, last.name) == (filename, f"import_state_{dialect}")
    assert "timeouts[tm] - rem" in linecache.getline(filename, last.lineno or 0)


def test_generated_names_differ_between_dialects() -> None:
    importers = [convert.state_importer(d) for d in DIALECTS]
    names = {f.__name__ for f in importers}
    qualnames = {f.__qualname__ for f in importers}
    files = {f.__code__.co_filename for f in importers}
    assert names == {f"import_state_{d}" for d in DIALECTS}
    assert qualnames == names
    assert files == {f"<pfsync-generated importer {d}>" for d in DIALECTS}


def test_every_generated_function_has_its_source_in_linecache() -> None:
    """State codecs, packers and State.__init__ too: each file name is distinct and its
    first line is the def of the function carrying the dialect's name."""
    from pfcluster.pf.state import State

    for d in DIALECTS:
        codec = wire.TABLES[d][wire.ACTIONS[d]["INS"]][2]
        assert codec is not None
        assert codec.from_tuple.__name__ == f"state_from_tuple_{d}"
        assert codec.to_tuple.__name__ == f"state_to_tuple_{d}"
        # make sure the packer is generated
        st = State((2, 6, bytes(4), bytes(4), 1, 2), 1, 1, 1, 0.0, None, "em0")
        convert.pack_state(st, 0.0, d, [10] * PFTM_MAX, 1)
    assert wire.State.__init__.__qualname__ == "State.__init__"
    files = list(layout.GENERATED_SOURCES)
    assert len(files) == len(set(files))
    for d in DIALECTS:
        for what, fn in (("state codec", "state_from_tuple"), ("importer", "import_state"),
                         ("packer", "pack_state")):
            name = f"<pfsync-generated {what} {d}>"
            assert name in layout.GENERATED_SOURCES
            assert linecache.getline(name, 1).startswith(f"def {fn}_{d}(")


def test_state_codec_traceback_names_the_layout() -> None:
    """A raw tuple too short for the layout fails inside that layout's decoder."""
    codec = wire.TABLES["openbsd6"][wire.ACTIONS["openbsd6"]["INS"]][2]
    assert codec is not None
    with pytest.raises(IndexError) as info:
        codec.from_tuple(())
    text = _traceback_text(info.value)
    assert 'File "<pfsync-generated state codec openbsd6>"' in text
    assert "in state_from_tuple_openbsd6" in text
    assert "st.id = t[0]" in text
