"""What surgeon guarantees about files: outputs appear whole or not at all, inputs are never touched.

- `check_paths` is the one check every command runs before writing: no input (recipe, model
  dir, diff dir, data file, PEFT dir) may be, contain or lie inside an output or a directory the
  command may delete (symlinks resolved; for existing paths also by inode, so bind mounts count);
  an existing output is replaced only with `overwrite` (`--force`) and only when it is empty or a
  directory surgeon wrote that holds nothing else (`surgeon.fs_marker`).
- `atomic_dir` writes into a temp dir beside the output, fsyncs it and renames it into place in
  one step: RENAME_NOREPLACE for a new output (a second run racing for the same path fails
  instead of silently winning), RENAME_EXCHANGE to replace one (the output is never missing).
  Without renameat2 the replacement takes two renames, and a run killed between them leaves
  the previous output at a hidden `.OUT.old-*` name that the next run to OUT puts back.
- Temp dirs carry their owner process in their name (`surgeon.fs_owner`); the next run to the
  same output removes those whose owner is gone, never a live run's.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable

from . import fs_owner, fs_rename
from .errors import SurgeonError
from .fs_marker import replace_problem, write_marker

_TMP, _OLD = ".tmp-", ".old-"
_NAME_MAX = 255
_NAME_ROOM = 80  # bytes the temp name adds to the output's name: "." + ".tmp-" + owner + "-" + random


# ---- paths -------------------------------------------------------------------------------
def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _lies_in(path: str, directory: str) -> bool:
    """`path` is `directory` or lies under it: by resolved path, and for existing paths also by
    (device, inode) of each ancestor, which sees through bind mounts and case-folding."""
    path, directory = _real(path), _real(directory)
    if path == directory or path.startswith(directory.rstrip(os.sep) + os.sep):
        return True
    try:
        target = os.stat(directory)
    except OSError:
        return False
    probe = path
    while True:
        with contextlib.suppress(OSError):
            found = os.stat(probe)
            if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
                return True
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent


def relative_inside(directory: str, entry: str) -> str | None:
    """`entry` (a path relative to `directory`, or absolute) as a normalised path relative to
    `directory`, or None when it leaves it: an absolute path elsewhere, a `..` component, or a
    directory component that is a link out of it. The file itself may be a link (the Hugging
    Face cache stores every file of a snapshot as a link into its blobs/ folder)."""
    if not isinstance(entry, str) or not entry or "\0" in entry or entry.endswith(("/", os.sep)):
        return None
    if os.pardir in re.split(r"[/\\]", entry):
        return None
    root = _real(directory)
    path = os.path.normpath(entry if os.path.isabs(entry) else os.path.join(root, entry))
    parent = _real(os.path.dirname(path))
    if parent != root and not parent.startswith(root.rstrip(os.sep) + os.sep):
        return None
    return os.path.relpath(os.path.join(parent, os.path.basename(path)), root)


def output_path(directory: str, relative: str) -> str:
    """Where to write `relative` (a name taken from an input, e.g. a shard file) inside the
    output being built in `directory`; its parent folders are created. Anything that could land
    outside `directory` is refused, whatever checked the name before."""
    if relative_inside(directory, relative) is None or os.path.isabs(relative):
        raise SurgeonError(f"refusing to write {relative!r}: it names a path outside the output {directory}")
    path = os.path.join(directory, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


# ---- the one check -------------------------------------------------------------------------
def check_paths(
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    outputs: Iterable[str | os.PathLike] = (),
    deletes: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
) -> None:
    """Refuse (SurgeonError, one line) whatever could destroy an input or a directory surgeon did
    not write. `inputs`: every file and directory the command reads. `outputs`: directories it
    writes (replaced only with `overwrite`). `deletes`: directories it may delete (e.g. a training
    run's checkpoint folder): each must be empty, absent, or surgeon's. Before checking, what killed
    runs left beside each output is recovered (`recover`), so a previous output comes back first."""
    inputs = [os.fspath(p) for p in inputs if p]
    outputs = [os.fspath(p) for p in outputs]
    deletes = [os.fspath(p) for p in deletes]
    for out in outputs:
        recover(out)
    try:
        cwd = os.getcwd()
    except OSError:  # the current directory was deleted: no output can contain it
        cwd = None
    targets = [f"output {out}" for out in outputs] + [f"{d} (deleted by this run)" for d in deletes]
    for target, label in zip(outputs + deletes, targets):
        for source in inputs:
            if _lies_in(target, source):
                raise SurgeonError(f"{label} is the same as or inside the input {source}; choose an output outside it")
            if _lies_in(source, target):
                raise SurgeonError(f"{label} contains the input {source}, which would be destroyed; choose another output")
        if cwd is not None and _lies_in(cwd, target):
            raise SurgeonError(f"{label} is the current directory or contains it; name a new directory")
        if os.path.islink(target):
            raise SurgeonError(f"{label} is a symbolic link; name the directory itself")
        if os.path.lexists(target) and not os.path.isdir(target):
            raise SurgeonError(f"{label} exists and is not a directory")
    for out in outputs:
        problem = replace_problem(out) if os.path.isdir(out) else None
        if problem:
            raise SurgeonError(f"output {problem}")
        if os.path.isdir(out) and os.listdir(out) and not overwrite:
            raise SurgeonError(f"output {out} already exists and is not empty (use --force to replace it)")
    for directory in deletes:
        problem = replace_problem(directory) if os.path.isdir(directory) else None
        if problem:
            raise SurgeonError(f"this run would delete {problem}")


def check_output(out_dir: str, inputs: Iterable[str | None], *, overwrite: bool = False) -> None:
    """`check_paths` for one output (the form most commands need)."""
    check_paths(inputs=inputs, outputs=[out_dir], overwrite=overwrite)


# ---- crash-safe writing --------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str) -> None:
    """fsync every file and the dir; give them normal permissions (mkdtemp makes 0700)."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, 0o666 & ~mask)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(root)


def _sibling(out: str, kind: str) -> str:
    """A fresh name beside `out` owned by this process: `.OUT.tmp-<owner>-<random>`."""
    parent, name = os.path.split(out)
    return os.path.join(parent, f".{name}{kind}{fs_owner.token()}-{secrets.token_hex(4)}")


def _discard(path: str, out: str) -> None:
    """Delete a leftover directory beside `out`: first rename it to a name this process owns (only
    one of several runs cleaning up at once wins the rename), so no one deletes what another moved."""
    mine = _sibling(out, _TMP)
    try:
        os.rename(path, mine)
    except OSError:
        return  # gone already, or claimed by another run
    shutil.rmtree(mine, ignore_errors=True)


def _mtime(path: str) -> float:
    try:
        return os.lstat(path).st_mtime
    except OSError:
        return 0.0


def recover(out_dir: str) -> None:
    """Clean up after killed runs that were writing `out_dir`: remove their temp dirs, and if one
    died between the two renames of a fallback replacement (OUT missing, its previous content at
    `.OUT.old-*`), put the previous output back. Directories of live runs are left alone."""
    out = os.path.abspath(out_dir)
    parent, name = os.path.split(out)
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    pattern = re.compile(re.escape(f".{name}") + rf"\.(tmp|old)-({fs_owner.TOKEN_PATTERN})-[0-9a-z_]+")
    stale, previous = [], []
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match and fs_owner.is_gone(match.group(2)):
            (previous if match.group(1) == "old" else stale).append(os.path.join(parent, entry))
    previous.sort(key=_mtime, reverse=True)
    for path in previous:
        if not os.path.lexists(out):
            try:
                fs_rename.rename_noreplace(path, out)
                _fsync_dir(parent)
                continue
            except OSError:
                pass
        stale.append(path)
    for path in stale:
        _discard(path, out)


def _commit(tmp: str, out: str, overwrite: bool) -> None:
    """Move the finished `tmp` to `out` in one step; fail if `out` appeared and may not be replaced."""
    parent = os.path.dirname(out)
    for _ in range(3):
        if not os.path.lexists(out):
            try:
                fs_rename.rename_noreplace(tmp, out)
            except FileExistsError:
                continue  # created meanwhile: look at it again
            _fsync_dir(parent)
            return
        if os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out):
            with contextlib.suppress(OSError):
                os.rmdir(out)  # an empty directory is replaced without --force; fails if filled meanwhile
            continue
        if not overwrite:
            raise SurgeonError(
                f"output {out} appeared while this run was writing it (another run?); it was left as it "
                "is and nothing was written"
            )
        _replace(tmp, out)
        return
    raise SurgeonError(f"output {out} kept changing while this run tried to write it; nothing was written")


def _replace(tmp: str, out: str) -> None:
    parent = os.path.dirname(out)
    if fs_rename.exchange(tmp, out):
        _fsync_dir(parent)
        problem = replace_problem(tmp, shown=out)  # the previous output, now at tmp: changed since the check?
        if problem:
            fs_rename.exchange(tmp, out)
            _fsync_dir(parent)
            raise SurgeonError(f"output {problem}")
        shutil.rmtree(tmp, ignore_errors=True)  # what is left, the next run removes
        return
    # Two renames; a crash between them leaves OUT missing and its previous content at `old`,
    # which `recover` (run by the next command writing OUT) puts back.
    problem = replace_problem(out)
    if problem:
        raise SurgeonError(f"output {problem}")
    old = _sibling(out, _OLD)
    os.rename(out, old)
    _fsync_dir(parent)
    try:
        fs_rename.rename_noreplace(tmp, out)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            fs_rename.rename_noreplace(old, out)
        if isinstance(exc, FileExistsError):
            raise SurgeonError(f"output {out} was written by another run meanwhile; nothing was written") from None
        raise
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(
    out_dir: str,
    inputs: Iterable[str | None] = (),
    *,
    overwrite: bool = False,
    kind: str | None = None,
    deletes: Iterable[str] = (),
):
    """Yield a temp dir; on success it becomes `out_dir` in one step, on any error it disappears.

    `kind`: mark the output as surgeon's (`.surgeon-output.json` listing its files) so a later
    `--force` may replace it; a diff needs none (its manifest marks it). `inputs`, `overwrite`,
    `deletes`: as for `check_paths`, which runs first.
    """
    out = os.path.abspath(out_dir)
    check_paths(inputs=inputs, outputs=[out], deletes=deletes, overwrite=overwrite)
    parent, name = os.path.split(out)
    if len(os.fsencode(name)) > _NAME_MAX - _NAME_ROOM:
        raise SurgeonError(f"output {out}: the name is too long (at most {_NAME_MAX - _NAME_ROOM} bytes)")
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}{_TMP}{fs_owner.token()}-", dir=parent)
    try:
        yield tmp
        if kind is not None:
            write_marker(tmp, kind)
        fsync_tree(tmp)
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our new content, or the output it replaced
        raise


def remove_output(path: str) -> None:
    """Delete a directory surgeon wrote (e.g. a finished run's checkpoint folder); refuse anything
    else. Renamed to a temp name first, so a crash mid-delete leaves nothing at `path`."""
    if not os.path.lexists(path):
        return
    problem = replace_problem(path)
    if problem:
        raise SurgeonError(f"refusing to delete {problem}")
    _discard(path, os.path.abspath(path))


def atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
