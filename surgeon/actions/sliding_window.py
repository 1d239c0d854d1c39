"""`sliding_window`: Longformer attention (Beltagy et al., 2020) on selected self-attention
modules, keeping their Q/K/V/O weights.

```yaml
- do: sliding_window
  select: {role: attn}
  with:
    window: {start: 64, end: 256}   # per layer, growing with depth (the paper's best layout);
                                    # or an int, or a list with one value per layer
    dilation: [1, 1, 2, 2]          # per head group (equal contiguous slices of the heads)
    global_tokens: [0]              # e.g. [CLS]; per call also model(..., global_attention_mask=m)
    kernel: auto                    # auto (flex on CUDA, sdpa on CPU), sdpa or flex
```
`window` w means ±w/2 on bidirectional modules and a look-back of w keys (itself included) on
causal ones (`module.is_causal`). A window covering the input is exactly dense attention.
"""

from __future__ import annotations

from typing import Annotated

import pydantic

from ..attention.targets import check_attention_target
from ..attention.variants_local import SlidingWindowVariant, as_list, heads_of
from ..errors import SurgeonError
from .base import Action, params_config
from .kernel_choice import Kernel, kernel_field
from .limits import Length, Position


class WindowGrowth(pydantic.BaseModel):
    """Window growing linearly with depth from the first layer to the last (rounded to even)."""

    model_config = params_config()
    start: Length
    end: Length


class SlidingWindowParams(pydantic.BaseModel):
    model_config = params_config()
    window: Length | Annotated[list[Length], pydantic.Field(min_length=1)] | WindowGrowth = pydantic.Field(
        description="keys per query: ±window/2 (bidirectional) or look-back window (causal)"
    )
    dilation: Length | Annotated[list[Length], pydantic.Field(min_length=1)] = pydantic.Field(
        1, description="dilation, one value per head group"
    )
    global_tokens: list[Position] = pydantic.Field(
        default_factory=list, description="positions that attend to and are attended by all"
    )
    block_size: Length | None = pydantic.Field(None, description="kernel query block (tuning only)")
    kernel: Kernel = kernel_field()


def max_positions(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def layer_value(action: str, target, values: list[int], what: str) -> int:
    if len(values) == 1:
        return values[0]
    if target.layer is None:
        raise SurgeonError(
            f"{action}: {target.path} ({target.class_name}) is not in a layer stack; "
            f"a per-layer {what} needs one"
        )
    if len(values) != target.layer.count:
        raise SurgeonError(
            f"{action}: {what} lists {len(values)} values but {target.layer.stack} has "
            f"{target.layer.count} layers ({target.path}, {target.class_name})"
        )
    return values[target.layer.index]


def resolve_window(target, window) -> int:
    if isinstance(window, WindowGrowth):
        if target.layer is None or target.layer.count == 1:
            return window.start
        frac = target.layer.index / (target.layer.count - 1)
        return 2 * round((window.start + (window.end - window.start) * frac) / 2)
    return layer_value("sliding_window", target, as_list(window), "window")


class SlidingWindow(Action):
    name = "sliding_window"
    Params = SlidingWindowParams
    summary = "Longformer sliding-window attention (dilation, global tokens) in place of dense"

    def check(self, target, params, ctx) -> None:
        check_attention_target(self.name, target, ctx)
        where = f"{target.path} ({target.class_name})"
        window = resolve_window(target, params.window)
        if window <= 0:  # a growth from 1 rounds to 0 in the first layers
            raise SurgeonError(f"sliding_window: window must be >= 1, got {window} for {where}")
        dils = as_list(params.dilation)
        heads = heads_of(target.module)
        if heads is not None and heads % len(dils):
            raise SurgeonError(
                f"sliding_window: {len(dils)} dilation head groups do not divide the {heads} heads of {where}"
            )
        limit = max_positions(ctx.model)
        for pos in params.global_tokens:
            if limit is not None and pos >= limit:
                raise SurgeonError(
                    f"sliding_window: global token position {pos} is out of range [0, {limit}) for {where}"
                )

    def apply(self, target, params, ctx) -> None:
        dils = as_list(params.dilation)
        variant = SlidingWindowVariant(
            window=resolve_window(target, params.window),
            dilation=dils[0] if len(dils) == 1 else dils,
            global_tokens=sorted(set(params.global_tokens)),
            block_size=params.block_size,
            causal=bool(getattr(target.module, "is_causal", False)),
            kernel=params.kernel,
        )
        ctx.attach_attention(target, variant)
