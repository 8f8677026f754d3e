"""Tag names and their numbers (pf's tagname2tag): one registry for the process.

pf keeps a tag on a packet and on a state as a 16-bit number, 1..65535, so a state can
carry it without growing; names are numbered on first use and never renumbered, so a
state tagged before a ruleset reload still means the same name after it.
"""

from __future__ import annotations

TAG_MAX = 0xFFFF
TAG_NAME_MAX = 63  # PF_TAG_NAME_SIZE - 1

_ids: dict[str, int] = {}
_names: list[str] = [""]


class TagError(ValueError):
    """A bad tag name, or the 65535 tag numbers are all taken."""


def tag_id(name: str) -> int:
    """The number of `name`, giving it the next free one on first use."""
    n = _ids.get(name)
    if n is not None:
        return n
    if not name or len(name) > TAG_NAME_MAX:
        raise TagError(f"invalid tag name '{name}'")
    if len(_names) > TAG_MAX:
        raise TagError("too many tags")
    n = len(_names)
    _ids[name] = n
    _names.append(name)
    return n


def tag_name(n: int) -> str:
    """The name of tag number `n` ('' for 0 or an unknown number)."""
    return _names[n] if 0 < n < len(_names) else ""


__all__ = ["TAG_MAX", "TagError", "tag_id", "tag_name"]
