"""Short sequences: the whole sliding-window pattern as one masked fused call.

The blocked path (sliding.py) pays a fixed cost for every fused call it makes, per batch
element: the interior strips, the edge chunks, the global keys and queries, the merges. On long
inputs that is noise; on short ones it dominates. A sentence encoder at 256 tokens with ±32
windows and a global [CLS] (8 × 256 tokens, 12 heads of 32) ran its attention 1.6–1.8× slower
than a single SDPA call with an explicit 256 × 256 mask, forward and training step alike,
though the mask computes 2.9× more scores. So below a size where the mask is cheap, the
pattern is built as one bool (B, n_q, n_k) mask — band (with dilation), key padding, global keys
and global queries — and every batch element and head goes through the fused kernel at once
(one call per dilation head group). Same function, same conventions: a query with no key left
outputs zeros.

`masked_is_cheaper` decides with a cost model fitted on this project's 2-core CPU by
`benchmarks/sliding_routes.py`: 168 shapes (head dim 32 / 64, batch 1 / 8, n 128…1024, window
16…256, with and without a global token), forward and training step, each timed both ways. In
units of one score's multiply-adds over the head dimension, a blocked score costs ~1.5 (forward)
to ~2 (training) masked ones — the kernel's 32-query tiles against SDPA's 256 — and every fused
call of the plan costs ~6.5e6 (≈ 0.2 ms forward, per batch element); a global token adds
~70–120 scores per query plus two calls. In that script's last run the automatic choice was on
average 6.9 % (forward) and 1.0 % (training) slower than the faster route, against 12 % and 20 %
for always blocking, whose worst shapes were 3× slower. Its worst shapes were 45 % / 35 %
slower: near the boundary the model can pick the slower route, and at a millisecond per call
the timings themselves vary that much.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from .sliding import attend, band_plan

# A (B, n_q, n_k) mask per call: beyond ~1M scores per batch element it is no longer small,
# and by then the band's plan is cheaper anyway for any window that is not nearly dense. The
# whole batch's mask stays under 32 MiB as floats (the kernel takes it additive).
MASKED_MAX_SCORES = 1 << 20
MASKED_MAX_BATCH_SCORES = 1 << 23
_BLOCKED_SCORE_COST = 1.7  # forward and training step weigh alike: the route serves both
_CALL_COST = 6.5e6
_GLOBAL_SCORES_PER_QUERY = 80


def masked_is_cheaper(
    batch: int, heads: int, head_dim: int, n_q: int, n_k: int, lo: int, hi: int,
    dilations: Sequence[int], has_global: bool, block_size: int | None,
) -> bool:  # fmt: skip
    if n_q * n_k > MASKED_MAX_SCORES or batch * n_q * n_k > MASKED_MAX_BATCH_SCORES:
        return False
    return _masked_is_cheaper(batch, heads, head_dim, n_q, n_k, lo, hi, tuple(dilations), has_global, block_size)


@functools.lru_cache(maxsize=256)  # a model asks the same question in every layer and step
def _masked_is_cheaper(batch, heads, head_dim, n_q, n_k, lo, hi, dilations, has_global, block_size) -> bool:
    group_heads = heads // len(dilations)
    blocked = 0.0
    for dil in dilations:  # δ residue bands of ~n/δ positions each (see sliding._dilated_band)
        pieces = band_plan(-(-n_q // dil), -(-n_k // dil), None, lo, hi, -(-n_k // dil) - -(-n_q // dil),
                           block_size, "cpu")  # fmt: skip
        scores = sum(p.scores for p in pieces)
        blocked += dil * (_BLOCKED_SCORE_COST * scores * group_heads * head_dim + _CALL_COST * len(pieces))
    if has_global:
        blocked += _GLOBAL_SCORES_PER_QUERY * n_q * heads * head_dim + 2 * _CALL_COST
    masked = batch * n_q * n_k * heads * head_dim + _CALL_COST * len(dilations)
    return masked < batch * blocked


def window_mask(
    n_q: int, n_k: int, lo: int, hi: int, dilation: int, causal: bool,
    global_mask: Tensor | None,  # (B, n_k) bool, True = global (already & key padding)
    key_padding_mask: Tensor | None,  # (B, n_k) bool, True = real token
    device,
) -> Tensor:  # (B or 1, n_q, n_k) bool, True = may attend  # fmt: skip
    """Which keys each query attends: the queries are the last n_q of the n_k positions."""
    q_pos = torch.arange(n_k - n_q, n_k, device=device)[:, None]  # (n_q, 1)
    k_pos = torch.arange(n_k, device=device)[None, :]  # (1, n_k)
    offset = q_pos - k_pos  # (n_q, n_k): query minus key position
    # dilation δ: the window's offsets are δ·lo … δ·hi in steps of δ
    allowed = (offset % dilation == 0) & (offset >= lo * dilation) & (offset <= hi * dilation)
    allowed = allowed[None]  # (1, n_q, n_k)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    if global_mask is not None:
        visible = (offset >= 0)[None] if causal else torch.ones_like(allowed[:1])  # (1, n_q, n_k)
        if key_padding_mask is not None:
            visible = visible & key_padding_mask[:, None, :]
        # every query attends the global keys; a global query attends every key
        allowed = allowed | (visible & global_mask[:, None, :])
        allowed = torch.where(global_mask[:, n_k - n_q :, None], visible, allowed)
    return allowed


def masked_sliding_attention(
    query: Tensor,  # (B, H, n_q, D)
    key: Tensor,  # (B, H, n_k, D), already expanded to the query heads
    value: Tensor,  # (B, H, n_k, D)
    *,
    lo: int,
    hi: int,
    causal: bool,
    dilations: list[int],  # one per equal contiguous head group
    global_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    scale: float,
    dropout: float,
) -> Tensor:  # (B, H, n_q, D)
    b, h, n_q, d = query.shape
    n_k = key.shape[2]
    masks: dict[int, Tensor] = {}
    for dil in dilations:
        if dil not in masks:
            masks[dil] = window_mask(n_q, n_k, lo, hi, dil, causal, global_mask, key_padding_mask, query.device)
    if len(masks) == 1:  # one call for every head (the kernel's output is already (B, n_q, H, D) underneath)
        return attend(query, key, value, masks[dilations[0]][:, None], scale, dropout)[0]
    out = query.new_empty(b, n_q, h, d).transpose(1, 2)  # (B, H, n_q, D)
    group = h // len(dilations)
    for gi, dil in enumerate(dilations):
        hs = slice(gi * group, (gi + 1) * group)
        out[:, hs] = attend(query[:, hs], key[:, hs], value[:, hs], masks[dil][:, None], scale, dropout)[0]
    return out
