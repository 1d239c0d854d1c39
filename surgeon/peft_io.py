"""PEFT interoperability: surgeon LoRA diffs <-> PEFT LoRA adapter directories.

PEFT's saved format (../shared/DESIGN.md §3, checked against peft 0.21): `adapter_config.json`
and `adapter_model.safetensors` with keys `base_model.model.<module path>.lora_A.weight`
(r × in) and `.lora_B.weight` (out × r), adapter name stripped; embeddings use
`lora_embedding_A` (r × num_embeddings) / `lora_embedding_B` (dim × r) without `.weight`.
GPT-2's Conv1D keeps the same A/B shapes with `fan_in_fan_out: true` (the delta is transposed
into the (in, out) weight). The scale is `lora_alpha / r`, or `lora_alpha / √r` with
`use_rslora`; per-module ranks and alphas go in `rank_pattern` / `alpha_pattern`, whose keys
PEFT matches as `(.*\\.)?(key)$` against module names.

Only plain LoRA on whole modules maps: BitFit, unfrozen layers, adapters, attention variants
and LoRA on a slice of a fused projection (GPT-2 `c_attn` q/v: PEFT adapts `c_attn` as a
whole) have no PEFT form and are refused by name. Going the other way, PEFT features that
change the function (DoRA, LoRA biases, `modules_to_save`, trainable tokens …) are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass

import torch

from .checkpoint import build_meta_model, inspect_checkpoint, read_json_in
from .errors import CheckpointError, SurgeonError
from .export import LORA_MARK, MetaDiff, open_meta_diff
from .fsutil import atomic_dir, check_output

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LORA_ACTION = "lora"
_KEY = re.compile(r"^(?P<path>.+)\.(?P<which>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?P<weight>\.weight)?$")

# adapter_config.json settings that change what the adapter computes and that surgeon's LoRA
# does not reproduce: each must be absent or equal to its no-op value.
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "use_bdlora": (None, False),
    "megatron_config": (None,),
}


@dataclass
class LoraModule:
    """One module's LoRA of one adapter, in surgeon's layout: A (r × in), B (out × r)."""

    path: str
    kind: str  # "linear" | "conv1d" | "embedding"
    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    rslora: bool
    dropout: float

    @property
    def r(self) -> int:
        return int(self.a.shape[0])

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def module_kind(module: torch.nn.Module) -> str | None:
    names = {cls.__name__ for cls in type(module).__mro__}
    if "Conv1D" in names:
        return "conv1d"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return None


# ---- surgeon -> PEFT ---------------------------------------------------------------------
def export_peft(
    diff_dir: str,
    out_dir: str,
    base_dir: str | None = None,
    *,
    adapter: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the LoRA of `diff_dir` as a PEFT adapter directory; return the adapter config.

    `adapter`: which named adapter to write when the diff holds several.
    """
    from safetensors.torch import save_file

    manifest_base = None
    if base_dir is None:
        from .diff import read_manifest

        manifest_base = read_manifest(diff_dir)["base"]["path"]
    check_output(out_dir, [base_dir or manifest_base, diff_dir], overwrite=overwrite)
    meta = open_meta_diff(diff_dir, base_dir)
    modules = _surgeon_lora(meta, diff_dir, adapter)
    config = _peft_config(modules, meta.base_dir)
    tensors = {}
    for m in modules:
        if m.kind == "embedding":
            tensors[f"{PEFT_PREFIX}{m.path}.lora_embedding_A"] = m.a.contiguous()
            tensors[f"{PEFT_PREFIX}{m.path}.lora_embedding_B"] = m.b.contiguous()
        else:
            tensors[f"{PEFT_PREFIX}{m.path}.lora_A.weight"] = m.a.contiguous()
            tensors[f"{PEFT_PREFIX}{m.path}.lora_B.weight"] = m.b.contiguous()
    with atomic_dir(out_dir, [meta.base_dir, diff_dir], overwrite=overwrite, kind="peft-adapter") as tmp:
        save_file(tensors, os.path.join(tmp, PEFT_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, PEFT_CONFIG), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
            handle.write("\n")
    return config


def _surgeon_lora(meta: MetaDiff, diff_dir: str, adapter: str | None) -> list[LoraModule]:
    ledger = meta.surgery.ledger
    problems = []
    for rule in meta.surgery.rules:
        if rule.action != LORA_ACTION:
            problems.append(f"{rule.label} at {rule.where}: only LoRA maps to PEFT; {rule.action} has no PEFT form")
    trained = meta.trained_base_names()
    if trained and not problems:
        problems.append(
            f"base tensor {trained[0]} is trained ({ledger.trainable[trained[0]]})"
            + (f", and {len(trained) - 1} more" if len(trained) > 1 else "")
            + "; a PEFT LoRA adapter carries only LoRA weights"
        )
    parsed: dict[tuple[str, str], dict[str, str]] = {}  # (adapter, module path) -> {"A"|"B": name}
    for name in meta.added_names():
        if LORA_MARK not in name:
            if not problems:
                problems.append(f"added tensor {name} ({ledger.added[name]}) is not LoRA and has no PEFT form")
            continue
        path, rest = name.split(LORA_MARK, 1)
        parts = rest.split(".")
        if len(parts) != 2:
            problems.append(
                f"LoRA on the {parts[1]} slice of the fused projection {path} ({ledger.added[name]}): "
                "PEFT can only adapt a fused projection as a whole"
            )
            continue
        parsed.setdefault((parts[0], path), {})[parts[1].removeprefix("lora_")] = name
    if problems:
        lines = list(dict.fromkeys(problems))
        raise SurgeonError(f"{diff_dir} cannot be exported as a PEFT adapter:\n" + "\n".join(f"  {p}" for p in lines))
    adapters = sorted({a for a, _ in parsed})
    if not adapters:
        raise SurgeonError(f"{diff_dir} holds no LoRA weights: nothing to export to PEFT")
    if adapter is None:
        if len(adapters) > 1:
            raise SurgeonError(f"{diff_dir} holds the adapters {', '.join(adapters)}; choose one (--adapter NAME)")
        adapter = adapters[0]
    elif adapter not in adapters:
        raise SurgeonError(f"{diff_dir} has no adapter named {adapter!r}; it holds {', '.join(adapters)}")

    state = dict(meta.model.named_parameters())
    state.update(dict(meta.model.named_buffers()))
    modules = []
    for (name, path), found in sorted(parsed.items()):
        if name != adapter:
            continue
        if set(found) != {"A", "B"}:
            raise CheckpointError(f"{diff_dir}: LoRA of {path} is missing lora_{'B' if 'A' in found else 'A'}")
        lora = meta.model.get_submodule(found["A"].rsplit(".", 1)[0])  # the LoraAdapter
        modules.append(
            LoraModule(
                path, lora.kind, state[found["A"]].detach().float(), state[found["B"]].detach().float(),
                float(lora.alpha), bool(lora.rslora), float(lora.dropout),
            )
        )  # fmt: skip
    return modules


def _peft_config(modules: list[LoraModule], base_dir: str) -> dict:
    """One PEFT LoraConfig dict; modules whose rank or scale differ from the first get patterns."""
    first = modules[0]
    rank_pattern, alpha_pattern = {}, {}
    for m in modules:
        if m.r != first.r:
            rank_pattern[re.escape(m.path)] = m.r
        # same scale under the global rslora flag: alpha' = scale · (r or √r)
        alpha = m.scaling * (math.sqrt(m.r) if first.rslora else m.r)
        if not math.isclose(alpha, first.alpha, rel_tol=1e-9):
            alpha_pattern[re.escape(m.path)] = _number(alpha)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": os.path.abspath(base_dir),
        "r": first.r,
        "lora_alpha": _number(first.alpha),
        "lora_dropout": first.dropout,
        "target_modules": sorted(m.path for m in modules),
        "fan_in_fan_out": any(m.kind == "conv1d" for m in modules),
        "use_rslora": first.rslora,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
        "inference_mode": True,
    }


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


# ---- PEFT -> surgeon ---------------------------------------------------------------------
def read_peft(peft_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter config and tensors of a PEFT LoRA directory, validated."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(peft_dir, PEFT_CONFIG)
    config = read_json_in(peft_dir, PEFT_CONFIG, "a PEFT adapter directory")
    if config.get("peft_type") != "LORA":
        raise SurgeonError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters can be imported")
    for key, allowed in _UNSUPPORTED.items():
        if key in config and config[key] not in allowed:
            raise SurgeonError(f"{path}: {key}: {config[key]!r} is not supported by surgeon's LoRA (only {allowed[0]!r})")
    weights = os.path.join(peft_dir, PEFT_WEIGHTS)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(peft_dir, "adapter_model.bin")):
            raise CheckpointError(f"{peft_dir}: adapter_model.bin is a pickle file; save the adapter with safetensors")
        raise CheckpointError(f"{peft_dir}: no {PEFT_WEIGHTS}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: corrupt or truncated safetensors file ({exc})") from None
    return config, tensors


def _pattern_value(patterns: dict, path: str, default):
    """PEFT's `get_pattern_key`: the first key matching `(.*\\.)?(key)$`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def import_peft(
    peft_dir: str,
    out_diff_dir: str,
    base_dir: str | None = None,
    *,
    name: str = "default",
    overwrite: bool = False,
) -> dict:
    """Turn a PEFT LoRA adapter into a surgeon diff (recipe + diff.safetensors); return its manifest.

    The base model is only built on the meta device: no base weight is read.
    """
    from . import diff as diff_module
    from .engine import patch

    config, tensors = read_peft(peft_dir)
    if base_dir is None:
        base_dir = config.get("base_model_name_or_path")
        if not base_dir or not os.path.isfile(os.path.join(base_dir, "config.json")):
            raise SurgeonError(
                f"{peft_dir}: base_model_name_or_path {base_dir!r} is not a local model directory; pass --base MODEL_DIR"
            )
    check_output(out_diff_dir, [base_dir, peft_dir], overwrite=overwrite)
    inspect_checkpoint(base_dir)
    model, _ = build_meta_model(base_dir)
    modules = dict(model.named_modules())
    found: dict[str, dict[str, torch.Tensor]] = {}
    peft_paths: dict[str, str] = {}
    for key, tensor in tensors.items():
        if key.startswith(PEFT_PREFIX) and key.endswith(".base_layer.weight"):
            _check_saved_base(key, tensor, peft_dir, base_dir, modules, model)
            continue
        match = _KEY.match(key.removeprefix(PEFT_PREFIX))
        if not key.startswith(PEFT_PREFIX) or match is None:
            raise SurgeonError(f"{peft_dir}/{PEFT_WEIGHTS}: tensor {key} is not a LoRA A/B weight surgeon can import")
        peft_path = match["path"]
        path = _local_path(peft_path, modules, model)
        if path is None:
            raise SurgeonError(f"{peft_dir}: module {peft_path} (from tensor {key}) does not exist in {base_dir}")
        peft_paths[path] = peft_path
        found.setdefault(path, {})[match["which"][-1]] = tensor
    if not found:
        raise SurgeonError(f"{peft_dir}/{PEFT_WEIGHTS} holds no LoRA tensors")

    rslora = bool(config.get("use_rslora", False))
    dropout = float(config.get("lora_dropout") or 0.0)
    groups: dict[tuple, list[str]] = {}
    for path, pair in sorted(found.items()):
        if set(pair) != {"A", "B"}:
            raise SurgeonError(f"{peft_dir}: {path} has lora_{'A' if 'A' in pair else 'B'} but not its pair")
        kind = module_kind(modules[path])
        if kind is None:
            raise SurgeonError(f"{peft_dir}: {path} is a {type(modules[path]).__name__}; surgeon imports LoRA on Linear, Conv1D, Embedding")
        r = int(pair["A"].shape[0])
        alpha = _pattern_value(config.get("alpha_pattern"), peft_paths[path], config.get("lora_alpha", 8))
        groups.setdefault((r, _number(alpha)), []).append(path)
    rules = []
    for (r, alpha), paths in groups.items():
        regex = "|".join(re.escape(p) for p in paths)
        rules.append(
            {
                "do": LORA_ACTION,
                "select": {"regex": regex if len(paths) == 1 else f"(?:{regex})"},
                "with": {"r": r, "alpha": alpha, "dropout": dropout, "rslora": rslora, "name": name},
            }
        )
    recipe = {"surgeon": 1, "rules": rules}
    patch(model, recipe)
    state = dict(model.named_parameters())
    loaded = {}
    for path, pair in found.items():
        for which, tensor in pair.items():
            target = f"{path}{LORA_MARK}{name}.lora_{which}"
            if target not in state:
                raise RuntimeError(f"import bug: the lora action made no tensor {target}")
            if tuple(tensor.shape) != tuple(state[target].shape):
                raise SurgeonError(
                    f"{peft_dir}: {path} lora_{which} has shape {tuple(tensor.shape)}, "
                    f"surgeon's LoRA of r={state[target].shape[0] if which == 'A' else state[target].shape[1]} "
                    f"on this module expects {tuple(state[target].shape)}"
                )
            loaded[target] = tensor.to(state[target].dtype)
    model.load_state_dict(loaded, strict=False, assign=True)
    return diff_module.save_diff(model, out_diff_dir, base_dir=base_dir, overwrite=overwrite, inputs=[peft_dir])


def _check_saved_base(key: str, tensor: torch.Tensor, peft_dir: str, base_dir: str, modules, model) -> None:
    """PEFT saves the whole embedding beside embedding LoRA (`save_embedding_layers`, for resized
    vocabularies). An unchanged copy is redundant; a changed one is not LoRA and can't be imported."""
    from .export import ShardReader

    peft_path = key.removeprefix(PEFT_PREFIX).removesuffix(".base_layer.weight")
    path = _local_path(peft_path, modules, model)
    info = inspect_checkpoint(base_dir)
    name = f"{path}.weight" if path is not None else None
    if name not in info.weight_map:
        raise SurgeonError(f"{peft_dir}: saved base weight {key} has no counterpart in {base_dir}")
    reader = ShardReader(os.path.join(base_dir, info.weight_map[name]))
    try:
        same = reader.shape(name) == tuple(tensor.shape) and torch.equal(reader.read(name), tensor.to(reader.dtype(name)))
    finally:
        reader.close()
    if not same:
        raise SurgeonError(
            f"{peft_dir}: the adapter carries its own copy of {peft_path}.weight that differs from {base_dir} "
            "(a resized or trained embedding); surgeon imports LoRA weights only"
        )


def _local_path(peft_path: str, modules: dict, model) -> str | None:
    """PEFT paths are relative to the model PEFT wrapped (maybe a task model around ours)."""
    if peft_path in modules:
        return peft_path
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and peft_path.startswith(prefix + ".") and peft_path[len(prefix) + 1 :] in modules:
        return peft_path[len(prefix) + 1 :]
    if prefix and f"{prefix}.{peft_path}" in modules:
        return f"{prefix}.{peft_path}"
    return None
