"""Latent-bottleneck attention (Perceiver, Jaegle et al. 2021; the same compress-the-memory-by-
attention step as Set Transformer's induced points, Lee et al. 2019).

m learned latent queries Z (per KV head) read the token keys and values once; the tokens then
attend to the m summary slots instead of to each other:

    A     = softmax(Z · Kᵀ · scale)            (m × n)   masked on padded keys
    V_sum = A · V,   K_sum = Z (or A · K)      (m × D)   summary values and keys
    out   = softmax(Q · K_sumᵀ · scale) · V_sum           cost O(n·m)

Slot keys. `summary_keys="latent"` (the default) uses each latent as its slot's key
(K_sum = Z, a tie like Reformer's shared QK): two passes over the tokens, one to read V_sum
and one for the tokens to attend the slots. `summary_keys="attended"` gives slot j the mean key
of the tokens latent j reads (K_sum = A·K, same read weights as V_sum: a slot is a soft
cluster of tokens and its key their mean key, the keys stay in the pretrained key space). The
CPU flash kernel needs equal q/k/v head sizes, so K_sum takes a second fused call with the
same queries and keys rather than one call on [K | V]: three passes, about 1.5× slower at
n = 16384. Measured on MiniLM (benchmarks/quality_compressed.py, benchmarks/fidelity.py) the
two are equal untrained and within 0.01 after the same distillation, so the faster one is
the default.
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
    summary_keys: str = "latent",  # "latent": Z; "attended": A·K
    local_window: int = 0,  # > 0: also attend keys within ±local_window/2 exactly (short_range.py)
    method: str = "auto",  # the band's route (route.METHODS), with local_window > 0
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
                                key_padding_mask=key_padding_mask, scaling=scaling, dropout=dropout, method=method)  # fmt: skip
    return F.scaled_dot_product_attention(query, sum_k, sum_v, dropout_p=dropout, scale=scaling)


def latent_cost(n: int, heads: int, head_dim: int, m: int, summary_keys: str = "latent", local_window: int = 0) -> dict:
    """Multiply-add FLOPs (×2) and bytes of attention scores held at once (fp32)."""
    reads = 2 if summary_keys == "attended" else 1  # fused calls over the n tokens
    read = 2 * 2 * reads * heads * m * n * head_dim  # per call: Z·Kᵀ and A·(K or V)
    attend = 2 * 2 * heads * n * m * head_dim  # Q·K_sumᵀ, P·V_sum
    cost = {"flops": read + attend, "score_bytes": 4 * heads * m * n}
    return add_short_range_cost(cost, n, heads, head_dim, local_window)
