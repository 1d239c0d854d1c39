"""`linformer`: project keys and values along the sequence to k slots (Wang et al. 2020).

Keeps the module's Q/K/V/O weights and adds E, F (k × max_length) on the attention module
(`<attention>.surgeon_attention.proj_k` / `.proj_v`): they are added, trainable parameters in
the report and the diff. `init: segment_mean` starts E = F as "first token alone + mean
pooling over k-1 equal segments of the other positions", so the untrained model is already a
coarse approximation (MiniLM, 256 tokens, max_length 256: embedding cosine 0.76 at k=64, 0.86
at k=128 — it is meant to be trained); `random` is the reference implementation's uniform init. The segments span
max_length (default: the model's max positions), so shorter inputs fill only the first slots: a
model run at one length (the paper's setting) should set `max_length` to it — at 256 tokens
on a 512-position model, the default leaves half of the k slots empty. Inputs longer than
max_length are refused at run time with an error naming the module.
Causal modules are refused: the projection mixes future tokens into every slot.
`local_window: w` adds an exact ±w/2 band beside the k slots, in one softmax (Long-Short
Transformer, Zhu et al. 2021; see attention/kernels/short_range.py): no new parameters, O(n·w)
more work, and the neighbour-reading heads of pretrained models keep working.
"""

from __future__ import annotations

from typing import Literal

import pydantic

from ..attention.targets import check_attention_target
from ..attention.variants_compressed import LinformerAttention, max_positions
from ..errors import SurgeonError
from .base import Action, params_config
from .kernel_choice import Kernel, check_kernel_has_a_band, kernel_field
from .limits import Band, Length, Seed, check_added_elements, too_many_elements


class LinformerParams(pydantic.BaseModel):
    model_config = params_config()

    k: Length  # projected length; cost O(n·k)
    max_length: Length | None = None  # columns of E, F = longest input; default: the model's max positions
    share: Literal["none", "kv", "layer"] = "none"  # Linformer §4 sharing: F = E, one E for all layers
    init: Literal["segment_mean", "random"] = "segment_mean"
    seed: Seed = 0  # for init: random
    # > 0: every query also attends the keys within ±local_window/2 exactly, in the same softmax
    # (Long-Short Transformer, Zhu et al. 2021): what k slots cannot hold, e.g. "the previous token"
    local_window: Band = 0
    kernel: Kernel = kernel_field()  # the local_window band's kernel

    @pydantic.model_validator(mode="after")
    def _fits(self) -> LinformerParams:
        check_kernel_has_a_band(self.kernel, self.local_window)
        if self.max_length is not None:
            if self.k > self.max_length:
                raise ValueError(f"k={self.k} exceeds max_length={self.max_length}")
            reason = too_many_elements("each projection E, F", (self.k, self.max_length))
            if reason is not None:
                raise ValueError(reason)
        return self


def _max_length(params: LinformerParams, ctx) -> int | None:
    return params.max_length if params.max_length is not None else max_positions(ctx.model)


class Linformer(Action):
    name = "linformer"
    Params = LinformerParams
    summary = "Linformer: attend to k learned projections of the keys/values along the sequence"

    def check(self, target, params, ctx) -> None:
        check_attention_target(self.name, target, ctx,
                               causal_refused="the sequence projection would mix future tokens into every position")
        where = target.display
        length = _max_length(params, ctx)
        if length is None:
            raise SurgeonError(
                f"linformer: {where}: the model has no position limit; set max_length"
            )
        if params.k > length:
            raise SurgeonError(f"linformer: {where}: k={params.k} exceeds max_length={length} (the model's positions)")
        check_added_elements(self.name, where, "each projection E, F", (params.k, length))

    def apply(self, target, params, ctx) -> None:
        length = _max_length(params, ctx)
        weight = next(target.module.parameters())
        shared = ctx.state.get("linformer_proj") if params.share == "layer" else None
        variant = LinformerAttention(
            params.k, length, share=params.share, init=params.init, seed=params.seed, dtype=weight.dtype,
            device=weight.device, shared=shared, local_window=params.local_window, kernel=params.kernel,
            where=target.display,
        )  # fmt: skip
        if params.share == "layer" and shared is None:
            ctx.state["linformer_proj"] = variant.proj_k  # owned by the first layer
        ctx.attach_attention(target, variant)
        model_max = max_positions(ctx.model)
        if model_max is not None and length < model_max:
            ctx.note(f"{target.display}: inputs over max_length={length} tokens are refused (the model takes {model_max})")
