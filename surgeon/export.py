"""`surgeon export`: a diff merged into its base, written as a plain Hugging Face checkpoint.

The output is what `transformers.AutoModel.from_pretrained(OUT)` loads with no surgeon
installed: config.json (with the recipe's config changes, e.g. extended positions), the base's
safetensors shard layout and index, the base's dtypes, tokenizer and other small files copied.
LoRA is merged (W + scale·B·A computed in fp32, rounded once to the base dtype); tensors the
recipe trained (BitFit biases, unfrozen layers, grown position tables) are written from the diff.

Memory: the model is only *built* on the meta device; the diff's added tensors (LoRA A/B) are
the only ones loaded into it. The base is then streamed tensor by tensor and, within a tensor,
block by block of rows (~16 MB in fp32), with plain reads (no mmap, so pages already passed
never count towards RSS). Each block gets the rows of its LoRA deltas added in place (addmm of
scale·B[rows]·A for nn.Linear, the matching columns of A for Conv1D/Embedding, whose layout
is transposed — no delta-sized tensor ever exists), is rounded once, checked finite and
appended to its output shard. The python safetensors API can only write a whole dict of
tensors at once (per-shard memory = the shard), so the shards are written here directly:
the format is an 8-byte little-endian header
length, a JSON header of name → dtype/shape/byte offsets, then the raw bytes, so the header is
computed from the planned shapes first and the bytes are appended as they are produced. Peak
memory is a few blocks above the cost of importing torch and transformers and building the meta
model — independent of the shard and tensor sizes (benchmarks/export_memory.py).

Changes with no plain-transformers equivalent (Houlsby adapters, efficient-attention variants,
any added tensor that is not LoRA) are refused with an error naming them; nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass, field

import torch

from .checkpoint import INDEX, CheckpointInfo, build_meta_model, inspect_checkpoint
from .diff import DIFF_FILE, check_base, check_stored_names, load_recipes, read_manifest
from .engine import Surgery, patch
from .errors import CheckpointError, SurgeonError
from .fsutil import atomic_dir, check_output, output_path

LORA_MARK = ".surgeon_lora."
# Files that hold weights of the base: copying them would ship stale, unmerged weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".ot")

# safetensors dtype tags <-> torch dtypes
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_TAGS = {dtype: tag for tag, dtype in _DTYPES.items()}
_FINITE_CHUNK = 1 << 22  # elements per isfinite() pass: a bool mask of 4 MB, not of the tensor


# ---- safetensors, streamed ---------------------------------------------------------------
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
        if tag not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has dtype {tag}, which export does not handle")
        return _DTYPES[tag]

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
        row = tensor.element_size() * _numel(shape[1:])
        if end - begin != row * (shape[0] if shape else 1):
            raise CheckpointError(f"{self.path}: tensor {name} has {end - begin} bytes, its shape needs more or fewer")
        raw = _bytes_of(tensor)
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


def _bytes_of(tensor: torch.Tensor):
    """The tensor's storage as a writable uint8 numpy array (no copy; little-endian hosts)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


class ShardWriter:
    """Writes a safetensors file tensor by tensor: the header is computed from the planned
    (name, dtype, shape) list first, then each tensor's bytes are appended in that order."""

    def __init__(self, path: str, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict):
        self.path = path
        self.plan = plan
        header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
        offset = 0
        self.sizes = []
        for name, dtype, shape in plan:
            size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _TAGS[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.sizes.append(size)
            offset += size
        self.total = offset
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.handle = open(path, "wb")
        self.handle.write(struct.pack("<Q", len(text)) + text)
        self.next = 0

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
        raw = _bytes_of(block.contiguous())
        if len(raw) > self.pending:
            raise RuntimeError(f"export bug: {self.plan[self.next][0]} got more bytes than its header says")
        self.handle.write(memoryview(raw))
        self.pending -= len(raw)

    def end(self) -> None:
        if self.pending:
            raise RuntimeError(f"export bug: {self.plan[self.next][0]} is {self.pending} bytes short")
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.plan):
            raise RuntimeError(f"export bug: {self.path} got {self.next} of {len(self.plan)} tensors")
        self.handle.close()


def _numel(shape) -> int:
    out = 1
    for size in shape:
        out *= int(size)
    return out


# ---- the patched model, on the meta device -----------------------------------------------
@dataclass
class MetaDiff:
    """A diff re-applied to its base's structure without reading any base weight."""

    diff_dir: str
    base_dir: str
    manifest: dict
    info: CheckpointInfo
    model: torch.nn.Module
    surgery: Surgery
    config_changes: dict
    derived: list[str] = field(default_factory=list)  # resized from the base by the recipe itself

    @property
    def diff_path(self) -> str:
        return os.path.join(self.diff_dir, DIFF_FILE)

    def added_names(self) -> list[str]:
        return sorted(self.surgery.ledger.added)

    def trained_base_names(self) -> list[str]:
        """Base tensors whose values the diff replaces (trainable ones, incl. resized)."""
        return sorted(set(self.surgery.ledger.trainable) - set(self.surgery.ledger.added))


def open_meta_diff(diff_dir: str, base_dir: str | None = None) -> MetaDiff:
    """Build the base on the meta device, re-apply the diff's recipes, load the added tensors.

    Only the tensors the recipes *added* (LoRA A/B …) are loaded into the model; trained base
    tensors stay in the diff file and are read when their turn comes. A tensor the recipe
    resizes as a function of the base (extend_positions tiles the position table) and that
    the diff does not carry is recomputed: its base value is loaded and the recipes re-applied.
    """
    from safetensors import SafetensorError, safe_open

    manifest = read_manifest(diff_dir)
    base_dir = base_dir or manifest["base"]["path"]
    info = inspect_checkpoint(base_dir)
    if info.format != "safetensors":
        raise CheckpointError(f"{base_dir}: export reads safetensors weights only")
    check_base(manifest, info, diff_dir)
    recipes = load_recipes(diff_dir, manifest)
    model, surgery, changes = _patch_meta(base_dir, recipes, {})
    derived = sorted(set(surgery.ledger.resized) - set(surgery.ledger.diff_names()))
    if derived:
        missing = [n for n in derived if n not in info.weight_map]
        if missing:
            raise CheckpointError(f"{base_dir}: the recipe resizes {missing[0]}, which the checkpoint does not store")
        readers = {}
        try:
            real = {n: _read_base(readers, info, n) for n in derived}
        finally:
            for reader in readers.values():
                reader.close()
        model, surgery, changes = _patch_meta(base_dir, recipes, real)

    meta = MetaDiff(diff_dir, base_dir, manifest, info, model, surgery, changes, derived)
    path = meta.diff_path
    expected = set(surgery.ledger.diff_names())
    try:
        with safe_open(path, framework="pt") as handle:
            check_stored_names(path, set(handle.keys()), expected)
            added = {name: handle.get_tensor(name) for name in meta.added_names()}
    except FileNotFoundError:
        raise CheckpointError(f"{diff_dir}: no {DIFF_FILE}") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    _assign(model, added, path)
    model.eval()
    return meta


def _patch_meta(base_dir: str, recipes, real: dict[str, torch.Tensor]):
    """(model, surgery, config changes): the base on the meta device, `real` tensors loaded."""
    model, _ = build_meta_model(base_dir)
    if real:
        _assign(model, real, base_dir)
    before = _config_dict(model)
    for recipe in recipes:
        surgery = patch(model, recipe)
    after = _config_dict(model)
    return model, surgery, {k: v for k, v in after.items() if before.get(k, _MISSING) != v}


def _assign(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Put real tensors into a meta model in place of its parameters (shape-checked)."""
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    ready = {}
    for name, tensor in tensors.items():
        if name not in state:
            raise RuntimeError(f"export bug: {name} is not a tensor of the patched model")
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the patched model expects {tuple(state[name].shape)}"
            )
        ready[name] = tensor.to(state[name].dtype)
    result = model.load_state_dict(ready, strict=False, assign=True)
    if result.unexpected_keys:
        raise RuntimeError(f"export bug: tensors not in the model: {result.unexpected_keys[:3]}")


def _read_base(readers: dict, info: CheckpointInfo, name: str) -> torch.Tensor:
    path = os.path.join(info.directory, info.weight_map[name])
    if path not in readers:
        readers[path] = ShardReader(path)
    return readers[path].read(name)


_MISSING = object()
_CONFIG_IGNORED = {"transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path"}


def _config_dict(model) -> dict:
    data = json.loads(json.dumps(model.config.to_dict(), default=str))
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in _CONFIG_IGNORED}


# ---- what cannot be merged ---------------------------------------------------------------
def mergeability_problems(meta: MetaDiff) -> list[str]:
    """One line per change with no plain-transformers equivalent."""
    from .lora.merge import non_mergeable

    problems = list(non_mergeable(meta.model))
    for rule in meta.surgery.rules:
        if rule.attention:
            shown = ", ".join(rule.attention[:3]) + (f", … (+{len(rule.attention) - 3})" if len(rule.attention) > 3 else "")
            problems.append(
                f"{rule.label} at {rule.where} replaced the attention of {shown}: an efficient-attention "
                "variant has no plain-transformers equivalent, so it cannot be exported merged"
            )
    if not problems:
        from .attention.interface import VARIANT_ATTR

        others = [n for n in meta.added_names() if LORA_MARK not in n and f".{VARIANT_ATTR}." not in n]
        if others:
            problems.append(
                f"added tensor {others[0]} ({meta.surgery.ledger.added[others[0]]})"
                + (f" and {len(others) - 1} more" if len(others) > 1 else "")
                + " is not LoRA and has no merged form"
            )
    return problems


# ---- export ----------------------------------------------------------------------------
@dataclass
class _Out:
    """One output tensor: where its value comes from and what is added to it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: tuple[str, str, str]  # ("base", file, name) | ("diff", DIFF_FILE, name) | ("model", "", name)
    pieces: list = field(default_factory=list)


def export_merged(
    diff_dir: str,
    out_dir: str,
    base_dir: str | None = None,
    progress: bool = True,
    *,
    adapters: list[str] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write `diff_dir` merged into its base as a plain HF checkpoint in `out_dir`; return a summary.

    `adapters`: which LoRA adapters to merge (default: what `surgeon.lora.merge.merge_pieces`
    merges by default). The output is written atomically; on any error nothing is left behind.
    """
    from .lora.merge import merge_pieces

    manifest = read_manifest(diff_dir)
    base_dir = base_dir or manifest["base"]["path"]
    check_output(out_dir, [base_dir, diff_dir], overwrite=overwrite)
    meta = open_meta_diff(diff_dir, base_dir)
    problems = mergeability_problems(meta)
    if problems:
        raise SurgeonError(
            f"{diff_dir} cannot be exported as a merged checkpoint:\n" + "\n".join(f"  {p}" for p in problems)
        )
    pieces = merge_pieces(meta.model, adapters)
    layout, config = _plan(meta, pieces, adapters)

    from tqdm.auto import tqdm

    total = sum(len(tensors) for tensors in layout.values())
    readers: dict[str, ShardReader] = {}
    written = {"tensors": 0, "merged": 0, "from_diff": 0, "bytes": 0}
    try:
        with atomic_dir(out_dir, [base_dir, diff_dir], overwrite=overwrite, kind="hf-export") as tmp:
            with tqdm(total=total, desc="export", unit="tensor", disable=not progress) as bar:
                for file, outs in layout.items():
                    base_meta = _reader(readers, meta, ("base", file, ""))  # keep the shard's metadata
                    writer = ShardWriter(
                        output_path(tmp, file),  # file: a validated index entry, still checked here
                        [(o.name, o.dtype, o.shape) for o in outs],
                        base_meta.metadata or {"format": "pt"},
                    )
                    try:
                        for out in outs:
                            _stream(out, meta, readers, writer)
                            written["tensors"] += 1
                            written["merged"] += bool(out.pieces)
                            written["from_diff"] += out.source[0] != "base"
                            written["bytes"] += writer.sizes[writer.next - 1]
                            bar.update(1)
                    except BaseException:
                        writer.handle.close()
                        raise
                    writer.close()
            _write_index(tmp, meta, layout, written["bytes"])
            _write_config(tmp, meta, config)
            written["copied"], written["skipped"] = _copy_small_files(meta.base_dir, tmp, meta.info)
    finally:
        for reader in readers.values():
            reader.close()
    written["out_dir"] = out_dir
    written["config_changes"] = sorted(config)
    return written


def _plan(meta: MetaDiff, pieces, adapters) -> tuple[dict[str, list[_Out]], dict]:
    """Per output shard (the base's files), the ordered tensors to write; and config updates."""
    from .lora.merge import untied_names

    info = meta.info
    layout: dict[str, dict[str, _Out]] = {file: {} for file in info.files}
    for name, (tag, shape) in info.tensors.items():
        if tag not in _DTYPES:
            raise CheckpointError(f"{info.directory}: tensor {name} has dtype {tag}, which export does not handle")
        file = info.weight_map[name]
        layout[file][name] = _Out(name, _DTYPES[tag], tuple(shape), ("base", file, name))
    config = dict(meta.config_changes)

    # A tie the merge breaks (untie: true): both sides become tensors of their own.
    for name, source in sorted(untied_names(meta.model, adapters).items()):
        if name in info.weight_map:
            continue
        if source not in info.weight_map:
            raise CheckpointError(f"{meta.base_dir}: the checkpoint stores neither {name} nor {source}, which it is tied to")
        base = layout[info.weight_map[source]][source]
        layout[info.weight_map[source]][name] = _Out(name, base.dtype, base.shape, base.source)
        config["tie_word_embeddings"] = False  # else transformers re-ties them on load

    outs = {o.name: o for file_outs in layout.values() for o in file_outs.values()}
    params = dict(meta.model.named_parameters())
    for name in meta.trained_base_names() + meta.derived:
        if name not in outs:
            raise CheckpointError(f"{meta.base_dir}: the patched model's tensor {name} is not stored in the checkpoint")
        outs[name].source = ("diff", DIFF_FILE, name) if name in meta.surgery.ledger.trainable else ("model", "", name)
        outs[name].shape = tuple(params[name].shape)
    # buffers the recipe resized (extend_positions: position_ids), where the checkpoint has them
    for name, buffer in meta.model.named_buffers():
        if name in outs and tuple(buffer.shape) != outs[name].shape and not buffer.is_meta:
            outs[name].source, outs[name].shape = ("model", "", name), tuple(buffer.shape)
    for piece in pieces:
        if piece.param_name not in outs:
            raise CheckpointError(
                f"{meta.base_dir}: LoRA adapter {piece.adapter} merges into {piece.param_name}, "
                "which the checkpoint does not store under that name"
            )
        outs[piece.param_name].pieces.append(piece)
    return {file: [file_outs[n] for n in sorted(file_outs)] for file, file_outs in layout.items()}, config


def _reader(readers: dict, meta: MetaDiff, source) -> ShardReader:
    kind, file, _ = source
    path = meta.diff_path if kind == "diff" else os.path.join(meta.base_dir, file)
    if path not in readers:
        readers[path] = ShardReader(path)
    return readers[path]


def _stream(out: _Out, meta: MetaDiff, readers, writer: ShardWriter) -> None:
    """Write one output tensor block by block of rows: read, add the LoRA deltas of those rows in
    fp32, round once to the output dtype, check finite, append. Memory: one block, not a tensor."""
    replaced = meta.manifest["base"].get("replaced_sha256", {})
    if out.name in replaced and out.name in meta.info.weight_map:
        _check_base_hash(out.name, replaced[out.name], meta, readers)
    rows = out.shape[0] if out.shape else 1
    block = max(1, _BLOCK_BYTES // max(1, 4 * _numel(out.shape[1:])))
    source = _source(out, meta, readers)
    deltas = [_RowDelta(piece, out) for piece in out.pieces]
    writer.begin(out.name, out.dtype, out.shape)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        tensor = source(start, stop)
        if tensor.dtype != out.dtype:
            tensor = tensor.to(out.dtype)  # a diff trained in fp32 on a bf16 base: back to the base dtype
        if deltas:
            work = tensor if tensor.dtype == torch.float32 else tensor.float()  # fp32 math
            for delta in deltas:
                delta.add_rows(work, start, stop)
            if work is not tensor:
                tensor.copy_(work)  # round once
            del work
        if tensor.is_floating_point() and not _all_finite(tensor):
            what = "merging LoRA into it" if deltas else f"reading it from {out.source[1] or 'the patched model'}"
            raise SurgeonError(f"tensor {out.name} is not finite after {what}; nothing was written")
        writer.append(tensor)
        del tensor
    writer.end()


_BLOCK_BYTES = 16 * 2**20  # fp32 bytes of one block of rows


def _source(out: _Out, meta: MetaDiff, readers):
    """(start, stop) -> rows of the tensor the output starts from."""
    kind, _, name = out.source
    if kind == "model":
        state = dict(meta.model.named_parameters())
        state.update(dict(meta.model.named_buffers()))
        whole = state[out.name].detach().to("cpu")
        if tuple(whole.shape) != out.shape:
            raise RuntimeError(f"export bug: {out.name} is {tuple(whole.shape)} in the model, planned {out.shape}")
        return lambda start, stop: whole[start:stop].clone() if whole.dim() else whole.clone()
    reader = _reader(readers, meta, out.source)
    if reader.shape(name) != out.shape:
        raise CheckpointError(f"{reader.path}: tensor {name} has shape {reader.shape(name)}, expected {out.shape}")
    return lambda start, stop: reader.read_rows(name, start, stop)


def _check_base_hash(name: str, digest: str, meta: MetaDiff, readers) -> None:
    """The base content of a tensor the diff replaces must be what the diff was trained from."""
    import hashlib

    reader = _reader(readers, meta, ("base", meta.info.weight_map[name], ""))
    shape = reader.shape(name)
    rows = shape[0] if shape else 1
    block = max(1, _BLOCK_BYTES // max(1, 4 * _numel(shape[1:])))
    sha = hashlib.sha256()
    for start in range(0, rows, block):
        sha.update(_bytes_of(reader.read_rows(name, start, min(rows, start + block))).tobytes())
    if sha.hexdigest() != digest:
        raise CheckpointError(f"{meta.diff_dir} was made on another base: the content of {name} in {meta.base_dir} differs")


class _RowDelta:
    """One merge piece, delivered block by block of the base weight's rows.

    `piece.index` is a tuple of slices into the weight (None = all of it). For LoRA adapters
    the rows of scale·B·A are added in place (W's rows are B's rows for nn.Linear, A's columns
    for Conv1D/Embedding, whose layout is the transpose), so no delta-sized tensor ever exists;
    any other piece's full `delta()` is computed once and sliced.
    """

    def __init__(self, piece, out: _Out):
        self.piece, self.out = piece, out
        index = piece.index if piece.index is not None else (slice(None),)
        self.first = index[0]
        self.rest = tuple(index[1:])
        rows = out.shape[0] if out.shape else 1
        self.lo, self.hi, step = self.first.indices(rows)
        if step != 1:
            raise RuntimeError(f"merge piece for {out.name} has a strided index")
        self.adapter = _lora_adapter_of(piece)
        self.full = None
        region = (self.hi - self.lo, *_region_tail(out.shape, self.rest))
        expected = self._expected_shape()
        if expected is not None and tuple(expected) != region:
            raise SurgeonError(
                f"LoRA adapter '{piece.adapter}' on {out.name} was made for shape {tuple(expected)}, "
                f"but that part of the tensor is {region} (did a later rule resize it?)"
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
            region = (self.hi - self.lo, *_region_tail(self.out.shape, self.rest))
            if tuple(self.full.shape) != region:
                raise SurgeonError(
                    f"LoRA adapter '{self.piece.adapter}' on {self.out.name} was made for shape "
                    f"{tuple(self.full.shape)}, but that part of the tensor is {region}"
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


def _lora_adapter_of(piece):
    """The LoraAdapter behind a merge piece (its delta is `adapter.delta_weight`), if it is one."""
    from .lora.layer import LoraAdapter

    owner = getattr(piece.delta, "__self__", None)
    return owner if isinstance(owner, LoraAdapter) else None


def _all_finite(tensor: torch.Tensor) -> bool:
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        if not bool(torch.isfinite(flat[start : start + _FINITE_CHUNK]).all()):
            return False
    return True


def _write_index(tmp: str, meta: MetaDiff, layout, total_bytes: int) -> None:
    if not meta.info.sharded:
        return
    with open(os.path.join(meta.base_dir, INDEX), encoding="utf-8") as handle:
        index = json.load(handle)
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = total_bytes
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(_numel(o.shape) for outs in layout.values() for o in outs)
    weight_map = {o.name: file for file, outs in layout.items() for o in outs}
    with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as handle:
        json.dump({"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, handle, indent=2)
        handle.write("\n")


def _write_config(tmp: str, meta: MetaDiff, changes: dict) -> None:
    source = os.path.join(meta.base_dir, "config.json")
    target = os.path.join(tmp, "config.json")
    if not changes:
        shutil.copyfile(source, target)
        return
    config = dict(meta.info.config)
    config.update(changes)
    with open(target, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _linked_dirs(directory: str, names: list[str]) -> list[str]:
    """copytree's ignore: links to directories (followed, they could copy any tree on disk)."""
    return [n for n in names if os.path.islink(os.path.join(directory, n)) and os.path.isdir(os.path.join(directory, n))]


def _copy_small_files(base_dir: str, tmp: str, info: CheckpointInfo) -> tuple[list[str], list[str]]:
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
            holds_weights = any(
                f.endswith(_WEIGHT_SUFFIXES) for _, _, files in os.walk(path) for f in files
            )
            if holds_weights:
                skipped.append(entry + "/")
                continue
            shutil.copytree(path, os.path.join(tmp, entry), ignore=_linked_dirs)
            copied.append(entry + "/")
    return copied, skipped
