"""Content digests read from the files themselves: one sha256 per tensor of a safetensors file
(its raw bytes as stored, so dtype and byte order are the file's, not a loaded copy's), or one
per whole file (pickle checkpoints, which have no tensor layout to read).

sha256 rather than blake2b: hashlib's sha256 is OpenSSL's, which uses the SHA extensions of
current x86 and ARM CPUs; on this project's reference machine it hashes ~2.3x faster than
blake2b (benchmarks/base_digest.py measures both). Tensors are hashed on a few threads at once
(hashlib releases the GIL while it hashes), each reading its tensor's span with `pread` into a
reused buffer, so memory stays at one buffer per thread whatever the checkpoint's size.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .errors import CheckpointError

ALGORITHM = "sha256"
CHUNK_BYTES = 8 * 2**20
PROGRESS_FROM_BYTES = 256 * 2**20  # smaller jobs finish before a bar would be worth drawing


@dataclass(frozen=True)
class Span:
    """Bytes [begin, end) of `path`, to be hashed under `key`."""

    key: object
    path: str
    begin: int
    end: int


def workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def digest_spans(
    spans: list[Span], *, desc: str = "hashing", algorithm: str = ALGORITHM, threads: int | None = None
) -> dict[object, str]:
    """key -> hex digest of each span's bytes, `threads` spans at once (default `workers()`); a
    progress bar on a terminal when there is much to read. `algorithm`: a hashlib name (the
    benchmark compares others; surgeon records ALGORITHM)."""
    from tqdm.auto import tqdm

    total = sum(s.end - s.begin for s in spans)
    local = threading.local()
    handles: dict[str, int] = {}
    try:
        for path in {s.path for s in spans}:
            try:
                handles[path] = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None if total >= PROGRESS_FROM_BYTES else True,
                  leave=False) as bar:  # fmt: skip

            def one(span: Span) -> tuple[object, str]:
                if not hasattr(local, "buffer"):
                    local.buffer = memoryview(bytearray(CHUNK_BYTES))
                sha = hashlib.new(algorithm)
                position = span.begin
                while position < span.end:
                    want = local.buffer[: min(CHUNK_BYTES, span.end - position)]
                    got = os.preadv(handles[span.path], [want], position)
                    if got <= 0:
                        raise CheckpointError(
                            f"{span.path}: truncated (ends at byte {position}, expected {span.end})"
                        )
                    sha.update(want[:got])
                    position += got
                    bar.update(got)
                return span.key, sha.hexdigest()

            largest_first = sorted(spans, key=lambda s: s.begin - s.end)  # the longest job starts first
            with ThreadPoolExecutor(max_workers=min(threads or workers(), max(1, len(spans)))) as pool:
                return dict(pool.map(one, largest_first))
    finally:
        for handle in handles.values():
            os.close(handle)


def file_span(path: str, key: object = None) -> Span:
    """The whole of `path` as one span."""
    try:
        return Span(key if key is not None else path, path, 0, os.stat(path).st_size)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
