"""Directory renames that are one step: Linux `renameat2(2)` through ctypes.

`RENAME_EXCHANGE` swaps two paths atomically, so an output being replaced is never missing;
`RENAME_NOREPLACE` fails when the target exists, so two runs racing to create the same output
cannot both win. Where the call is missing (non-Linux, glibc < 2.28) or the filesystem refuses
the flag (EINVAL, e.g. some network filesystems), `exchange` returns False and the caller falls
back to two renames plus recovery (`surgeon.fsutil`); `rename_noreplace` falls back to a plain
rename, which POSIX already refuses onto a non-empty directory.
"""

from __future__ import annotations

import ctypes
import errno
import os

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
# the kernel or filesystem lacks renameat2 or this flag (EINVAL is also "source is an ancestor of
# the target", which our callers never do: both paths are siblings in one directory)
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}

enabled = True  # False: behave as on a system without renameat2 (the tests force the fallback)


def _load():
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load()


def _call(src: str, dst: str, flags: int) -> bool:
    """True when done, False when unsupported here; any other failure raises OSError."""
    if _renameat2 is None or not enabled:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), src, None, dst)


def exchange(a: str, b: str) -> bool:
    """Swap the two existing paths `a` and `b` in one step; False where that is not possible."""
    return _call(a, b, _RENAME_EXCHANGE)


def rename_noreplace(src: str, dst: str) -> None:
    """Rename `src` to `dst`, raising FileExistsError when `dst` exists (or appears meanwhile)."""
    try:
        if _call(src, dst, _RENAME_NOREPLACE):
            return
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        os.rename(src, dst)  # a non-empty directory appearing meanwhile still fails (ENOTEMPTY)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
        raise
