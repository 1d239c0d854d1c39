"""Latent-bottleneck attention (Perceiver, Jaegle et al. 2021; the same compress-the-memory-by-
attention step as Set Transformer's induced points, Lee et al. 2019).

m learned latent queries Z (per KV head) read the token keys and values once; the tokens then
attend to the m summary slots instead of to each other:

    A     = softmax(Z · Kᵀ · scale)            (m × n)   masked on padded keys
    K_sum = A · K,   V_sum = A · V             (m × D)   summary keys and values
    out   = softmax(Q · K_sumᵀ · scale) · V_sum           cost O(n·m)

Summary keys (`summary_keys="attended"`, the default) and values share the same read weights
A: slot j stands for the tokens latent j attends to, so its key is their mean key and its value
their mean value (a slot is a soft cluster of tokens; with one-hot A this is exactly pooled
attention over the clusters), which keeps an untrained model's queries meaningful. All steps run
in the fused SDPA kernel (../../../shared/DESIGN.md §2: hand-written scores are 5× slower at
16k). The CPU flash kernel needs equal q/k/v head sizes, so K_sum and V_sum come from two fused
calls with the same queries and keys rather than one call on [K | V]: three calls in all.

`summary_keys="latent"` uses the latent itself as its slot's key (K_sum = Z, a tie like
Reformer's shared QK): one read instead of two, so about a third faster, but the keys are no
longer in the pretrained key space, so it is only sensible once trained.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .short_range import add_short_range_cost, with_short_range


def latent_attention(
    query: Tensor,  # (B, H, n_q, D)
    key: Tensor,  # (B, H_kv, n, D)
    value: Tensor,  # (B, H_kv, n, D)
    latents: Tensor,  # (H_kv, m, D): the learned latent queries Z
    *,
    key_padding_mask: Tensor | None,  # (B, n) bool, True = real token
    scaling: float,
    dropout: float = 0.0,
    summary_keys: str = "attended",  # "attended": A·K; "latent": Z
    local_window: int = 0,  # > 0: also attend keys within ±local_window/2 exactly (short_range.py)
) -> Tensor:  # (B, H, n_q, D)
    if summary_keys not in ("attended", "latent"):
        raise ValueError(f"summary_keys must be 'attended' or 'latent', got {summary_keys!r}")
    b, h_kv, _, d = key.shape
    if latents.shape[0] != h_kv or latents.shape[2] != d:
        raise ValueError(f"latents {tuple(latents.shape)} do not fit KV heads {h_kv} × head dim {d}")
    if query.shape[1] % h_kv:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {h_kv} KV heads")
    z = latents.to(key.dtype).unsqueeze(0).expand(b, -1, -1, -1)  # (B, H_kv, m, D)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]  # (B,1,1,n)
    sum_v = F.scaled_dot_product_attention(z, key, value, attn_mask=mask, scale=scaling)  # (B,H_kv,m,D)
    if summary_keys == "attended":
        sum_k = F.scaled_dot_product_attention(z, key, key, attn_mask=mask, scale=scaling)
    else:
        sum_k = z
    groups = query.shape[1] // h_kv
    if groups > 1:  # GQA: one set of slots per KV head, shared by its query heads
        sum_k = sum_k.repeat_interleave(groups, dim=1)  # (B, H, m, D)
        sum_v = sum_v.repeat_interleave(groups, dim=1)
    if local_window > 0:
        return with_short_range(query, key, value, sum_k, sum_v, window=local_window, far_mask=None,
                                key_padding_mask=key_padding_mask, scaling=scaling, dropout=dropout)  # fmt: skip
    return F.scaled_dot_product_attention(query, sum_k, sum_v, dropout_p=dropout, scale=scaling)


def latent_cost(n: int, heads: int, head_dim: int, m: int, summary_keys: str = "attended", local_window: int = 0) -> dict:
    """Multiply-add FLOPs (×2) and bytes of attention scores held at once (fp32)."""
    reads = 2 if summary_keys == "attended" else 1  # fused calls over the n tokens
    read = 2 * 2 * reads * heads * m * n * head_dim  # per call: Z·Kᵀ and A·(K or V)
    attend = 2 * 2 * heads * n * m * head_dim  # Q·K_sumᵀ, P·V_sum
    cost = {"flops": read + attend, "score_bytes": 4 * heads * m * n}
    return add_short_range_cost(cost, n, heads, head_dim, local_window)
