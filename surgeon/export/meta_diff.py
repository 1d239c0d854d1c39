"""A diff re-applied to its base's structure on the meta device, without reading base weights.

Every exporter starts here: `open_meta_diff` builds the base model on the meta device from its
config.json, re-applies the diff's recipes (each rule with the parameters the manifest
recorded), and loads only the tensors the recipes *added* (LoRA A/B, adapters, learned
attention projections). Trained base tensors stay in diff.safetensors and are read when an
exporter streams them. `assign_tensors` is the one way real tensors enter a meta model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..binding import check_diff_file
from ..checkpoint import CheckpointInfo, build_meta_model, inspect_checkpoint
from ..diff import DIFF_FILE, check_base, check_stored_names, load_recipes, read_manifest
from ..engine import Surgery, patch
from ..errors import CheckpointError
from ..lora.host import LoraHost
from .stream import ReaderPool

LORA_MARK = f".{LoraHost.ATTR}."  # in the name of every LoRA tensor: <module>.surgeon_lora.<name>.lora_A


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
    trust_base: bool = False  # the base's content was not compared with the diff's record of it

    @property
    def diff_path(self) -> str:
        return os.path.join(self.diff_dir, DIFF_FILE)

    def added_names(self) -> list[str]:
        return sorted(self.surgery.ledger.added)

    def trained_base_names(self) -> list[str]:
        """Base tensors whose values the diff replaces (trainable ones, incl. resized)."""
        return sorted(set(self.surgery.ledger.trainable) - set(self.surgery.ledger.added))

    def state(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer of the patched model by name (meta where not loaded)."""
        state = dict(self.model.named_parameters())
        state.update(dict(self.model.named_buffers()))
        return state


def open_meta_diff(diff_dir: str, base_dir: str | None = None, *, trust_base: bool = False) -> MetaDiff:
    """Build the base on the meta device, re-apply the diff's recipes, load the added tensors.

    A tensor the recipe resizes as a function of the base (extend_positions tiles the position
    table) and that the diff does not carry is recomputed: its base value is loaded and the
    recipes re-applied.

    The base must be the one the diff was made on, tensor for tensor, and the diff file the one
    surgeon wrote (`surgeon.binding`); `trust_base=True` checks only the base's tensor listing.
    """
    from safetensors import SafetensorError, safe_open

    manifest = read_manifest(diff_dir)
    base_dir = base_dir or manifest["base"]["path"]
    info = inspect_checkpoint(base_dir)
    if info.format != "safetensors":
        raise CheckpointError(f"{base_dir}: export reads safetensors weights only")
    check_base(manifest, info, diff_dir, trust_base=trust_base)
    recipes = load_recipes(diff_dir, manifest)
    model, surgery, changes = _patch_meta(base_dir, recipes, {})
    derived = sorted(set(surgery.ledger.resized) - set(surgery.ledger.diff_names()))
    if derived:
        missing = [n for n in derived if n not in info.weight_map]
        if missing:
            raise CheckpointError(
                f"{base_dir}: the recipe resizes {missing[0]}, which the checkpoint does not store"
            )
        with ReaderPool() as readers:
            real = {n: readers.get(os.path.join(info.directory, info.weight_map[n])).read(n) for n in derived}
        model, surgery, changes = _patch_meta(base_dir, recipes, real)

    meta = MetaDiff(diff_dir, base_dir, manifest, info, model, surgery, changes, derived, trust_base)
    path = meta.diff_path
    if os.path.isfile(path):
        check_diff_file(manifest, path)
    expected = set(surgery.ledger.diff_names())
    try:
        with safe_open(path, framework="pt") as handle:
            check_stored_names(path, set(handle.keys()), expected)
            added = {name: handle.get_tensor(name) for name in meta.added_names()}
    except FileNotFoundError:
        raise CheckpointError(f"{diff_dir}: no {DIFF_FILE}") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    assign_tensors(model, added, path)
    model.eval()
    return meta


def _patch_meta(base_dir: str, recipes, real: dict[str, torch.Tensor]):
    """(model, surgery, config changes): the base on the meta device, `real` tensors loaded."""
    model, _ = build_meta_model(base_dir)
    if real:
        assign_tensors(model, real, base_dir)
    before = config_dict(model)
    for recipe in recipes:
        surgery = patch(model, recipe)
    after = config_dict(model)
    return model, surgery, {k: v for k, v in after.items() if before.get(k, _MISSING) != v}


def assign_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str, label=None) -> None:
    """Put real tensors into a (meta) model in place of its parameters and buffers, shape-checked,
    cast to each target's dtype. `source` names where they came from in errors; `label(name)`,
    if given, says what a tensor is there (e.g. its name in a PEFT adapter)."""
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    ready = {}
    for name, tensor in tensors.items():
        if name not in state:
            raise RuntimeError(f"surgeon bug: {name} is not a tensor of the patched model")
        if tuple(tensor.shape) != tuple(state[name].shape):
            raise CheckpointError(
                f"{source}: tensor {label(name) if label else name} has shape {tuple(tensor.shape)}, "
                f"the patched model expects {tuple(state[name].shape)}"
            )
        ready[name] = tensor.to(state[name].dtype)
    result = model.load_state_dict(ready, strict=False, assign=True)
    if result.unexpected_keys:
        raise RuntimeError(f"surgeon bug: tensors not in the model: {result.unexpected_keys[:3]}")


_MISSING = object()
_CONFIG_IGNORED = {"transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path"}


def config_dict(model) -> dict:
    """The model's config as JSON-able values, without transformers' bookkeeping keys."""
    data = json.loads(json.dumps(model.config.to_dict(), default=str))
    return {k: v for k, v in data.items() if not k.startswith("_") and k not in _CONFIG_IGNORED}
