"""A State keeps its small unsigned fields unboxed in its own buffer (issue 11, section 3):
what that saves, and that the views over it behave as the old attributes did."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from pfcluster.pf.constants import PF_IN, PF_OUT
from pfcluster.pf.state import (
    ACK_DST,
    ACK_SRC,
    CREATORID,
    DIRECTION,
    DST,
    LINKED,
    MAX_WIN,
    PEER_FIELDS,
    PEER_LEN,
    PSTATE,
    SEQHI,
    SEQLO,
    SRC,
    State,
    StateTable,
)

KEY = (2, 6, bytes((198, 51, 100, 2)), bytes((203, 0, 113, 10)), 40000, 5201)


def _states(n: int) -> list[State]:
    """n states sharing one key and id (no table holds them): only the states count."""
    return [State(KEY, PF_IN, 0xC0FFEE01, 1000, 1.0) for _ in range(n)]


def _traced(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        fn()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_a_state_is_two_allocations_of_288_bytes_at_most() -> None:
    keep: list[State] = []
    n = 2000
    used = _traced(lambda: keep.extend(_states(n)))
    per_state = (used - 8 * n) / n  # less the list holding them
    # 208 + 80, and a little for whatever else runs (hypothesis, the list's growth);
    # a State with two Peer objects took 392
    assert per_state < 296, per_state


def test_sequence_numbers_do_not_allocate() -> None:
    sts = _states(2000)

    def fill() -> None:
        for i, st in enumerate(sts):
            for base in (SRC, DST):
                st[base + SEQLO] = 0xF0000000 + i
                st[base + SEQHI] = 0xF1000000 + i
                st[base + MAX_WIN] = 65535
            st.src.seqdiff = 0x7FFFFFFF
            st.acks = [0xFFFFFFFF, 1]

    assert _traced(fill) < 1000  # the boxed version of this took ~200 bytes a state


def test_peer_views_read_and_write_the_buffer() -> None:
    (st,) = _states(1)
    st.src.seqlo = 1000
    st.dst.state = 4
    st.dst.wscale = 0x87
    assert st[SRC + SEQLO] == 1000 and st[DST + PSTATE] == 4
    assert st.dst.as_tuple() == (0, 0, 0, 0, 0, 4, 0x87)
    assert len(PEER_FIELDS) == PEER_LEN == 7
    st.src.copy_from(st.dst)
    assert st.src.as_tuple() == st.dst.as_tuple()
    assert "wscale=135" in repr(st.src)


def test_named_items_and_acks() -> None:
    st = State(KEY, PF_OUT, 0xDEADBEEF, 7, 1.0)
    assert (st.direction, st.creatorid, st.log, st.linked) == (PF_OUT, 0xDEADBEEF, 0, 0)
    assert st[DIRECTION] == PF_OUT and st[CREATORID] == 0xDEADBEEF
    assert st.acks is None
    st.acks = [5, 0]
    assert st.acks == [5, 0] and st[ACK_SRC] == 5 and st[ACK_DST] == 0
    st.acks = None
    assert st.acks is None
    t = StateTable()
    assert t.insert(st) and st.linked and st[LINKED] == 1
    assert t.by_id(0xDEADBEEF, 7) is st
    assert t.remove(st) and not st.linked


def test_states_compare_and_hash_by_identity() -> None:
    a, b = State(KEY, PF_IN, 1, 1, 1.0), State(KEY, PF_IN, 1, 1, 1.0)
    assert list(a) == list(b)  # same buffer contents...
    assert a != b and (a == b) is False and a == a  # ...yet two states
    d = {a: 1, b: 2}
    assert d[a] == 1 and d[b] == 2 and hash(a) != hash(b)


def test_a_field_outside_32_bits_is_refused() -> None:
    (st,) = _states(1)
    with pytest.raises(OverflowError):
        st.src.seqlo = 1 << 32
    with pytest.raises(OverflowError):
        st[DST + SEQHI] = -1
