"""Exact LoRA merge: W ← round(W0 + Σ scale·B·A), computed in fp32 and rounded once.

`merge` keeps the original weight (not a subtraction: W0 + ΔW − ΔW drifts by ~1e-3 per cycle in
bf16, as PEFT 0.21's merge/unmerge does), so `unmerge` restores it bit for bit. Merging into a weight that
is tied to another module (lm_head ↔ input embeddings) would silently change both; it is
refused unless the LoRA rule says `untie: true`, in which case the adapted module gets its own
copy and the partner keeps the original.

`merge_pieces` is what a streaming export needs: per adapter, the base parameter name, where in
it the delta goes, and a callable giving the fp32 delta — it never touches the base weights, so
it works on a meta-device model whose LoRA tensors were loaded with
`load_state_dict(small_state, strict=False, assign=True)`.

A quantised base weight (`quantize`, QLoRA) merges into its dequantised fp32 values — what the
adapter was trained against — and the merged weight is a plain fp32 parameter in its place (it
cannot be rounded back into NF4/int8 without undoing the merge); `unmerge` puts the quantised
parameter itself back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.host import AdapterHost
from ..errors import SurgeonError
from ..quant import dequantize, is_quantized
from .host import LoraHost
from .layer import LoraAdapter


@dataclass
class MergePiece:
    param_name: str  # canonical base parameter name, e.g. "h.0.attn.c_attn.weight"
    index: tuple | None  # where in that base weight the delta goes (tuple of slices), None = whole
    delta: Callable[[], torch.Tensor]  # fp32, base weight's own layout, shaped like weight[index]
    adapter: str


def lora_hosts(model: nn.Module):
    """(module path, module, LoraHost) for every LoRA-adapted module."""
    for path, module in model.named_modules():
        host = LoraHost.on(module)
        if host is not None:
            yield path, module, host


def parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it is reachable by (more than one = tied)."""
    out: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(param), []).append(name)
    return out


def tied_partners(names: dict[int, list[str]], path: str, weight: nn.Parameter) -> list[str]:
    """The other names of the module at `path`'s weight (empty when untied); `names` is
    parameter_names(model)."""
    own = _weight_name(path)
    return [n for n in names.get(id(weight), [own]) if n != own]


def _weight_name(path: str) -> str:
    return f"{path}.weight" if path else "weight"


def _index(adapter: LoraAdapter) -> tuple | None:
    if adapter.out_range is None:
        return None
    part = slice(*adapter.out_range)
    # nn.Linear keeps (out, in): the part is a row range; Conv1D keeps (in, out): a column range
    return (part, slice(None)) if adapter.kind == "linear" else (slice(None), part)


def _selected(adapter: LoraAdapter, name: str, adapters: list[str] | None) -> bool:
    return adapter.active if adapters is None else name in adapters


def _check_names(model: nn.Module, adapters: list[str] | None) -> None:
    if adapters is None:
        return
    known = {name for _, _, host in lora_hosts(model) for name, _, _ in host.adapters()}
    unknown = [a for a in adapters if a not in known]
    if unknown:
        raise SurgeonError(
            f"no LoRA adapter named '{unknown[0]}' on this model "
            f"(LoRA adapters: {', '.join(sorted(known)) or 'none'})"
        )


def _tie_error(path: str, name: str, others: list[str]) -> SurgeonError:
    return SurgeonError(
        f"lora: cannot merge adapter '{name}' into {_weight_name(path)}: it is tied to "
        f"{', '.join(others)}, and merging would change both; add untie: true to the lora rule "
        f"to give {path} its own merged copy"
    )


def merge_pieces(model: nn.Module, adapters: list[str] | None = None) -> list[MergePiece]:
    """One piece per (adapter, module or fused part); active adapters by default.

    Raises SurgeonError for a tied weight unless the adapter's rule asked to untie. With untie,
    `param_name` is the adapted module's own weight name (e.g. `lm_head.weight`), which a tied
    checkpoint does not store: `untied_names` says which base tensor it starts from.
    """
    _check_names(model, adapters)
    sharers = parameter_names(model)
    pieces = []
    for path, module, host in lora_hosts(model):
        others = tied_partners(sharers, path, module.weight)
        for name, _, adapter in host.adapters():
            if not _selected(adapter, name, adapters):
                continue
            if others and not adapter.untie and host.tied_weight is None:
                raise _tie_error(path, name, others)
            pieces.append(MergePiece(_weight_name(path), _index(adapter), adapter.delta_weight, name))
    return pieces


def untied_names(model: nn.Module, adapters: list[str] | None = None) -> dict[str, str]:
    """For merges into tied weights (untie: true): every parameter name that must be written as
    its own tensor → the canonical base tensor it starts from. Both sides of the tie appear
    (the merged module, and its partner that keeps the unmerged values); a checkpoint holding
    them needs `tie_word_embeddings: false`."""
    sharers = parameter_names(model)
    out: dict[str, str] = {}
    for path, module, host in lora_hosts(model):
        shared = host.tied_weight if host.tied_weight is not None else module.weight  # merged: untied
        names = list(sharers.get(id(shared), []))
        if host.tied_weight is not None:
            names.append(_weight_name(path))
        if len(names) < 2:
            continue
        if any(_selected(a, n, adapters) for n, _, a in host.adapters()):
            for name in names:
                out[name] = names[0]
    return out


def non_mergeable(model: nn.Module) -> list[str]:
    """One line per added thing that can't be folded into the weights (bottleneck adapters)."""
    lines = []
    for path, module in model.named_modules():
        for child in module.children():
            if isinstance(child, AdapterHost) and not isinstance(child, LoraHost):
                for name, _, adapter in child.adapters():
                    count = sum(p.numel() for p in adapter.parameters())
                    lines.append(
                        f"{path}: {child.KIND} adapter '{name}' ({count:,} params) is a nonlinear "
                        "branch and cannot be merged into the weights"
                    )
    return lines


def _merged_value(module: nn.Module, host: LoraHost, merged: list[LoraAdapter]) -> torch.Tensor:
    """fp32 original + every merged adapter's delta, in the weight's own layout."""
    original = host.original_weight if host.original_weight is not None else module.weight.detach()
    new = dequantize(original) if is_quantized(original) else original.to(torch.float32, copy=True)
    for adapter in merged:
        index = _index(adapter)
        if index is None:
            new += adapter.delta_weight()
        else:
            new[index] += adapter.delta_weight()
    return new


@torch.no_grad()
def merge(model: nn.Module, adapters: list[str] | None = None) -> int:
    """Fold LoRA adapters (active ones by default) into the base weights in place; return how
    many weights changed. Outputs stay the same; the merged adapters stop adding in forward."""
    merge_pieces(model, adapters)  # name and tie checks: raises before anything changes
    sharers = parameter_names(model)
    plan = []  # (module, host, adapters merged there after this call)
    for _, module, host in lora_hosts(model):
        chosen = [a for n, _, a in host.adapters() if _selected(a, n, adapters)]
        if not any(not a.merged for a in chosen):
            continue
        plan.append((module, host, [a for _, _, a in host.adapters() if a.merged or a in chosen]))
    for path_module, host, merged in plan:  # check every weight first: all or nothing
        if not torch.isfinite(_merged_value(path_module, host, merged)).all():
            raise SurgeonError(
                f"lora: merging into {_path_of(model, path_module)}.weight gives non-finite values; "
                "nothing was merged"
            )
    for module, host, merged in plan:
        new = _merged_value(module, host, merged)
        quantized = is_quantized(host.original_weight if host.original_weight is not None else module.weight)
        if quantized:
            if host.original_weight is None:
                host.merge_state["original"] = module.weight  # the quantised parameter, kept as is
            module.weight = nn.Parameter(new, requires_grad=False)  # fp32: one rounding, none back to 4 bits
        elif host.original_weight is None:
            if len(sharers.get(id(module.weight), [])) > 1:
                # untie: the partner keeps the shared parameter; this module gets its own copy
                host.merge_state["tied"] = module.weight
                module.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
            host.merge_state["original"] = module.weight.detach().clone()
        if not quantized:
            module.weight.copy_(new.to(module.weight.dtype))  # round once
        for adapter in merged:
            adapter.merged = True
    return len(plan)


def _path_of(model: nn.Module, module: nn.Module) -> str:
    return next(path for path, m in model.named_modules() if m is module)


@torch.no_grad()
def unmerge(model: nn.Module) -> int:
    """Restore every merged weight bit for bit (and re-tie untied ones); return how many."""
    restored = 0
    for _, module, host in lora_hosts(model):
        if host.original_weight is None:
            continue
        if host.tied_weight is not None:
            module.weight = host.tied_weight  # the shared parameter was never modified
        elif is_quantized(host.original_weight):
            module.weight = host.original_weight  # the quantised parameter, never modified
        else:
            module.weight.copy_(host.original_weight)
        host.merge_state.clear()
        for _, _, adapter in host.adapters():
            adapter.merged = False
        restored += 1
    return restored
