"""Linformer attention (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity").

Keys and values are projected along the *sequence* axis by learned matrices E, F (k × n_max):

    out = softmax(Q · (E·K)ᵀ · scale) · (F·V)          cost O(n·k) instead of O(n²)

The projected K, V are only k long, so the second step is an ordinary attention over k slots and
runs in the fused SDPA kernel; computing the scores by hand (einsum + softmax) was 5× slower
(measured while planning surgeon at n = 16384, k = 256, B = 1, 12 heads of 64, fp32, 2 threads:
30× faster than dense SDPA through the fused kernel, 5.9× by hand).

Conventions that make a pretrained model usable without training:
- Padded keys/values are zeroed before projecting, so padding never leaks into a slot.
- Inputs shorter than n_max use the first n columns of E, F (Linformer §4 trains at fixed n;
  this is the usual truncation for shorter inputs).
- A slot whose row of E has no weight on any real token of a sequence carries nothing (its key
  and value are exactly zero); it is masked out instead of receiving softmax mass. This matters
  for the segment-mean initialisation, where short inputs leave the trailing segments empty.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .short_range import add_short_range_cost, with_short_range


def segment_mean_projection(k: int, n_max: int, dtype=torch.float32) -> Tensor:  # (k, n_max)
    """E whose row 0 picks position 0 alone and whose other rows average k-1 equal contiguous
    segments of the remaining positions: the untrained Linformer attends to mean-pooled keys
    and values, plus the first token unpooled. Position 0 ([CLS]/BOS) is an attention sink
    (Xiao et al. 2023, StreamingLLM; for MiniLM see benchmarks/quality_minilm.py, where a global
    position 0 lifts a ±32 window from 0.78 to 0.93): on MiniLM at 256 tokens keeping it whole
    lifts the embedding cosine vs dense from 0.54 to 0.73 (k=64) and 0.63 to 0.78 (k=128)."""
    proj = torch.zeros(k, n_max, dtype=dtype)
    proj[0, 0] = 1.0
    if k == 1:
        proj[0] = 1.0 / n_max  # a single slot can only be the mean of everything
        return proj
    for j, seg in enumerate(torch.arange(1, n_max).tensor_split(k - 1)):
        if len(seg):
            proj[j + 1, seg] = 1.0 / len(seg)
    return proj


def random_projection(k: int, n_max: int, generator=None, dtype=torch.float32) -> Tensor:
    """Uniform(-1/√k, 1/√k), the init of the reference implementation (lucidrains/linformer)."""
    bound = k**-0.5
    return (torch.rand(k, n_max, generator=generator, dtype=dtype) * 2 - 1) * bound


def _live_slots(proj: Tensor, key_padding_mask: Tensor | None) -> Tensor | None:
    """(B, 1, 1, k) bool: slots that see at least one real token; None when all do."""
    support = proj.abs()  # (k, n)
    if key_padding_mask is None:
        live = support.sum(-1) > 0  # (k,)
        if bool(live.all()):
            return None
        return live[None, None, None, :]
    live = key_padding_mask.to(support.dtype) @ support.T > 0  # (B, k)
    if bool(live.all()):
        return None
    return live[:, None, None, :]


def linformer_attention(
    query: Tensor,  # (B, H, n_q, D)
    key: Tensor,  # (B, H_kv, n, D)
    value: Tensor,  # (B, H_kv, n, D)
    proj_k: Tensor,  # (k, n_max): E
    proj_v: Tensor,  # (k, n_max): F (may be proj_k itself: key-value sharing)
    *,
    key_padding_mask: Tensor | None,  # (B, n) bool, True = real token
    scaling: float,
    dropout: float = 0.0,
    local_window: int = 0,  # > 0: also attend keys within ±local_window/2 exactly (short_range.py)
    method: str = "auto",  # the band's route (route.METHODS), with local_window > 0
) -> Tensor:  # (B, H, n_q, D)
    n = key.shape[2]
    n_max = proj_k.shape[1]
    if n > n_max:
        raise ValueError(f"sequence length {n} exceeds the Linformer max_length {n_max}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} KV heads")
    e = proj_k[:, :n].to(key.dtype)  # (k, n)
    f = proj_v[:, :n].to(value.dtype)  # (k, n)
    tokens = key, value
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None].to(key.dtype)  # (B, 1, n, 1)
        key, value = key * keep, value * keep
    pk = torch.matmul(e, key)  # (B, H_kv, k, D)
    pv = torch.matmul(f, value)  # (B, H_kv, k, D)
    live = _live_slots(e if proj_v is proj_k else e.abs() + f.abs(), key_padding_mask)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # GQA: project once per KV head, then share with its query heads
        pk = pk.repeat_interleave(groups, dim=1)  # (B, H, k, D)
        pv = pv.repeat_interleave(groups, dim=1)
    if local_window > 0:
        return with_short_range(query, *tokens, pk, pv, window=local_window, far_mask=live,
                                key_padding_mask=key_padding_mask, scaling=scaling, dropout=dropout, method=method)  # fmt: skip
    return F.scaled_dot_product_attention(
        query, pk, pv, attn_mask=live, dropout_p=dropout, scale=scaling
    )


def linformer_cost(n: int, heads: int, head_dim: int, k: int, local_window: int = 0) -> dict:
    """Multiply-add FLOPs (×2) and bytes of attention scores held at once (fp32)."""
    k = min(k, n)
    project = 2 * 2 * heads * k * n * head_dim  # E·K and F·V
    attend = 2 * 2 * heads * n * k * head_dim  # Q·Kᵀ and P·V over k slots
    cost = {"flops": project + attend, "score_bytes": 4 * heads * n * k}
    return add_short_range_cost(cost, n, heads, head_dim, local_window)
