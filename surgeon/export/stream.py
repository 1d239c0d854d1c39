"""Streamed safetensors I/O: one tensor, or one block of its rows, at a time.

The python safetensors API reads through mmap (pages already passed still count towards RSS)
and can only write a whole dict of tensors at once (per-shard memory = the shard), so exports
read and write the format directly: an 8-byte little-endian header length, a JSON header of
name → dtype/shape/byte offsets, then the raw bytes. `ShardReader` reads byte ranges with plain
reads; `ShardWriter` computes the header from the planned shapes first and appends each
tensor's bytes as they are produced.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch

from ..errors import CheckpointError

# safetensors dtype tags <-> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
TAGS = {dtype: tag for tag, dtype in DTYPES.items()}
_FINITE_CHUNK = 1 << 22  # elements per isfinite() pass: a bool mask of 4 MB, not of the tensor


class ShardReader:
    """Reads one tensor at a time from a safetensors file with plain reads (no mmap)."""

    def __init__(self, path: str):
        self.path = path
        self.handle = open(path, "rb")
        try:
            (length,) = struct.unpack("<Q", self.handle.read(8))
            header = json.loads(self.handle.read(length))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.handle.close()
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self.data_start = 8 + length

    def dtype(self, name: str) -> torch.dtype:
        tag = self.entries[name]["dtype"]
        if tag not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has dtype {tag}, which export does not handle")
        return DTYPES[tag]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str) -> torch.Tensor:
        return self.read_rows(name, 0, self.shape(name)[0] if self.shape(name) else 1)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (a 0-d tensor has one row): one contiguous byte range."""
        entry = self.entries[name]
        shape = self.shape(name)
        tensor = torch.empty((stop - start, *shape[1:]) if shape else (), dtype=self.dtype(name))
        begin, end = entry["data_offsets"]
        row = tensor.element_size() * numel(shape[1:])
        if end - begin != row * (shape[0] if shape else 1):
            raise CheckpointError(
                f"{self.path}: tensor {name} has {end - begin} bytes, its shape needs more or fewer"
            )
        raw = bytes_of(tensor)
        self.handle.seek(self.data_start + begin + start * row)
        view, done = memoryview(raw), 0
        while done < len(raw):
            got = self.handle.readinto(view[done:])
            if not got:
                raise CheckpointError(f"{self.path}: truncated while reading tensor {name}")
            done += got
        return tensor

    def close(self) -> None:
        self.handle.close()


class ReaderPool:
    """One open ShardReader per file, closed together (`with ReaderPool() as readers:`)."""

    def __init__(self):
        self.readers: dict[str, ShardReader] = {}

    def get(self, path: str) -> ShardReader:
        if path not in self.readers:
            self.readers[path] = ShardReader(path)
        return self.readers[path]

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bytes_of(tensor: torch.Tensor):
    """The tensor's storage as a writable uint8 numpy array (no copy; little-endian hosts)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


class ShardWriter:
    """Writes a safetensors file tensor by tensor: the header is computed from the planned
    (name, dtype, shape) list first, then each tensor's bytes are appended in that order.
    `sha256` is the digest of every byte written, header included (the file's fingerprint)."""

    def __init__(self, path: str, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict):
        self.path = path
        self.plan = plan
        header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
        offset = 0
        self.sizes = []
        for name, dtype, shape in plan:
            size = numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": TAGS[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self.sizes.append(size)
            offset += size
        self.total = offset
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.handle = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self._write(struct.pack("<Q", len(text)) + text)
        self.next = 0

    def _write(self, data) -> None:
        self.handle.write(data)
        self.sha256.update(data)

    def begin(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        expected, want_dtype, want_shape = self.plan[self.next]
        if name != expected or dtype != want_dtype or tuple(shape) != tuple(want_shape):
            raise RuntimeError(
                f"export bug: writing {name} {dtype} {tuple(shape)} where the header "
                f"promised {expected} {want_dtype} {tuple(want_shape)}"
            )
        self.pending = self.sizes[self.next]

    def append(self, block: torch.Tensor) -> None:
        """Append the next rows of the tensor begun last (any number of rows per call)."""
        raw = bytes_of(block.contiguous())
        if len(raw) > self.pending:
            raise RuntimeError(f"export bug: {self.plan[self.next][0]} got more bytes than its header says")
        self._write(memoryview(raw))
        self.pending -= len(raw)

    def end(self) -> None:
        if self.pending:
            raise RuntimeError(f"export bug: {self.plan[self.next][0]} is {self.pending} bytes short")
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.plan):
            raise RuntimeError(f"export bug: {self.path} got {self.next} of {len(self.plan)} tensors")
        self.handle.close()


def numel(shape) -> int:
    out = 1
    for size in shape:
        out *= int(size)
    return out


def all_finite(tensor: torch.Tensor) -> bool:
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        if not bool(torch.isfinite(flat[start : start + _FINITE_CHUNK]).all()):
            return False
    return True
