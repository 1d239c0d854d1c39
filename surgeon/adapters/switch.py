"""Named adapters on one model: list them, choose which contribute, switch all off for a while.

Applies to LoRA and bottleneck adapters alike. Every adapter contributes until `set_active`
picks some. Switching does not touch requires_grad (the ledger owns it): an inactive adapter
simply receives no gradient.
"""

from __future__ import annotations

import contextlib

from torch import nn

from ..errors import SurgeonError
from .host import AdapterHost


def _all(model: nn.Module):
    for path, module in model.named_modules():
        for child in module.children():
            if isinstance(child, AdapterHost):
                for name, part, adapter in child.adapters():
                    yield path, child, name, adapter


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name on the model, sorted."""
    return sorted({name for _, _, name, _ in _all(model)})


def active_adapters(model: nn.Module) -> list[str]:
    return sorted({name for _, _, name, adapter in _all(model) if adapter.active})


def set_active(model: nn.Module, names: str | list[str] | None) -> None:
    """Make only `names` contribute (None: all of them)."""
    known = adapter_names(model)
    wanted = set(known) if names is None else {names} if isinstance(names, str) else set(names)
    unknown = sorted(wanted - set(known))
    if unknown:
        raise SurgeonError(
            f"no adapter named '{unknown[0]}' on this model (adapters: {', '.join(known) or 'none'})"
        )
    merged = sorted({f"{p} ({n})" for p, _, n, a in _all(model) if getattr(a, "merged", False)})
    if merged:
        raise SurgeonError(
            f"cannot switch adapters while LoRA is merged into the weights ({merged[0]}…); "
            "call surgeon.unmerge(model) first"
        )
    for _, _, name, adapter in _all(model):
        adapter.active = name in wanted


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block the model computes its base outputs (refused while LoRA is merged)."""
    merged = sorted({p for p, _, _, a in _all(model) if getattr(a, "merged", False)})
    if merged:
        raise SurgeonError(
            f"cannot disable adapters while LoRA is merged into the weights ({merged[0]}…); "
            "call surgeon.unmerge(model) first"
        )
    adapters = [adapter for _, _, _, adapter in _all(model)]
    before = [adapter.disabled for adapter in adapters]
    for adapter in adapters:
        adapter.disabled = True
    try:
        yield model
    finally:
        for adapter, flag in zip(adapters, before):
            adapter.disabled = flag
