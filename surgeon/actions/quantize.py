"""`quantize`: store frozen nn.Linear weights in NF4 or int8, so LoRA trains over a quantised base
(QLoRA, Dettmers et al. 2023).

    - do: quantize
      select: {role: [attn.q, attn.k, attn.v, attn.o, mlp.gate, mlp.up, mlp.down]}
      with: {format: nf4, block_size: 64}
    - do: lora
      select: {role: [attn.q, attn.v]}
      with: {r: 8}

The weight stays a parameter of the same name (a torchao tensor subclass, `surgeon.quant`); the
bias, if any, stays as it was. Only frozen weights can be quantised: a selected weight that is
trainable when the rule runs (`base: trainable`, an earlier `unfreeze`), a tied weight, or a module
that is not an nn.Linear is an error before anything changes, as is a later rule that would make a
quantised weight trainable. The diff holds no quantised tensor: loading re-applies the rule to
the same base, and quantisation is deterministic.
"""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field
from torch import nn

from .. import quant
from ..errors import SurgeonError
from ..lora.merge import parameter_names
from ..quant import QuantSpec
from .base import Action, params_config

_PLANNED = "_surgeon_quantize_planned"
_BLOCKS = {"block_size": (16, 4096), "scaler_block_size": (2, 4096)}  # powers of two in [lo, hi]


class QuantizeParams(pydantic.BaseModel):
    model_config = params_config()

    format: Literal["nf4", "int8"] = Field(
        description="nf4: 4-bit NormalFloat with double-quantised block scales (QLoRA); "
        "int8: symmetric int8 weight-only"
    )
    block_size: int | None = Field(
        None,
        description="elements per absmax scale; nf4: consecutive weight elements (default 64, as "
        "QLoRA); int8: input columns per group (default: one scale per output row)",
    )
    scaler_block_size: int | None = Field(
        None,
        description="nf4 only: block scales per double-quantisation block (default 256, as QLoRA, or "
        "the largest power of two dividing a weight's block count where 256 does not)",
    )

    @pydantic.model_validator(mode="after")
    def _sizes(self) -> QuantizeParams:
        for field, (lo, hi) in _BLOCKS.items():
            value = getattr(self, field)
            if value is not None and not (lo <= value <= hi and value & (value - 1) == 0):
                raise ValueError(f"{field} must be a power of two in [{lo}, {hi}] (got {value})")
        if self.format == "int8" and self.scaler_block_size is not None:
            raise ValueError("scaler_block_size applies to format nf4 only")
        return self

    def spec_for(self, shape: tuple[int, ...]) -> QuantSpec:
        """The spec for an (out, in) weight. nf4 without scaler_block_size: 256 (QLoRA's), or the
        largest power of two dividing the weight's block count when 256 does not (576 x 576 in
        blocks of 64 is 5,184 blocks: 64) — torchao needs whole scaler blocks; a pure function of
        the shape, so loading picks the same."""
        if self.format == "int8":
            return QuantSpec("int8", self.block_size)
        block = self.block_size or 64
        scaler = self.scaler_block_size
        if scaler is None:
            blocks = shape[0] * shape[1] // block
            scaler = min(256, blocks & -blocks) if blocks else 256  # blocks & -blocks: its largest 2^k factor
        return QuantSpec("nf4", block, scaler)


class Quantize(Action):
    name = "quantize"
    Params = QuantizeParams
    summary = "store frozen nn.Linear weights quantised (nf4 | int8, torchao) for QLoRA"

    def check(self, target, params: QuantizeParams, ctx) -> None:
        quant._torchao()  # a missing dependency is one line, before anything changes
        module = target.module
        if type(module) is not nn.Linear:
            raise SurgeonError(
                f"quantize: {target.display} is a {target.class_name}; quantize stores nn.Linear weights "
                "only (select the projections, e.g. role: [attn.q, attn.v, mlp.up])"
            )
        name = f"{target.path}.weight" if target.path else "weight"
        if name in ctx.ledger.quantized or id(module.weight) in _planned(ctx):
            raise SurgeonError(f"quantize: {name} is already quantised")
        others = [n for n in parameter_names(ctx.model).get(id(module.weight), []) if n != name]
        if others:
            raise SurgeonError(
                f"quantize: {name} is tied to {', '.join(others)}; quantising it would change both"
            )
        if _trainable_when_run(module.weight, name, ctx):
            raise SurgeonError(
                f"quantize: {name} is trainable when this rule runs; only frozen weights can be stored "
                "quantised (use base: frozen, or freeze it in an earlier rule)"
            )
        spec = params.spec_for(tuple(module.weight.shape))
        problem = quant.shape_problem(tuple(module.weight.shape), spec)
        if problem:
            raise SurgeonError(f"quantize: cannot store {name} as {spec.describe()}: {problem}")
        _planned(ctx).add(id(module.weight))

    def apply(self, target, params: QuantizeParams, ctx) -> None:
        ctx.quantize_weight(target.module, params.spec_for(tuple(target.module.weight.shape)))

    def finish(self, targets, params: QuantizeParams, ctx) -> None:
        stored = sum(ctx.rule.quantized.values())
        dense = sum(t.module.weight.numel() for t in targets) * 4
        specs = sorted({ctx.ledger.quantized[n][0].describe() for n in ctx.rule.quantized})
        ctx.note(
            f"{len(targets)} weights as {', '.join(specs)}: {stored / 2**20:.1f} MiB "
            f"(fp32 {dense / 2**20:.1f} MiB)"
        )


def _planned(ctx) -> set[int]:
    """ids of weights that rules checked earlier in this patch will quantise."""
    return ctx.__dict__.setdefault(_PLANNED, set())


def planned_or_quantized(weight: nn.Parameter, name: str, ctx) -> bool:
    """Whether `weight` is stored quantised, or will be by a rule checked before this one."""
    return name in ctx.ledger.quantized or id(weight) in _planned(ctx)


def _trainable_when_run(weight: nn.Parameter, name: str, ctx) -> bool:
    """Whether the weight will be trainable when this rule runs: its state after earlier patches
    (or the recipe's `base:` on a first patch), then the freeze/unfreeze rules checked before."""
    trainable = name in ctx.ledger.trainable if ctx.ledger.rules else ctx.base == "trainable"
    for _, action, targets in ctx.planned:
        if action.name in ("freeze", "unfreeze") and any(
            any(p is weight for p in t.module.parameters()) for t in targets
        ):
            trainable = action.name == "unfreeze"
    return trainable
