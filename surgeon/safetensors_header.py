"""The byte layout of a safetensors file, read from its header alone (no tensor data).

The format: an 8-byte little-endian header length N, N bytes of JSON (name -> dtype, shape,
[begin, end) offsets into the data that follows, plus an optional `__metadata__` of strings),
then the data. The safetensors library refuses files whose tensors do not tile the data exactly
(no gaps, no overlaps, nothing after the last tensor); `read_layout` checks the same, so the
header bytes and the tensors' byte spans together are every byte of the file — a digest of each
covers the whole file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 2**20  # the limit the safetensors library itself enforces

# safetensors dtype tag -> torch dtype name (`str(torch.float32).removeprefix("torch.")`)
TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
          "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


@dataclass
class Layout:
    """Where each tensor's bytes lie in one safetensors file (absolute file offsets)."""

    path: str
    header_end: int  # 8 + header length: the data starts here
    size: int  # of the whole file
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> [begin, end) in the file
    dtypes: dict[str, str] = field(default_factory=dict)  # name -> dtype tag ("F32")
    shapes: dict[str, list[int]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def read_layout(path: str) -> Layout:
    """Parse and validate the header of `path`; every failure is one CheckpointError naming the file."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (shorter than its 8-byte header length)"
                )
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file (header length {length}, file size {size})"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)"
        )
    layout = Layout(path, 8 + length, size)
    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(
                f"{path}: corrupt safetensors header (__metadata__ must map names to strings)"
            )
        layout.metadata = metadata
    for name, entry in header.items():
        layout.spans[name], layout.dtypes[name], layout.shapes[name] = _entry(
            path, name, entry, layout.header_end
        )
    _check_tiling(layout)
    return layout


def _entry(path: str, name: str, entry, header_end: int) -> tuple[tuple[int, int], str, list[int]]:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header: tensor {name}: {what}")

    if not isinstance(entry, dict):
        raise bad("its entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise bad(f"dtype {dtype!r} is not a string")
    if not isinstance(shape, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape
    ):
        raise bad(f"shape {shape!r} is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"data_offsets {offsets!r} are not [begin, end]")
    if dtype in _BYTES:
        count = 1
        for size in shape:
            count *= size
        if count * _BYTES[dtype] != offsets[1] - offsets[0]:
            raise bad(
                f"{dtype}{shape} needs {count * _BYTES[dtype]} bytes, its data_offsets span {offsets[1] - offsets[0]}"
            )
    return (header_end + offsets[0], header_end + offsets[1]), dtype, shape


def _check_tiling(layout: Layout) -> None:
    """The tensors' spans must tile [header_end, size) exactly, as the safetensors library requires."""
    position = layout.header_end
    for name, (begin, end) in sorted(layout.spans.items(), key=lambda item: item[1]):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise CheckpointError(f"{layout.path}: corrupt safetensors file: tensor {name} {what}")
        position = end
    if position != layout.size:
        raise CheckpointError(
            f"{layout.path}: corrupt or truncated safetensors file (its tensors end at byte {position}, "
            f"the file has {layout.size})"
        )
