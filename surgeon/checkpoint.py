"""Reading Hugging Face checkpoint directories: validate before loading, load strictly.

transformers 5 loads a checkpoint with a missing tensor as a warning (random init) and a stale
index entry silently (../shared/DESIGN.md §4), so we inspect the files ourselves first:
config.json, safetensors headers (no tensor data is read), the shard index, and we refuse
pickle `.bin` weights unless asked (`allow_pickle`, then `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from .errors import CheckpointError
from .fsutil import relative_inside

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


@dataclass
class CheckpointInfo:
    """What a model directory holds, read from headers only."""

    directory: str
    config: dict
    format: str  # "safetensors" | "pickle"
    files: list[str]  # weight files, relative to directory
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor -> file
    tensors: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # name -> (dtype, shape)
    sharded: bool = False

    def listing_digest(self) -> str:
        """sha256 over the sorted (name, dtype, shape) listing: the shape of the base."""
        text = json.dumps(sorted([n, d, s] for n, (d, s) in self.tensors.items()))
        return hashlib.sha256(text.encode()).hexdigest()


def read_json_in(directory: str, name: str, what: str) -> dict:
    """Read `directory/name`; each failure is one CheckpointError saying which file and why.
    `what` names the directory kind, e.g. "a Hugging Face model directory"."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: directory not found")
    path = os.path.join(directory, name)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {name}: not {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


def read_config(directory: str) -> dict:
    config = read_json_in(directory, CONFIG, "a Hugging Face model directory")
    path = os.path.join(directory, CONFIG)
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{path}: no model_type: not a transformers config")
    return config


def inspect_checkpoint(directory: str, *, allow_pickle: bool = False, need_weights: bool = True) -> CheckpointInfo:
    """Validate a model directory and list its tensors without reading their data."""
    config = read_config(directory)
    has = lambda name: os.path.isfile(os.path.join(directory, name))  # noqa: E731
    if has(INDEX):
        return _inspect_sharded(directory, config)
    if has(SINGLE):
        info = CheckpointInfo(directory, config, "safetensors", [SINGLE])
        info.tensors = _read_header(directory, SINGLE)
        info.weight_map = {name: SINGLE for name in info.tensors}
        return info
    if has(PICKLE_SINGLE) or has(PICKLE_INDEX):
        if not allow_pickle:
            raise CheckpointError(
                f"{directory}: weights are only in pickle .bin files, which can run code when "
                "loaded; convert them to safetensors or pass --allow-pickle "
                "(then loaded with torch.load(weights_only=True))"
            )
        files = [PICKLE_SINGLE] if has(PICKLE_SINGLE) else sorted(set(read_index(directory, PICKLE_INDEX).values()))
        return CheckpointInfo(directory, config, "pickle", files)
    if need_weights:
        raise CheckpointError(f"{directory}: no weights (model.safetensors or an index of shards)")
    return CheckpointInfo(directory, config, "none", [])


def read_index(directory: str, name: str = INDEX) -> dict[str, str]:
    """The `weight_map` of a shard index, each file normalised to a path inside `directory`.

    transformers joins each entry to the directory as it stands, so an absolute path or `../x`
    would read (and an export write) outside it: every entry must resolve inside the checkpoint
    directory (an absolute path into it is accepted as its relative form), else the index is refused.
    """
    path = os.path.join(directory, name)
    try:
        with open(path, encoding="utf-8") as handle:
            index = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a valid shard index ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the shard index ({exc.strerror})") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{path}: not a valid shard index (a JSON {type(index).__name__}, not an object)")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        got = "missing" if weight_map is None else f"a JSON {type(weight_map).__name__}"
        raise CheckpointError(f"{path}: weight_map must be an object of tensor name -> shard file ({got})")
    if not isinstance(index.get("metadata", {}), dict):
        raise CheckpointError(f"{path}: metadata must be an object, not a JSON {type(index['metadata']).__name__}")
    resolved = {}
    for tensor, entry in weight_map.items():
        if not isinstance(entry, str):
            raise CheckpointError(f"{path}: tensor {tensor}: the shard must be a file name, not {entry!r}")
        inside = relative_inside(directory, entry)
        if inside is None:
            raise CheckpointError(
                f"{path}: tensor {tensor}: shard {entry!r} is not a file inside {directory}; "
                "a shard index may only name files in its own checkpoint directory"
            )
        resolved[tensor] = inside
    return resolved


def _inspect_sharded(directory: str, config: dict) -> CheckpointInfo:
    index_path = os.path.join(directory, INDEX)
    weight_map = read_index(directory)
    files = sorted(set(weight_map.values()))
    info = CheckpointInfo(directory, config, "safetensors", files, weight_map, sharded=True)
    for file in files:
        if not os.path.isfile(os.path.join(directory, file)):
            raise CheckpointError(f"{index_path}: shard {file} is listed but missing")
        header = _read_header(directory, file)
        for name, meta in header.items():
            info.tensors[name] = meta
    for name, file in weight_map.items():
        if name not in info.tensors:
            raise CheckpointError(f"{index_path}: tensor {name} is listed in {file} but not stored there")
    return info


def _read_header(directory: str, file: str) -> dict[str, tuple[str, list[int]]]:
    from safetensors import SafetensorError, safe_open

    path = os.path.join(directory, file)
    try:
        with safe_open(path, framework="pt") as handle:
            out = {}
            for name in handle.keys():
                piece = handle.get_slice(name)
                out[name] = (piece.get_dtype(), list(piece.get_shape()))
            return out
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def model_class(config: dict):
    """The class the checkpoint was saved from (keeps its head), else the base AutoModel."""
    import transformers

    for name in config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_model(directory: str, *, allow_pickle: bool = False, dtype="auto"):
    """Load a checkpoint into its architecture class; missing tensors are an error."""
    info = inspect_checkpoint(directory, allow_pickle=allow_pickle)
    cls = model_class(info.config)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = dict(dtype=dtype, local_files_only=True, output_loading_info=True)
    if info.format == "pickle":
        kwargs["use_safetensors"] = False
    try:
        model, loading = cls.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{directory}: cannot load the model: {first}") from None
    missing = list(loading.get("missing_keys") or [])
    mismatched = list(loading.get("mismatched_keys") or [])
    if missing:
        raise CheckpointError(
            f"{directory}: checkpoint is missing tensor {missing[0]}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    if mismatched:
        raise CheckpointError(f"{directory}: tensor {mismatched[0][0]} has the wrong shape")
    model.eval()
    return model, info


def build_meta_model(directory: str):
    """The model's structure from config.json alone, on the meta device (no weights read)."""
    import transformers
    from accelerate import init_empty_weights

    config_dict = read_config(directory)
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory}/config.json: {exc}") from None
    cls = model_class(config_dict)
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    previous = torch.get_default_dtype()
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        torch.set_default_dtype(dtype)  # so the report's memory estimate uses the checkpoint dtype
    try:
        with init_empty_weights():
            if cls is transformers.AutoModel:
                model = transformers.AutoModel.from_config(config)
            else:
                model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()  # from_pretrained ties; a bare constructor on meta may not
    return model, config_dict
