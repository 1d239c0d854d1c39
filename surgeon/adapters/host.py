"""Where adapters live: a child module of the adapted module, plus a forward hook on it.

Why a hook and a child rather than a wrapper module (PEFT's `base_layer`): the adapted module
keeps its class and its parameter names (`q_proj.weight`, never `q_proj.base_layer.weight`), so
diffs, merged exports and the base checkpoint keep matching name for name, and every selector
and role still finds the module. The adapter tensors are ordinary parameters of the child
(`<path>.surgeon_lora.<name>.lora_A`), so the ledger, `state_dict` and
`load_state_dict(..., assign=True)` see them. The hook is a bound method of the child, so
`copy.deepcopy` and pickling carry it to the copy's own child.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class AdapterHost(nn.Module):
    """Holds the adapters of one module and adds their outputs to the module's output."""

    ATTR: ClassVar[str] = ""
    KIND: ClassVar[str] = ""  # "lora" | "bottleneck": for messages and listings
    # LoRA's hook runs before any other: it is part of the projection (W0 + BA), so a
    # bottleneck on the same module sees the same output merged or not
    FIRST: ClassVar[bool] = False

    @classmethod
    def on(cls, module: nn.Module) -> AdapterHost | None:
        host = module._modules.get(cls.ATTR)
        return host if isinstance(host, cls) else None

    @classmethod
    def ensure(cls, module: nn.Module, **kwargs) -> AdapterHost:
        """The host on `module`, created (holding no parameters) and hooked if missing."""
        host = cls.on(module)
        if host is None:
            host = cls(**kwargs)
            host.train(module.training)
            module.add_module(cls.ATTR, host)
            module.register_forward_hook(host._hook, with_kwargs=True, prepend=cls.FIRST)
        return host

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        x = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(output, torch.Tensor):
            return output
        return self.add_to(output, x)

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def adapters(self):
        """(name, part or None, adapter module) for every adapter held here."""
        raise NotImplementedError
