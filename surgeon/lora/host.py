"""The `surgeon_lora` child of a LoRA-adapted module and its forward hook."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.host import AdapterHost
from .layer import LoraAdapter


class LoraHost(AdapterHost):
    """`<module>.surgeon_lora.<name>` is a LoraAdapter for a whole module; for parts of a fused
    projection it is a ModuleDict `<module>.surgeon_lora.<name>.<part>` (e.g. `.q`, `.v`)."""

    ATTR = "surgeon_lora"
    KIND = "lora"
    FIRST = True

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # "linear" | "conv1d" | "embedding"
        # merge state (surgeon.lora.merge), kept in a plain dict so that nn.Module does not
        # register the saved tensors as parameters: "original" (the weight before merging, bit
        # for bit) and "tied" (the shared parameter, when the merge untied this module)
        self.merge_state: dict = {}

    @property
    def original_weight(self) -> torch.Tensor | None:
        return self.merge_state.get("original")

    @property
    def tied_weight(self) -> nn.Parameter | None:
        return self.merge_state.get("tied")

    def adapters(self):
        for name, child in self._modules.items():
            if isinstance(child, LoraAdapter):
                yield name, None, child
            else:
                for part, adapter in child.items():
                    yield name, part, adapter

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # In place: the base output is a fresh tensor that the frozen base op did not save
        # for backward (a frozen Linear/Conv1D/Embedding saves its weight or indices only),
        # so adding into it avoids one output-sized allocation per adapted module.
        for _, _, adapter in self.adapters():
            if not adapter.live:
                continue
            delta = adapter.delta(x)  # (..., out_part)
            if adapter.out_range is None:
                output.add_(delta, alpha=adapter.scale)
            else:
                start, stop = adapter.out_range
                output[..., start:stop].add_(delta, alpha=adapter.scale)
        return output
