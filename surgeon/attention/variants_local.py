"""Local-attention variants attached to attention modules: sliding window and blockwise.

A variant holds one module's settings, already resolved for its layer (window, dilation per
head group, global positions, block size, permutations), and implements the
`forward_attention` protocol of `surgeon.attention.interface`. It returns None — dense SDPA
fallback — for calls it does not cover (cross-attention shapes: more queries than keys).

Per-call global tokens: `model(..., global_attention_mask=m)` reaches the attention function
through transformers' **kwargs (v5 hands a model call's extra keyword arguments to every
attention function). `m` is (B, L) bool/int, nonzero =
global, indexed by absolute position from the start of the sequence (so `generate()` can pass
the prompt's mask unchanged at every step); positions past L are not global.

`cost(n, heads, head_dim)` gives the FLOPs and the score memory the method's math asks for,
comparable to `dense_attention_cost` (what `surgeon report --seq-len` prints).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import SurgeonError
from .kernels.band import window_bounds
from .kernels.blockwise import blockwise_attention
from .kernels.sliding import sliding_window_attention


def dense_attention_cost(n: int, heads: int, head_dim: int, bytes_per_score: int = 4) -> dict:
    """QKᵀ and PV: 2·2·n·n·d FLOPs per head; n×n scores per head if materialised."""
    return {"flops": 4 * heads * n * n * head_dim, "score_bytes": heads * n * n * bytes_per_score}


@dataclass
class SlidingWindowVariant:
    """Longformer attention (Beltagy et al., 2020) for one module."""

    window: int
    dilation: int | list[int] = 1
    global_tokens: list[int] = field(default_factory=list)
    block_size: int | None = None
    causal: bool = False  # the module's own is_causal, for cost(); calls pass it again
    name: str = "sliding_window"

    def forward_attention(
        self, module, query, key, value, *, key_padding_mask, scaling, dropout, causal, **kwargs
    ) -> Tensor | None:
        b, _, n_q, _ = query.shape
        n_k = key.shape[2]
        if n_q > n_k:
            return None
        glob = self._global_mask(b, n_k, query.device, kwargs.get("global_attention_mask"), module)
        return sliding_window_attention(
            query, key, value, window=self.window, causal=causal, dilation=self.dilation,
            global_mask=glob, key_padding_mask=key_padding_mask, scaling=scaling,
            dropout=dropout, block_size=self.block_size,
        )  # fmt: skip

    def _global_mask(self, b, n_k, device, per_call, module) -> Tensor | None:
        if not self.global_tokens and per_call is None:
            return None
        glob = torch.zeros(b, n_k, dtype=torch.bool, device=device)
        fixed = [p for p in self.global_tokens if p < n_k]
        if fixed:
            glob[:, fixed] = True
        if per_call is not None:
            per_call = torch.as_tensor(per_call, device=device)
            if per_call.dim() != 2 or per_call.shape[0] != b or per_call.shape[1] > n_k:
                raise SurgeonError(
                    f"{type(module).__name__}: global_attention_mask must be (batch={b}, length <= {n_k}),"
                    f" got {tuple(per_call.shape)}"
                )
            glob[:, : per_call.shape[1]] |= per_call.bool()
        return glob

    def cost(self, n: int, heads: int, head_dim: int) -> dict:
        """Score pairs: the band, clipped at the sequence's ends (exact for dilation 1; a dilated
        band is counted unclipped), plus every global key for every query and every key for each
        global query (an upper bound: a global key inside a window is counted twice)."""
        lo, hi = window_bounds(self.window, self.causal)
        if self.dilation == 1:
            pairs = band_pairs(n, lo, hi)
        else:
            pairs = n * min(n, hi - lo + 1)
        g = len([p for p in self.global_tokens if p < n])
        pairs = min(n * n, pairs + 2 * g * n)
        return {"flops": 4 * heads * head_dim * pairs, "score_bytes": 4 * heads * pairs}

    def describe(self) -> str:
        extra = f", dilation {self.dilation}" if self.dilation != 1 else ""
        extra += f", global {self.global_tokens}" if self.global_tokens else ""
        return f"sliding window {self.window}{extra}"


@dataclass
class BlockwiseVariant:
    """BlockBERT attention (Qiu et al., 2020) for one module."""

    block_size: int
    permutations: int | list[list[int]] = 1
    name: str = "blockwise"

    def forward_attention(
        self, module, query, key, value, *, key_padding_mask, scaling, dropout, causal, **kwargs
    ) -> Tensor | None:
        if query.shape[2] > key.shape[2]:
            return None
        return blockwise_attention(
            query, key, value, block_size=self.block_size, causal=causal,
            permutations=self.permutations, key_padding_mask=key_padding_mask,
            scaling=scaling, dropout=dropout,
        )  # fmt: skip

    def cost(self, n: int, heads: int, head_dim: int) -> dict:
        pairs = n * min(n, self.block_size)
        return {"flops": 4 * heads * head_dim * pairs, "score_bytes": 4 * heads * pairs}

    def describe(self) -> str:
        return f"blockwise {self.block_size}, permutations {self.permutations}"


def band_pairs(n: int, lo: int, hi: int) -> int:
    """(query, key) pairs of n positions with lo <= query - key <= hi (lo <= 0 <= hi), both in
    [0, n): n full bands less the keys that fall before position 0 (the first queries, when
    hi > 0) and after position n - 1 (the last queries, when lo < 0)."""
    before, after = min(hi, n), min(-lo, n)
    lost = before * hi - before * (before - 1) // 2 + after * (-lo) - after * (after - 1) // 2
    return n * (hi - lo + 1) - lost


def heads_of(module: torch.nn.Module) -> int | None:
    """Query heads of a transformers attention module, across families."""
    config = getattr(module, "config", None)
    for value in (
        getattr(module, "num_heads", None),
        getattr(module, "num_attention_heads", None),
        getattr(module, "n_heads", None),
        getattr(config, "num_attention_heads", None),
        getattr(config, "n_head", None),
    ):
        if isinstance(value, int) and value > 0:
            return value
    return None


def as_list(value: int | Sequence[int]) -> list[int]:
    return [value] if isinstance(value, int) else list(value)
