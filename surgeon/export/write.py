"""Stream a planned checkpoint to disk: shards, index, config.json, the base's small files.

Memory: the base is streamed tensor by tensor and, within a tensor, block by block of rows
(~16 MB in fp32), with plain reads (no mmap, so pages already passed never count towards RSS).
Each block gets the rows of its LoRA deltas added in place (addmm of scale·B[rows]·A for
nn.Linear, the matching columns of A for Conv1D/Embedding, whose layout is transposed — no
delta-sized tensor ever exists), is rounded once, checked finite and appended to its output
shard. Peak memory is a few blocks above the cost of importing torch and transformers and
building the meta model, independent of the shard and tensor sizes
(benchmarks/export_memory.py). A planned `transform` (small tensors only) is applied to the
whole merged tensor before it is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable

import torch

from ..binding import fully_bound
from ..checkpoint import INDEX, CheckpointInfo
from ..errors import CheckpointError, SurgeonError
from ..fsutil import atomic_dir, output_path
from ..lora.layer import LoraAdapter
from ..quant import roundtrip
from .meta_diff import MetaDiff
from .plan import Layout, OutTensor
from .stream import ReaderPool, ShardReader, ShardWriter, all_finite, bytes_of, numel

# Files that hold weights of the base: copying them would ship stale, unmerged weights.
_WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
    ".ot",
)
_BLOCK_BYTES = 16 * 2**20  # fp32 bytes of one block of rows


def ordered(layout: Layout) -> dict[str, list[OutTensor]]:
    """Each shard's tensors sorted by name; shards left empty by a conversion are dropped."""
    return {file: [outs[n] for n in sorted(outs)] for file, outs in layout.items() if outs}


def write_shards(
    tmp: str, meta: MetaDiff, layout: Layout, readers: ReaderPool, *, progress: bool, desc: str
) -> dict:
    """Write every planned shard into `tmp`; return counts (tensors, merged, from_diff, bytes) and
    each file's sha256 (`written["sha256"]`)."""
    from tqdm.auto import tqdm

    files = ordered(layout)
    if not meta.trust_base and not fully_bound(meta.manifest):  # else check_base compared every tensor
        for name, digest in sorted(meta.manifest["base"].get("replaced_sha256", {}).items()):
            if name in meta.info.weight_map:
                check_base_hash(name, digest, meta, readers)
    written = {"tensors": 0, "merged": 0, "from_diff": 0, "bytes": 0, "sha256": {}}
    with tqdm(
        total=sum(len(outs) for outs in files.values()), desc=desc, unit="tensor", disable=not progress
    ) as bar:
        for file, outs in files.items():
            base_file = os.path.join(meta.base_dir, file)
            metadata = readers.get(base_file).metadata if os.path.isfile(base_file) else {}
            writer = ShardWriter(
                output_path(tmp, file),  # file: a validated index entry of the base, still checked here
                [(o.name, o.dtype, o.shape) for o in outs],
                metadata or {"format": "pt"},
            )
            try:
                for out in outs:
                    stream_tensor(out, meta, readers, writer)
                    written["tensors"] += 1
                    written["merged"] += bool(out.pieces)
                    written["from_diff"] += out.source[0] == "diff"
                    written["bytes"] += writer.sizes[writer.next - 1]
                    bar.update(1)
            except BaseException:
                writer.handle.close()
                raise
            writer.close()
            written["sha256"][file] = writer.sha256.hexdigest()
    return written


def _reader(readers: ReaderPool, meta: MetaDiff, source) -> ShardReader:
    kind, file, _ = source
    return readers.get(meta.diff_path if kind == "diff" else os.path.join(meta.base_dir, file))


def stream_tensor(out: OutTensor, meta: MetaDiff, readers: ReaderPool, writer: ShardWriter) -> None:
    """Write one output tensor block by block of rows: read, add the LoRA deltas of those rows in
    fp32, round once to the output dtype, check finite, append. Memory: one block, not a tensor
    (a transformed tensor is gathered whole first)."""
    writer.begin(out.name, out.dtype, out.shape)
    if out.transform is None:
        for block in merged_blocks(out, meta, readers):
            writer.append(block)
    else:
        whole = out.transform(torch.cat(list(merged_blocks(out, meta, readers))))
        if tuple(whole.shape) != out.shape or whole.dtype != out.dtype:
            raise RuntimeError(
                f"export bug: {out.name} became {whole.dtype} {tuple(whole.shape)}, planned {out.shape}"
            )
        writer.append(whole)
    writer.end()


def merged_blocks(out: OutTensor, meta: MetaDiff, readers: ReaderPool):
    """Blocks of rows of the source tensor with its LoRA pieces merged, in the output dtype."""
    shape = out.read_shape
    rows = shape[0] if shape else 1
    block = max(1, _BLOCK_BYTES // max(1, 4 * numel(shape[1:])))
    source = _source(out, meta, readers)
    deltas = [RowDelta(piece, out.name, shape) for piece in out.pieces]
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        tensor = source(start, stop)
        if out.quantized is not None:
            for delta in deltas:  # dequantised fp32 rows: the deltas go in at fp32, the sum rounded once
                delta.add_rows(tensor, start, stop)
            tensor = tensor.to(out.dtype)
        elif tensor.dtype != out.dtype:
            tensor = tensor.to(out.dtype)  # a diff trained in fp32 on a bf16 base: back to the base dtype
        if deltas and out.quantized is None:
            work = tensor if tensor.dtype == torch.float32 else tensor.float()  # fp32 math
            for delta in deltas:
                delta.add_rows(work, start, stop)
            if work is not tensor:
                tensor.copy_(work)  # round once
            del work
        if tensor.is_floating_point() and not all_finite(tensor):
            what = (
                "merging LoRA into it"
                if deltas
                else f"reading it from {out.source[1] or 'the patched model'}"
            )
            raise SurgeonError(f"tensor {out.name} is not finite after {what}; nothing was written")
        yield tensor
        del tensor


def _source(out: OutTensor, meta: MetaDiff, readers: ReaderPool):
    """(start, stop) -> rows of the tensor the output starts from."""
    kind, _, name = out.source
    shape = out.read_shape
    if kind == "zeros":
        return lambda start, stop: torch.zeros((stop - start, *shape[1:]) if shape else (), dtype=out.dtype)
    if kind == "model":
        whole = meta.state()[name].detach().to("cpu")
        if tuple(whole.shape) != shape:
            raise RuntimeError(f"export bug: {name} is {tuple(whole.shape)} in the model, planned {shape}")
        return lambda start, stop: whole[start:stop].clone() if whole.dim() else whole.clone()
    reader = _reader(readers, meta, out.source)
    if reader.shape(name) != shape:
        raise CheckpointError(
            f"{reader.path}: tensor {name} has shape {reader.shape(name)}, expected {shape}"
        )
    if out.quantized is not None:
        whole = roundtrip(reader.read(name), out.quantized)  # fp32, (out, in)
        return lambda start, stop: whole[start:stop].clone()
    return lambda start, stop: reader.read_rows(name, start, stop)


def check_base_hash(name: str, digest: str, meta: MetaDiff, readers: ReaderPool) -> None:
    """The base content of a tensor the diff replaces must be what the diff was trained from."""
    reader = _reader(readers, meta, ("base", meta.info.weight_map[name], ""))
    shape = reader.shape(name)
    rows = shape[0] if shape else 1
    block = max(1, _BLOCK_BYTES // max(1, 4 * numel(shape[1:])))
    sha = hashlib.sha256()
    for start in range(0, rows, block):
        sha.update(bytes_of(reader.read_rows(name, start, min(rows, start + block))).tobytes())
    if sha.hexdigest() != digest:
        raise CheckpointError(
            f"{meta.diff_dir} was made on another base: the content of {name} in {meta.base_dir} differs"
        )


class RowDelta:
    """One merge piece, delivered block by block of the base weight's rows.

    `piece.index` is a tuple of slices into the weight (None = all of it). For LoRA adapters
    the rows of scale·B·A are added in place (W's rows are B's rows for nn.Linear, A's columns
    for Conv1D/Embedding, whose layout is the transpose), so no delta-sized tensor ever exists;
    any other piece's full `delta()` is computed once and sliced.
    """

    def __init__(self, piece, name: str, shape: tuple[int, ...]):
        self.piece, self.name, self.shape = piece, name, shape
        index = piece.index if piece.index is not None else (slice(None),)
        self.first = index[0]
        self.rest = tuple(index[1:])
        rows = shape[0] if shape else 1
        self.lo, self.hi, step = self.first.indices(rows)
        if step != 1:
            raise RuntimeError(f"merge piece for {name} has a strided index")
        self.adapter = lora_adapter_of(piece)
        self.full = None
        self.region = (self.hi - self.lo, *_region_tail(shape, self.rest))
        expected = self._expected_shape()
        if expected is not None and tuple(expected) != self.region:
            raise SurgeonError(
                f"LoRA adapter '{piece.adapter}' on {name} was made for shape {tuple(expected)}, "
                f"but that part of the tensor is {self.region} (did a later rule resize it?)"
            )

    def _expected_shape(self):
        a = self.adapter
        if a is None:
            return None
        out_f, in_f = a.lora_B.shape[0], a.lora_A.shape[1]
        return (out_f, in_f) if a.kind == "linear" else (in_f, out_f)

    def _full_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the piece's whole fp32 delta (region coordinates), computed once."""
        if self.full is None:
            self.full = self.piece.delta().to(torch.float32)
            if tuple(self.full.shape) != self.region:
                raise SurgeonError(
                    f"LoRA adapter '{self.piece.adapter}' on {self.name} was made for shape "
                    f"{tuple(self.full.shape)}, but that part of the tensor is {self.region}"
                )
        return self.full[r0:r1]

    def add_rows(self, work: torch.Tensor, start: int, stop: int) -> None:
        lo, hi = max(start, self.lo), min(stop, self.hi)
        if lo >= hi:
            return
        target = work[lo - start : hi - start]
        if self.rest:
            target = target[(slice(None), *self.rest)]
        r0, r1 = lo - self.lo, hi - self.lo
        a = self.adapter
        if a is None:
            target.add_(self._full_rows(r0, r1))
            return
        # in place, no delta-sized temporary: target += scale · (rows of B·A)
        lora_a, lora_b = a.lora_A.detach().float(), a.lora_B.detach().float()  # (r, in), (out, r)
        if a.kind == "linear":
            target.addmm_(lora_b[r0:r1], lora_a, alpha=a.scale)  # (rows, in)
        else:  # Conv1D / Embedding keep Wᵀ: rows of the weight are columns of A
            target.addmm_(lora_a[:, r0:r1].t(), lora_b.t(), alpha=a.scale)  # (rows, out)


def _region_tail(shape, rest) -> tuple[int, ...]:
    tail = list(shape[1:])
    for i, part in enumerate(rest):
        lo, hi, _ = part.indices(tail[i])
        tail[i] = hi - lo
    return tuple(tail)


def lora_adapter_of(piece):
    """The LoraAdapter behind a merge piece (its delta is `adapter.delta_weight`), if it is one."""
    owner = getattr(piece.delta, "__self__", None)
    return owner if isinstance(owner, LoraAdapter) else None


def write_index(
    tmp: str, meta: MetaDiff, layout: Layout, total_bytes: int, *, sharded: bool | None = None
) -> None:
    """model.safetensors.index.json for a sharded output, keeping the base index's metadata."""
    if not (meta.info.sharded if sharded is None else sharded):
        return
    metadata = {}
    if meta.info.sharded:
        with open(os.path.join(meta.base_dir, INDEX), encoding="utf-8") as handle:
            metadata = dict(json.load(handle).get("metadata") or {})
    metadata["total_size"] = total_bytes
    files = ordered(layout)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(numel(o.shape) for outs in files.values() for o in outs)
    weight_map = {o.name: file for file, outs in files.items() for o in outs}
    with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as handle:
        json.dump({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, handle, indent=2)
        handle.write("\n")


def write_config(tmp: str, meta: MetaDiff, changes: dict, *, whole: dict | None = None) -> None:
    """config.json: the base's file copied byte for byte when nothing changed, else the base
    config updated with `changes` (or `whole`, a complete config of another architecture)."""
    target = os.path.join(tmp, "config.json")
    if whole is None and not changes:
        shutil.copyfile(os.path.join(meta.base_dir, "config.json"), target)
        return
    config = dict(whole) if whole is not None else {**meta.info.config, **changes}
    with open(target, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _linked_dirs(directory: str, names: list[str]) -> list[str]:
    """copytree's ignore: links to directories (followed, they could copy any tree on disk)."""
    return [n for n in names if os.path.islink(os.path.join(directory, n)) and os.path.isdir(os.path.join(directory, n))]


def copy_small_files(base_dir: str, tmp: str, info: CheckpointInfo) -> tuple[list[str], list[str]]:
    """Copy tokenizer files, generation config, README … — everything but weights and config."""
    skip = set(info.files) | {INDEX, "config.json"}
    copied, skipped = [], []
    for entry in sorted(os.listdir(base_dir)):
        path = os.path.join(base_dir, entry)
        if entry in skip or entry.startswith("."):
            continue
        if os.path.isfile(path):
            if entry.endswith(_WEIGHT_SUFFIXES) or entry.endswith(".index.json"):
                skipped.append(entry)  # other weight formats of the base would be stale
                continue
            shutil.copyfile(path, os.path.join(tmp, entry))
            copied.append(entry)
        elif os.path.isdir(path):
            if os.path.islink(path):
                skipped.append(entry + "/")  # a linked folder may lead anywhere (even to /)
                continue
            holds_weights = any(f.endswith(_WEIGHT_SUFFIXES) for _, _, files in os.walk(path) for f in files)
            if holds_weights:
                skipped.append(entry + "/")
                continue
            shutil.copytree(path, os.path.join(tmp, entry), ignore=_linked_dirs)
            copied.append(entry + "/")
    return copied, skipped


def write_checkpoint(
    meta: MetaDiff,
    layout: Layout,
    out_dir: str,
    *,
    config_changes: dict,
    whole_config: dict | Callable[[dict], dict] | None = None,
    extra_files: dict[str, str] | None = None,
    finish: Callable[[str, dict], None] | None = None,
    sharded: bool | None = None,
    progress: bool = True,
    overwrite: bool = False,
    desc: str = "export",
    kind: str = "hf-export",
) -> dict:
    """Stream `layout` into `out_dir` atomically with its index, config.json (the base's with
    `config_changes`, or `whole_config`: a dict, or a function of the summary so far), the base's
    small files and `extra_files` (name -> text). `finish(tmp, summary)` runs after the shards
    and index, before config.json, to write files of its own. `kind` marks the output as surgeon's
    (`surgeon.fs_marker`), so a later `--force` may replace it."""
    with (
        ReaderPool() as readers,
        atomic_dir(out_dir, [meta.base_dir, meta.diff_dir], overwrite=overwrite, kind=kind) as tmp,
    ):
        written = write_shards(tmp, meta, layout, readers, progress=progress, desc=desc)
        write_index(tmp, meta, layout, written["bytes"], sharded=sharded)
        if finish is not None:
            finish(tmp, written)
        whole = whole_config(written) if callable(whole_config) else whole_config
        write_config(tmp, meta, config_changes, whole=whole)
        written["copied"], written["skipped"] = copy_small_files(meta.base_dir, tmp, meta.info)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as handle:
                handle.write(text)
    written["out_dir"] = out_dir
    written["config_changes"] = sorted(config_changes)
    return written
