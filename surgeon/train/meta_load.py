"""A patched model without its weights, and where each of its tensors is stored.

`diff.load` reads the whole base into memory; a sharded run (`--strategy fsdp`) must not. Here
the model is built from config.json on the meta device (buffers real: rotary frequencies and
position ids are computed, not stored), the diff's recipes are re-applied to that skeleton, and
every parameter and buffer is mapped to the file and key it is read from: the diff file for the
tensors the ledger puts in the diff, the base's safetensors files for the rest. The checks are
`diff.load`'s (the base's content is the one the diff was made on, the diff's own bytes are the
ones its manifest digests); nothing is read but headers until a rank reads its slice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn

from ..binding import check_base, check_diff_file, fully_bound
from ..checkpoint import build_meta_model, inspect_checkpoint
from ..diff import check_stored_names, load_recipes, read_manifest
from ..engine import patch, surgery_of
from ..errors import CheckpointError, SurgeonError
from ..fs_marker import DIFF_FILE
from ..modelpath import resolve_model_path


@dataclass(frozen=True)
class Stored:
    """Where one tensor's values live: a safetensors file and the key inside it."""

    path: str
    key: str


def tensor_sources(model: nn.Module, base_dir: str, weight_map: dict[str, str], diff_file: str,
                   diff_names: set[str]) -> dict[int, Stored]:  # fmt: skip
    """id(tensor) -> where it is stored, for every parameter of `model` and every buffer the base
    stores. A parameter reachable by several names (tied embeddings) is found under any of them.
    Refuses a parameter that neither the diff nor the base holds under its own name (a checkpoint
    that needs transformers' key renaming on load)."""
    sources: dict[int, Stored] = {}
    names = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in names:
        if id(tensor) in sources:
            continue
        if name in diff_names:
            sources[id(tensor)] = Stored(diff_file, name)
        elif name in weight_map:
            sources[id(tensor)] = Stored(os.path.join(base_dir, weight_map[name]), name)
    for name, param in model.named_parameters():
        if id(param) not in sources and param.is_meta:
            raise SurgeonError(
                f"train: --strategy fsdp: {base_dir} stores no tensor {name} (the patched model's name for "
                "it); a sharded run reads each tensor by its own name and cannot apply transformers' key "
                "renaming — use --strategy ddp for this checkpoint"
            )
    return sources


def load_meta(base_dir: str | None, diff_dir: str, *, allow_pickle: bool = False,
              trust_base: bool = False) -> tuple[nn.Module, dict[int, Stored]]:  # fmt: skip
    """The patched model of `diff_dir` on `base_dir`, its parameters on the meta device, and
    `tensor_sources` for it. Checks as `diff.load` does (base content, the diff's bytes, exactly
    the ledger's tensors in the diff)."""
    manifest = read_manifest(diff_dir)
    base_dir = resolve_model_path(base_dir) if base_dir else manifest["base"]["path"]
    info = inspect_checkpoint(base_dir, allow_pickle=allow_pickle)
    if info.format != "safetensors":
        raise SurgeonError(
            f"train: --strategy fsdp reads each rank's slice of the base from safetensors files; {base_dir} "
            "holds pickle weights — convert it to safetensors, or use --strategy ddp"
        )
    check_base(manifest, info, diff_dir, trust_base=trust_base)
    if not trust_base and not fully_bound(manifest):
        raise SurgeonError(
            f"train: --strategy fsdp: {diff_dir} is a format-1 diff, whose base check needs the whole base "
            "in memory; re-save it with this surgeon (surgeon apply), or use --strategy ddp"
        )
    recipes = load_recipes(diff_dir, manifest)
    model, _ = build_meta_model(base_dir, real_buffers=True)
    model.config._name_or_path = base_dir  # as from_pretrained records it
    for recipe in recipes:
        patch(model, recipe)
    diff_file = os.path.join(diff_dir, DIFF_FILE)
    expected = set(surgery_of(model).ledger.diff_names())
    stored = _stored_names(diff_file)
    check_stored_names(diff_file, stored, expected)
    check_diff_file(manifest, diff_file)
    model.eval()
    return model, tensor_sources(model, base_dir, info.weight_map or _single_file(info), diff_file, expected)


def load_meta_base(base_dir: str, *, allow_pickle: bool = False) -> tuple[nn.Module, dict[int, Stored]]:
    """The unpatched base on the meta device (a distillation teacher) and `tensor_sources` for it."""
    info = inspect_checkpoint(base_dir, allow_pickle=allow_pickle)
    model, _ = build_meta_model(base_dir, real_buffers=True)
    model.requires_grad_(False).eval()
    return model, tensor_sources(model, base_dir, info.weight_map or _single_file(info), "", set())


def _single_file(info) -> dict[str, str]:
    return {name: info.files[0] for name in info.tensors}


def _stored_names(path: str) -> set[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return set(handle.keys())
    except FileNotFoundError:
        raise CheckpointError(f"{os.path.dirname(path) or '.'}: no {os.path.basename(path)}") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


__all__ = ["Stored", "load_meta", "load_meta_base", "tensor_sources"]
