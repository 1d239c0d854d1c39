"""The attention primitives every kernel builds on: one fused call that also returns its
log-sum-exp, the exact merge of two partial softmaxes, GQA key expansion and the bool → additive
mask conversion the fused CPU kernel takes.

A leaf of the kernels package: the route files (sliding.py, short_range.py, blockwise.py …)
import it, it imports none of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def expand_kv(x: Tensor, heads: int) -> Tensor:
    """(B, H_kv, n, D) -> (B, H, n, D): GQA query heads h share key head h // (H / H_kv)."""
    b, h_kv, n, d = x.shape
    if h_kv == heads:
        return x
    return x[:, :, None].expand(b, h_kv, heads // h_kv, n, d).reshape(b, heads, n, d)


def attend(
    q: Tensor,  # (N, H, m, D), any strides
    k: Tensor,  # (N, H, L, D)
    v: Tensor,  # (N, H, L, D)
    mask: Tensor | None,  # bool, broadcastable to (N, H, m, L); True = may attend
    scale: float,
    dropout: float = 0.0,
    need_lse_grad: bool = False,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor]:  # out (N, H, m, D), lse (N, H, m)
    """Attention that also returns the log-sum-exp of each row's scores, so partial results
    merge exactly. Rows with no allowed key give out = 0 and lse = -inf.

    Uses the fused CPU flash kernel; its LSE output carries no gradient and it has no dropout,
    so those cases take an explicit-scores path (memory O(N·H·m·L), still no n×n)."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if dropout > 0.0 or (need_lse_grad and grad) or q.device.type != "cpu":
        return _attend_math(q, k, v, mask, scale, dropout, is_causal)
    out, lse = _flash_cpu(q, k, v, 0.0, is_causal, attn_mask=additive_mask(mask, q.dtype), scale=scale)
    if mask is not None:
        empty = ~mask.any(dim=-1)  # (.., m): the kernel reports lse = 0 there, make it -inf
        lse = lse.masked_fill(empty.expand(lse.shape), float("-inf"))
    return out, lse


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """bool mask (True = may attend) -> the 0 / -inf float mask the fused CPU kernel takes."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _attend_math(q, k, v, mask, scale, dropout, is_causal):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (N, H, m, L)
    if is_causal:
        m, ell = scores.shape[-2:]
        causal = torch.ones(m, ell, dtype=torch.bool, device=q.device).tril()
        mask = causal if mask is None else mask & causal
    nonempty = None
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
        nonempty = mask.any(dim=-1, keepdim=True)  # (.., m, 1)
        # rows with no key get finite dummy scores so that no NaN reaches the gradient
        scores = torch.where(nonempty, scores, torch.zeros_like(scores))
    lse = torch.logsumexp(scores, dim=-1)  # (N, H, m)
    probs = torch.softmax(scores, dim=-1)
    if nonempty is not None:
        probs = probs * nonempty
        lse = lse.masked_fill(~nonempty[..., 0], float("-inf"))
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout)
    return torch.matmul(probs, v), lse


def merge_lse(o1: Tensor, l1: Tensor, o2: Tensor, l2: Tensor, inplace: bool = False) -> Tensor:
    """Softmax over the union of two disjoint key sets from the two partial results:
    out = σ(l1 - l2)·o1 + (1 - σ(l1 - l2))·o2. o: (..., m, D), l: (..., m)."""
    both_empty = torch.isneginf(l1) & torch.isneginf(l2)
    w1 = torch.sigmoid(torch.where(both_empty, torch.zeros_like(l1), l1 - l2))
    w1 = w1.masked_fill(both_empty, 0.0)
    if inplace:  # o1 ← w1·o1 + (1 - w1)·o2, saving a copy of the output
        return o1.lerp_(o2, (1.0 - w1)[..., None].to(o1.dtype))
    return torch.lerp(o2, o1, w1[..., None].to(o1.dtype))
