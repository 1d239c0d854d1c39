"""An exact short-range window beside a compressed long-range memory, in one softmax
(Long-Short Transformer, Zhu et al. 2021; the sparse + low-rank split of Scatterbrain, Chen et
al. 2021).

Linformer's k projections and the latent bottleneck's m slots summarise the whole sequence:
they can say "attend to that region", not "attend to my neighbour". Pretrained BERT-family
models have heads that read the previous or next token (Clark et al. 2019, "What does BERT
look at?"); that pattern is a different key for every position, which no k ≪ n summary holds.
With a short-range window w, every query also attends, exactly, the keys within ±w/2 of it
(the convention of `sliding_window`'s window), and both parts share one softmax:

    out = softmax([Q·K_bandᵀ | Q·K_farᵀ] · scale) · [V_band ; V_far]

The band runs through the sliding-window kernel's blocked route (band.py), the compressed part
through the fused kernel, and the two partial results merge exactly by log-sum-exp. Short
inputs, where route.py's cost model prefers it, instead take one masked fused call over
[tokens | slots]; the flex route (CUDA by default, flex.py) one FlexAttention call over them. A key in the band is also inside some slot; as
in the Long-Short Transformer the two views sit side by side, not deduplicated. Extra cost:
O(n·w), against O(n·k) for the compressed part.

On all-MiniLM-L6-v2 at 256 tokens, a window of 16 (±8) lifts the untrained sentence-embedding
cosine vs dense from 0.76 to 0.89 for Linformer k=64, 0.86 to 0.91 for k=128, and 0.50 to 0.71
for latent m=64 (`benchmarks/quality_compressed.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .band import BandSpec, band, window_bounds
from .flex import check_flex_inputs, flex_band_with_slots
from .joint import band_with_extra_keys
from .primitives import attend, expand_kv, merge_lse
from .route import FLEX, MASKED, choose_route
from .sliding_masked import window_mask


def with_short_range(
    query: Tensor,  # (B, H, n_q, D)
    key: Tensor,  # (B, H_kv, n, D): the token keys (for the band)
    value: Tensor,  # (B, H_kv, n, D)
    far_key: Tensor,  # (B, H, k, D): the compressed slots, already expanded to the query heads
    far_value: Tensor,  # (B, H, k, D)
    *,
    window: int,  # the band covers keys within ±window/2 of the query
    far_mask: Tensor | None,  # bool, broadcastable to (B, H, n_q, k); True = slot may be attended
    key_padding_mask: Tensor | None,  # (B, n) bool, True = real token
    scaling: float,
    dropout: float = 0.0,
    method: str = "auto",  # a route.METHODS name (route.choose_route)
) -> Tensor:  # (B, H, n_q, D)
    b, h, n_q, d = query.shape
    key, value = expand_kv(key, h), expand_kv(value, h)  # (B, H, n, D)
    n = key.shape[2]
    lo, hi = window_bounds(window, causal=False)
    spec = BandSpec(lo=lo, hi=hi, q0=n - n_q, scale=scaling, dropout=dropout)
    # the slots weigh in the route's cost model like a global token's extra call and merge;
    # their own scores are the same either way
    route = choose_route(method, batch=b, heads=h, head_dim=d, n_q=n_q, n_k=n, lo=lo, hi=hi, has_global=True,
                         device_type=query.device.type, dtype=query.dtype, dropout=dropout)  # fmt: skip
    if route == FLEX:
        check_flex_inputs("short-range band", dropout, query, key, value, far_key, far_value)
        return flex_band_with_slots(query, key, value, far_key, far_value, lo=lo, hi=hi, far_mask=far_mask,
                                    key_padding_mask=key_padding_mask, scale=scaling)  # fmt: skip
    if route == MASKED:
        return _masked(query, key, value, far_key, far_value, spec, far_mask, key_padding_mask)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value, far_key, far_value))
    if grad and dropout == 0.0 and query.device.type == "cpu":
        # training: band and slots in one softmax whose backward runs the fused kernel too
        parts = []
        for bi in range(b):
            pad = key_padding_mask[bi] if key_padding_mask is not None else None  # (n,)
            pieces = spec.plan(n_q, n, pad, query.device)
            mask = None if far_mask is None else far_mask[bi if far_mask.shape[0] > 1 else 0]  # (.., .., k)
            parts.append(band_with_extra_keys(query[bi], key[bi], value[bi], far_key[bi], far_value[bi], mask,
                                              pieces, scaling))  # fmt: skip
        return torch.stack(parts)
    # the band's LSE weighs it against the slots in the merge, so it must carry gradient
    o_far, lse_far = attend(query, far_key, far_value, far_mask, scaling, dropout, need_lse_grad=True)
    # without autograd the band is written straight into the output and merged there in place
    out = None if grad else query.new_empty(b, h, n_q, d)
    parts = []
    for bi in range(b):
        pad = key_padding_mask[bi] if key_padding_mask is not None else None  # (n,)
        o_band, lse_band = band(query[bi], key[bi], value[bi], pad, spec, lse_grad=True,
                                out=None if grad else out[bi])  # fmt: skip
        merged = merge_lse(o_band, lse_band, o_far[bi], lse_far[bi], inplace=not grad)  # (H, n_q, D)
        if grad:  # (without autograd, merged is out[bi] itself)
            parts.append(merged)
    return torch.stack(parts) if grad else out


def _masked(query, key, value, far_key, far_value, spec: BandSpec, far_mask, key_padding_mask) -> Tensor:
    """softmax over [tokens within the band | slots] as one fused call with an explicit mask.
    query: (B, H, n_q, D); key, value: (B, H, n, D); far_key, far_value: (B, H, slots, D)."""
    b, _, n_q, _ = query.shape
    n, slots = key.shape[2], far_key.shape[2]
    band_mask = window_mask(n_q, n, spec.lo, spec.hi, 1, False, None, key_padding_mask, query.device)[:, None]  # (B|1, 1, n_q, n)
    far = torch.ones(1, 1, n_q, slots, dtype=torch.bool, device=query.device) if far_mask is None else far_mask
    far = far.reshape((1,) * (4 - far.dim()) + tuple(far.shape))  # broadcastable to (B, H, n_q, slots)
    heads = max(band_mask.shape[1], far.shape[1])
    mask = torch.cat([band_mask.expand(b, heads, n_q, n), far.expand(b, heads, n_q, slots)], dim=-1)  # (B, 1|H, n_q, n + slots)
    keys = torch.cat([key, far_key.to(key.dtype)], dim=2)  # (B, H, n + slots, D)
    values = torch.cat([value, far_value.to(value.dtype)], dim=2)
    return attend(query, keys, values, mask, spec.scale, spec.dropout)[0]


def add_short_range_cost(cost: dict, n: int, heads: int, head_dim: int, window: int) -> dict:
    """`cost` plus the band's multiply-add FLOPs (×2: Q·Kᵀ and P·V over ≤ window + 1 keys per
    query) and its scores; unchanged when window is 0."""
    if window <= 0:
        return cost
    keys = min(window // 2 * 2 + 1, n)
    return {"flops": cost["flops"] + 2 * 2 * heads * n * keys * head_dim,
            "score_bytes": cost["score_bytes"] + 4 * heads * n * keys}  # fmt: skip
