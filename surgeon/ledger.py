"""The one record of what surgery did. The report and the diff both read it.

Names are canonical parameter names of the model (`model.named_parameters()`, tied weights
appear once). Base parameters are those present before the first rule; added tensors are
everything an action registered through the context. The trainable set is kept here, and
`check_consistent` verifies it against the live `requires_grad` flags.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .quant import QuantSpec


@dataclass
class RuleRecord:
    index: int
    action: str
    select: str
    params: dict
    line: int | None
    source: str
    matched: list[str] = field(default_factory=list)
    made_trainable: dict[str, int] = field(default_factory=dict)  # name -> numel
    frozen: dict[str, int] = field(default_factory=dict)
    # name -> elements this rule added: a whole new tensor, or the growth of a resized base tensor
    added: dict[str, int] = field(default_factory=dict)
    attention: list[str] = field(default_factory=list)
    quantized: dict[str, int] = field(default_factory=dict)  # name -> bytes stored
    notes: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source

    @property
    def label(self) -> str:
        return f"rule {self.index + 1} ({self.action})"


class Ledger:
    def __init__(self, model: nn.Module):
        self.base: dict[str, int] = {}  # canonical name -> numel, before any rule
        self.base_dtype: dict[str, torch.dtype] = {}
        self.trainable: dict[str, str] = {}  # name -> who made it trainable ("base" or rule label)
        self.added: dict[str, str] = {}  # name -> rule label
        self.added_numel: dict[str, int] = {}
        self.resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # name -> (old, new)
        # frozen base weights stored quantised: name -> (spec, bytes stored); the diff holds none of
        # them (the rule recomputes them from the base), the report counts their bytes
        self.quantized: dict[str, tuple[QuantSpec, int]] = {}
        self.rules: list[RuleRecord] = []
        for name, param in model.named_parameters():
            self.base[name] = param.numel()
            self.base_dtype[name] = param.dtype
        self._names = {id(p): n for n, p in model.named_parameters()}

    # ---- updates (only SurgeryContext calls these) ----------------------------------
    def refresh_names(self, model: nn.Module) -> None:
        self._names = {id(p): n for n, p in model.named_parameters()}
        for name, buffer in model.named_buffers():
            self._names.setdefault(id(buffer), name)

    def name_of(self, tensor: torch.Tensor) -> str:
        return self._names[id(tensor)]

    # ---- reads -----------------------------------------------------------------------
    @property
    def base_total(self) -> int:
        return sum(self.base.values())

    @property
    def added_total(self) -> int:
        return sum(self.added_numel.values()) + sum(
            _numel(new) - _numel(old) for old, new in self.resized.values()
        )

    def split(self, name: str) -> tuple[int, int]:
        """(base, added) elements of parameter `name`: an added tensor is all added, a resized base
        tensor (a grown position table) is its old size plus the growth, any other is all base."""
        if name in self.added:
            return 0, self.added_numel[name]
        if name in self.resized:
            old, new = self.resized[name]
            return _numel(old), _numel(new) - _numel(old)
        return self.base.get(name, 0), 0

    def trainable_split(self) -> tuple[int, int]:
        """(base, added) elements of the trainable parameters; their sum is the trainable total."""
        parts = [self.split(name) for name in self.trainable]
        return sum(b for b, _ in parts), sum(a for _, a in parts)

    def trainable_owners(self) -> dict[str, RuleRecord | None]:
        """Each trainable tensor -> the rule that last made it trainable (None: `base: trainable`).
        Every trainable tensor is counted under exactly one owner, so per-rule counts sum to the total."""
        owners: dict[str, RuleRecord | None] = dict.fromkeys(self.trainable)
        for rule in self.rules:
            for name in rule.made_trainable:
                if name in owners:
                    owners[name] = rule
        return owners

    def quantized_bytes(self) -> tuple[int, int]:
        """(elements, bytes stored) of the quantised weights."""
        return sum(self.base[n] for n in self.quantized), sum(b for _, b in self.quantized.values())

    def trainable_names(self) -> list[str]:
        return sorted(self.trainable)

    def diff_names(self) -> list[str]:
        """Exactly the tensors a diff must hold: trainable ones and added ones."""
        return sorted(set(self.trainable) | set(self.added))

    def check_consistent(self, model: nn.Module) -> None:
        live = {n for n, p in model.named_parameters() if p.requires_grad}
        if live != set(self.trainable):
            extra = sorted(live - set(self.trainable))[:3]
            missing = sorted(set(self.trainable) - live)[:3]
            raise RuntimeError(
                f"surgeon ledger out of sync with requires_grad: trainable but unrecorded {extra}, "
                f"recorded but frozen {missing} (was requires_grad changed outside surgeon?)"
            )


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for size in shape:
        out *= size
    return out
