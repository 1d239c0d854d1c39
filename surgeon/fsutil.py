"""Crash-safe output: write into a temp dir beside the target, fsync, then rename.

Never writes over an input: an output equal to or inside an input directory is refused, and an
existing output directory is only replaced when the caller asks (`overwrite=True`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from .errors import SurgeonError


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)


def check_output(out_dir: str, inputs: list[str], *, overwrite: bool = False) -> None:
    for directory in inputs:
        if directory and _inside(out_dir, directory):
            raise SurgeonError(
                f"output {out_dir} is the same as or inside the input {directory}; "
                "choose an output outside it"
            )
        if directory and _inside(directory, out_dir):
            raise SurgeonError(f"output {out_dir} contains the input {directory}; choose another output")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SurgeonError(f"output {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise SurgeonError(f"output {out_dir} already exists and is not empty (use --force to replace it)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(out_dir: str, inputs: list[str], *, overwrite: bool = False):
    """Yield a temp dir; on success it becomes `out_dir`, on any error it disappears."""
    check_output(out_dir, inputs, overwrite=overwrite)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        fsync_tree(tmp)
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "d"))
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
