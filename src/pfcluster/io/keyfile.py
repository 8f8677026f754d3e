"""Reading a `--sync-key` file: a regular file only its owner can read (mode 0600 or
0400), else the daemon refuses to start. A key others can read is a key others have.
The file's format is pfsync.auth.parse_keys'."""

from __future__ import annotations

import os
import stat

from pfcluster.pfsync.auth import KeyError_, KeyRing, parse_keys

MAX_FILE = 4096


def load_key_file(path: str) -> KeyRing:
    """The keys in ``path``; KeyError_ (one line, never the key) when it cannot be used."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise KeyError_(f"sync key {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyError_(f"sync key {path}: not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise KeyError_(f"sync key {path}: mode {mode:04o} lets group or others read "
                            f"it; it must be 0600 (chmod 600 {path})")
        data = os.read(fd, MAX_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FILE:
        raise KeyError_(f"sync key {path}: larger than {MAX_FILE} bytes")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyError_(f"sync key {path}: not ASCII text") from None
    return parse_keys(text, f"sync key {path}")


__all__ = ["load_key_file"]
