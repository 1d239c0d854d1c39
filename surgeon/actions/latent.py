"""`latent`: Perceiver-style latent bottleneck for self-attention (Jaegle et al. 2021).

m learned latent queries per KV head (`<attention>.surgeon_attention.latents`, added and
trainable) read K and V into m summary slots; tokens then attend to the slots: O(n·m). The
latents are new random tensors, so the untrained model is only a rough approximation; the
`train` step makes it good. Causal modules are refused: every slot mixes all positions.
`local_window: w` adds an exact ±w/2 band beside the slots, in one softmax (Long-Short
Transformer, Zhu et al. 2021; see attention/kernels/short_range.py).
"""

from __future__ import annotations

from typing import Literal

import pydantic

from ..attention.targets import check_attention_target
from ..attention.variants_compressed import LatentAttention, kv_heads_and_dim
from ..errors import SurgeonError
from .base import Action, params_config
from .kernel_choice import Kernel, check_kernel_has_a_band, kernel_field
from .limits import Band, Length, Seed, check_added_elements


class LatentParams(pydantic.BaseModel):
    model_config = params_config()

    m: Length  # number of latent slots; cost O(n·m)
    init: Literal["random"] = "random"  # N(0, 1) latents (identical latents could never separate)
    seed: Seed = 0  # layer i draws its latents with seed + i
    # "latent": slot keys = the latents themselves (two passes over the tokens); "attended":
    # slot keys = the latent-weighted mean of the token keys (a third pass, ~1.5x slower at
    # n = 16384). The two distil to the same MiniLM fidelity (benchmarks/README.md), so the
    # faster one is the default.
    summary_keys: Literal["attended", "latent"] = "latent"
    # > 0: every query also attends the keys within ±local_window/2 exactly, in the same softmax
    # (Long-Short Transformer, Zhu et al. 2021): what m slots cannot hold, e.g. "the previous token"
    local_window: Band = 0
    kernel: Kernel = kernel_field()  # the local_window band's kernel

    @pydantic.model_validator(mode="after")
    def _band(self) -> LatentParams:
        check_kernel_has_a_band(self.kernel, self.local_window)
        return self


class Latent(Action):
    name = "latent"
    Params = LatentParams
    summary = "Perceiver-style latents: tokens attend to m learned summaries of the keys/values"

    def check(self, target, params, ctx) -> None:
        check_attention_target(self.name, target, ctx, causal_refused="latent slots would mix future tokens")
        where = target.display
        shape = kv_heads_and_dim(target.module)
        if shape is None:
            raise SurgeonError(f"latent: {where}: cannot tell its number of heads and head size")
        kv_heads, head_dim = shape
        check_added_elements(self.name, where, "the latents", (kv_heads, params.m, head_dim))

    def apply(self, target, params, ctx) -> None:
        kv_heads, head_dim = kv_heads_and_dim(target.module)
        weight = next(target.module.parameters())
        # One seed per layer: identical latents in every layer would be a needless tie.
        seed = params.seed + (target.layer.index if target.layer is not None else 0)
        variant = LatentAttention(
            params.m, kv_heads, head_dim, seed=seed, summary_keys=params.summary_keys,
            local_window=params.local_window, kernel=params.kernel, dtype=weight.dtype, device=weight.device,
            where=target.display,
        )  # fmt: skip
        ctx.attach_attention(target, variant)
