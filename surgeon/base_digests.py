"""The content digests of a base checkpoint, cached so that loading a diff again is fast.

`base_digests(info)` gives tensor name -> sha256 for a safetensors checkpoint (file -> sha256
for a pickle one), read from the files (`surgeon.digest`). Each file's digests are cached in
one small JSON file, `$SURGEON_CACHE/base-digests.json` (default `~/.cache/surgeon`), under the
file's resolved path with its stamp: size, mtime_ns, ctime_ns, inode and device. An entry is
used only while the stamp is unchanged; ctime is set by the kernel on every write and cannot be
set back by a user (unlike mtime), so rewriting a file in place invalidates its entry too. What
the cache cannot see is a change that bypasses the filesystem (a disk flipping a bit): delete
the cache file (or point `SURGEON_CACHE` at an empty directory) to hash everything afresh.

The cache is advisory: a missing, unreadable or corrupt cache is rebuilt (a corrupt one with a
warning), an unwritable one is skipped, and it is written atomically, so two runs at once at
worst lose each other's new entries.
"""

from __future__ import annotations

import json
import os
import time
import warnings

from .checkpoint import CheckpointInfo
from .digest import ALGORITHM, Span, digest_spans, file_span
from .errors import CheckpointError
from .fsutil import atomic_write_text
from .safetensors_header import read_layout

CACHE_ENV = "SURGEON_CACHE"
CACHE_FILE = "base-digests.json"
CACHE_VERSION = 1
MAX_FILES = 4096  # entries kept, the newest (an entry takes ~100 bytes per tensor)


def cache_dir() -> str:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return configured
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "surgeon")


def stamp(path: str) -> list[int]:
    """What identifies one version of a file's content without reading it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class DigestCache:
    """The cache file's entries: resolved path -> {"stamp", "digests", "added"}. Only a run that
    hashed something writes the file (a cache hit writes nothing); entries of files that no longer
    exist are dropped then, and beyond MAX_FILES the oldest."""

    def __init__(self, directory: str | None = None):
        self.path = os.path.join(directory or cache_dir(), CACHE_FILE)
        self.entries = self._read()
        self.changed = False

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except OSError:
            return {}  # none yet, or a cache directory this user cannot read: start empty
        except ValueError as exc:
            warnings.warn(f"digest cache {self.path} is corrupt ({exc}); it will be rebuilt", stacklevel=3)
            return {}
        valid = (
            isinstance(data, dict)
            and data.get("version") == CACHE_VERSION
            and data.get("algorithm") == ALGORITHM
            and isinstance(data.get("files"), dict)
        )
        if not valid:
            warnings.warn(
                f"digest cache {self.path} is not one this surgeon wrote; it will be rebuilt", stacklevel=3
            )
            return {}
        return data["files"]

    def get(self, real: str, file_stamp: list[int]) -> dict[str, str] | None:
        entry = self.entries.get(real)
        if not isinstance(entry, dict) or entry.get("stamp") != file_stamp:
            return None
        digests = entry.get("digests")
        if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
            return None
        return digests

    def put(self, real: str, file_stamp: list[int], digests: dict[str, str]) -> None:
        self.entries[real] = {"stamp": file_stamp, "digests": digests, "added": time.time()}
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return

        def added(item) -> float:
            value = item[1].get("added") if isinstance(item[1], dict) else None
            return value if isinstance(value, (int, float)) else 0.0

        live = {path: entry for path, entry in self.entries.items() if os.path.exists(path)}
        kept = dict(sorted(live.items(), key=added, reverse=True)[:MAX_FILES])
        text = json.dumps(
            {"version": CACHE_VERSION, "algorithm": ALGORITHM, "files": kept}, separators=(",", ":")
        )
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            atomic_write_text(self.path, text)
        except OSError:
            pass  # a read-only home: the digests were computed, only the next run pays again
        self.changed = False


def base_digests(info: CheckpointInfo, *, cache: DigestCache | None = None) -> dict[str, str]:
    """Tensor name -> sha256 of every tensor in a safetensors checkpoint, or weight file ->
    sha256 for a pickle one; from the cache where a file is unchanged since it was hashed."""
    cache = cache or DigestCache()
    per_file = info.format == "pickle"
    out: dict[str, str] = {}
    pending: dict[str, tuple[str, list[int]]] = {}  # file -> (resolved path, stamp before reading)
    spans: list[Span] = []
    for file in info.files:
        path = os.path.join(info.directory, file)
        real = os.path.realpath(path)
        before = stamp(real)
        cached = cache.get(real, before)
        if cached is not None and (not per_file or "" in cached):
            out.update({file: cached[""]} if per_file else cached)
            continue
        pending[file] = (real, before)
        if per_file:
            spans.append(file_span(real, key=(file, "")))
        else:
            layout = read_layout(real)
            spans += [Span((file, name), real, begin, end) for name, (begin, end) in layout.spans.items()]
    if spans:
        digests = digest_spans(spans, desc=f"hashing {os.path.basename(os.path.abspath(info.directory))}")
        by_file: dict[str, dict[str, str]] = {file: {} for file in pending}
        for (file, name), digest in digests.items():
            by_file[file][name] = digest
        for file, (real, before) in pending.items():
            if stamp(real) != before:
                raise CheckpointError(
                    f"{os.path.join(info.directory, file)} changed while it was being read; run again"
                )
            cache.put(real, before, by_file[file])
            out.update({file: by_file[file][""]} if per_file else by_file[file])
        cache.save()
    return out
