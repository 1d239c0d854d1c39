"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

    h ← h + up(act(down(h)))      down: (dim → size), up: (size → dim), up zero-initialised

Placed on the output of the attention output projection and of the MLP down projection: on
post-LN BERT that is before the residual add + LayerNorm (as the paper and AdapterHub's Houlsby
config do); on pre-LN Llama/GPT-2 it is the sub-block's output before the residual add. The
zero up-projection makes the adapter the identity at init. Unlike LoRA it can't be merged into
the weights (the nonlinearity sits between down and up).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .host import AdapterHost

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh}


class Bottleneck(nn.Module):
    def __init__(self, dim: int, size: int, activation: str = "swish", *, device=None, dtype=None):
        super().__init__()
        self.activation = activation
        # "adapter_" prefixes keep these Linear children out of the role tables (up/down)
        self.adapter_down = nn.Linear(dim, size, device=device, dtype=dtype)
        self.adapter_up = nn.Linear(size, dim, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)
        self.active = True
        self.disabled = False

    @property
    def live(self) -> bool:
        return self.active and not self.disabled

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The residual branch only, up(act(down(h))) → (..., dim); the host adds h."""
        down = self.adapter_down(h.to(self.adapter_down.weight.dtype))  # (..., size)
        return self.adapter_up(ACTIVATIONS[self.activation](down))  # (..., dim)

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class BottleneckHost(AdapterHost):
    """`<module>.surgeon_adapter.<name>`: bottleneck adapters on a module's output."""

    ATTR = "surgeon_adapter"
    KIND = "bottleneck"

    def adapters(self):
        for name, child in self._modules.items():
            yield name, None, child

    def _hook(self, module, args, kwargs, output):
        if not isinstance(output, torch.Tensor):
            return output
        live = [a for _, _, a in self.adapters() if a.live]
        if not live:
            return output
        h = output
        # out of place: the branch reads h, so h must keep its value for backward
        return h + sum(adapter(h).to(h.dtype) for adapter in live)
