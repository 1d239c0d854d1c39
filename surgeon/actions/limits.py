"""Bounds on the built-in actions' numeric parameters, checked when a recipe is validated.

A bad value is one error for its rule, with the file:line, the field and the limit with its
reason, before any model is loaded. The per-target checks that depend on the model (heads
dividing, a rank within min(in, out), a position inside the model's table, the size of the
tensors an action adds) stay in each action's `check`.

No torch import: recipes validate on a machine without the model.
"""

from __future__ import annotations

import math
from typing import Annotated

import pydantic
import pydantic.fields

from ..errors import SurgeonError

# Sequence lengths, windows, slot counts, block and bucket sizes, dilations, position indices.
# 2**24 is the largest count float32 holds exactly: transformers computes rotary angles from
# float32 positions, so past it two positions share an angle. It is also beyond any released
# model's context window.
MAX_POSITIONS = 2**24
POSITIONS_WHY = "2**24 positions, the largest count float32 represents exactly"

# Widths: a LoRA rank, a bottleneck size, a reduction factor. The widest weight of a released
# model (a 256k-entry vocabulary) is under 2**18; a rank can't exceed min(in, out) anyway.
MAX_WIDTH = 2**24
WIDTH_WHY = "2**24, wider than any weight of any released model"

# torch.Generator seeds are 64-bit; staying under 2**63 leaves room for the per-layer offsets
# some actions add (latent: seed + layer index) without overflowing torch's unsigned 64 bits.
MAX_SEED = 2**63 - 1
SEED_WHY = "2**63 - 1, the largest seed a 64-bit torch generator takes with room for per-layer offsets"

# Head groups (blockwise permutations): the groups must divide the layer's heads.
MAX_HEAD_GROUPS = 2**16
HEAD_GROUPS_WHY = "2**16, more groups than any model has heads"

# LSH hash rounds: each round is one more full pass over the sequence (Reformer, Kitaev et al.
# 2020, used 1 to 8).
MAX_HASH_ROUNDS = 256
HASH_ROUNDS_WHY = "256 rounds; each round is one more full pass over the sequence"

# A tensor an action adds (a Linformer projection, latent slots, a grown position table): the
# largest tensor of a 70B-parameter model (Llama-3-70B's 128,256 × 8,192 embedding table) has
# 1.05e9 elements, so anything over 2**31 is a typo, and 8 GiB per tensor in float32.
MAX_ADDED_ELEMENTS = 2**31

# LoRA's scale alpha/r multiplies the update in the weight's dtype; float16 (the narrowest
# float a model runs in) holds magnitudes up to 65504, and below its smallest subnormal the
# update rounds to 0.
FP16_MAX = 65504.0
FP16_SMALLEST = 2.0**-24


def _bounded(low: int, high: int, why: str):
    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be ≥ {low} (got {value})")
        if value > high:
            raise ValueError(f"{value:,} exceeds the limit of {high:,} ({why})")
        return value

    return pydantic.AfterValidator(check)


def _schema(low: int, high: int) -> pydantic.fields.FieldInfo:
    return pydantic.Field(json_schema_extra={"minimum": low, "maximum": high})


Length = Annotated[int, _bounded(1, MAX_POSITIONS, POSITIONS_WHY), _schema(1, MAX_POSITIONS)]
"""A positive number of positions: a window, a length, k, m, a block or bucket size, a dilation."""

Band = Annotated[int, _bounded(0, MAX_POSITIONS, POSITIONS_WHY), _schema(0, MAX_POSITIONS)]
"""A window that may be 0 (no band)."""

Position = Annotated[int, _bounded(0, MAX_POSITIONS - 1, POSITIONS_WHY), _schema(0, MAX_POSITIONS - 1)]
"""A position index, counted from 0."""

Width = Annotated[int, _bounded(1, MAX_WIDTH, WIDTH_WHY), _schema(1, MAX_WIDTH)]
"""A positive width: a rank, a bottleneck size, a reduction factor."""

Seed = Annotated[int, _bounded(0, MAX_SEED, SEED_WHY), _schema(0, MAX_SEED)]

HeadGroups = Annotated[int, _bounded(1, MAX_HEAD_GROUPS, HEAD_GROUPS_WHY), _schema(1, MAX_HEAD_GROUPS)]

HashRounds = Annotated[int, _bounded(1, MAX_HASH_ROUNDS, HASH_ROUNDS_WHY), _schema(1, MAX_HASH_ROUNDS)]


def check_scale(scale: float, what: str) -> None:
    """A multiplier applied in the weight's dtype must be finite and representable in float16."""
    if not math.isfinite(scale):
        raise ValueError(f"{what} = {scale} is not finite")
    if scale > FP16_MAX:
        raise ValueError(f"{what} = {scale:g} overflows float16 (largest value {FP16_MAX:g}); a half-precision "
                         "model would turn into inf/NaN")  # fmt: skip
    if scale < FP16_SMALLEST:
        raise ValueError(f"{what} = {scale:g} underflows float16 (smallest value 2**-24 ≈ {FP16_SMALLEST:.3g}); "
                         "the update would round to 0")  # fmt: skip


def too_many_elements(what: str, shape: tuple[int, ...]) -> str | None:
    """Why a tensor of `shape` that an action would add is refused, or None if it is not."""
    count = math.prod(shape)
    if count <= MAX_ADDED_ELEMENTS:
        return None
    dims = " × ".join(f"{d:,}" for d in shape)
    return (f"{what} would be {dims} = {count:,} elements, over the limit of 2**31 (larger than any tensor "
            "of a 70B-parameter model; 8 GiB in float32)")  # fmt: skip


def check_added_elements(action: str, where: str, what: str, shape: tuple[int, ...]) -> None:
    """Refuse, before anything is allocated (also on a meta-device dry run), a tensor to add
    with more than MAX_ADDED_ELEMENTS elements."""
    reason = too_many_elements(what, shape)
    if reason is not None:
        raise SurgeonError(f"{action}: {where}: {reason}")
