"""Blockwise self-attention (BlockBERT; Qiu et al., 2020).

The sequence is cut into m blocks of `block_size` (the last one padded, its padding masked);
the n×n score matrix becomes m×m blocks of which each head group keeps one per block row:
query block i attends key block π_g(i) only. Head groups split the heads into equal contiguous
slices; group 0 uses the identity (local attention), group g by default the cyclic shift
π_g(i) = (i + g) mod m, so together the groups see g+1 block diagonals (the paper's
permutations). Cost O(n²/m) per head.

Causal modules: only the identity permutation makes sense (a shifted block can lie in the
future), so a causal call attends causally *inside the diagonal block*: query p sees keys
⌊p/b⌋·b … p. Other permutations are refused with an error.

Queries are the last n_q of the n_k keys (decode with a KV cache is the same function).
route.choose_kernel picks the kernel: the fused sdpa calls here (every block one batch entry), or
— on CUDA by default — one FlexAttention call with the pattern as a predicate (flex.py).
Key padding: masked keys are never attended; a query with no attendable key outputs zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import SurgeonError
from .flex import check_flex_inputs, flex_blockwise_attention
from .primitives import attend, expand_kv
from .route import FLEX, choose_kernel

__all__ = ["blockwise_attention", "block_permutations"]


def block_permutations(permutations: int | Sequence[Sequence[int]], n_blocks: int) -> list[list[int]]:
    """One block permutation per head group: an int G gives the cyclic shifts 0 … G-1."""
    if isinstance(permutations, int):
        if permutations < 1:
            raise SurgeonError(f"blockwise_attention: permutations must be >= 1, got {permutations}")
        return [[(i + g) % n_blocks for i in range(n_blocks)] for g in range(permutations)]
    perms = [list(p) for p in permutations]
    for p in perms:
        if sorted(p) != list(range(n_blocks)):
            raise SurgeonError(
                f"blockwise_attention: {p} is not a permutation of the {n_blocks} blocks of this input"
            )
    if not perms:
        raise SurgeonError("blockwise_attention: permutations must not be empty")
    return perms


def blockwise_attention(
    query: Tensor,  # (B, H, n_q, D)
    key: Tensor,  # (B, H_kv, n_k, D)
    value: Tensor,  # (B, H_kv, n_k, D)
    *,
    block_size: int,
    causal: bool,
    permutations: int | Sequence[Sequence[int]] = 1,
    key_padding_mask: Tensor | None = None,  # (B, n_k) bool, True = real token
    scaling: float | None = None,
    dropout: float = 0.0,
    method: str = "auto",  # "auto" (route.choose_kernel), "sdpa" or "flex"
) -> Tensor:  # (B, H, n_q, D)
    b, h, n_q, d = query.shape
    n_k = key.shape[2]
    if block_size < 1:
        raise SurgeonError(f"blockwise_attention: block_size must be >= 1, got {block_size}")
    if key.shape[0] != b or h % key.shape[1] or n_q > n_k or value.shape != key.shape:
        raise SurgeonError(
            f"blockwise_attention: incompatible shapes query {tuple(query.shape)} key {tuple(key.shape)}"
        )
    if key_padding_mask is not None and (
        key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (b, n_k)
    ):
        raise SurgeonError(f"blockwise_attention: key_padding_mask must be a bool ({b}, {n_k}) tensor")
    m = -(-n_k // block_size)
    perms = block_permutations(permutations, m)
    if causal and any(p != list(range(m)) for p in perms):
        raise SurgeonError(
            "blockwise_attention: a causal module can only use the identity block permutation "
            "(permutations: 1); other blocks would expose future tokens"
        )
    if h % len(perms):
        raise SurgeonError(
            f"blockwise_attention: {len(perms)} permutation head groups do not divide {h} heads"
        )
    scale = d**-0.5 if scaling is None else scaling
    kernel = choose_kernel(method, device_type=query.device.type, dtype=query.dtype, n_q=n_q, dropout=dropout,
                           what="blockwise_attention")  # fmt: skip
    if kernel == FLEX:
        check_flex_inputs("blockwise_attention", dropout, query, key, value)
        return flex_blockwise_attention(query, key, value, block_size=block_size, causal=causal, perms=perms,
                                        key_padding_mask=key_padding_mask, scale=scale)  # fmt: skip
    key, value = expand_kv(key, h), expand_kv(value, h)  # (B, H, n_k, D)
    group = h // len(perms)
    out = query.new_empty(b, h, n_q, d)
    # Without autograd, block outputs are copied straight into `out` (one copy); with it,
    # assignments go through the base tensor, which autograd can follow.
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    for bi in range(b):
        pad = key_padding_mask[bi] if key_padding_mask is not None else None
        for gi, perm in enumerate(perms):
            hs = slice(gi * group, (gi + 1) * group)
            q, k, v = query[bi, hs], key[bi, hs], value[bi, hs]  # (Hg, n, D)
            if n_q != n_k:
                out[bi, hs] = _explicit(q, k, v, pad, perm, block_size, causal, scale, dropout)
                continue
            o = _blocks(q, k, v, pad, perm, block_size, causal, scale, dropout)  # (m, Hg, b, D)
            if not grad and m * block_size == n_q:
                out[bi, hs].view(group, m, block_size, d).copy_(o.transpose(0, 1))
            else:
                out[bi, hs] = o.transpose(0, 1).reshape(group, m * block_size, d)[:, :n_q]
    return out


def _blocks(q, k, v, pad, perm, bs, causal, scale, dropout):
    """Full sequence: every block is one batch entry of the fused kernel. Returns the
    output blocks (m, Hg, b, D), padding rows included."""
    hg, n, d = q.shape
    m = len(perm)
    extra = m * bs - n
    ok = pad
    if extra:
        q, k, v = (F.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
        ok = torch.ones(n, dtype=torch.bool, device=q.device) if pad is None else pad
        ok = F.pad(ok, (0, extra), value=False)  # padded tail keys are never attended
    q_blocks = q.view(hg, m, bs, d).transpose(0, 1)  # (m, Hg, b, D)
    k_blocks = k.view(hg, m, bs, d).transpose(0, 1)
    v_blocks = v.view(hg, m, bs, d).transpose(0, 1)
    identity = perm == list(range(m))
    if not identity:
        idx = torch.tensor(perm, device=q.device)
        k_blocks, v_blocks = k_blocks[idx], v_blocks[idx]  # key block π(i) for query block i
    mask = None
    if ok is not None and not bool(ok.all()):
        ok_blocks = ok.view(m, bs)
        if not identity:
            ok_blocks = ok_blocks[idx]
        mask = ok_blocks[:, None, None, :]  # (m, 1, 1, b)
        if causal:
            mask = mask & torch.ones(bs, bs, dtype=torch.bool, device=q.device).tril()
    if causal and mask is None:
        o, _ = attend(q_blocks, k_blocks, v_blocks, None, scale, dropout, is_causal=True)
    else:
        o, _ = attend(q_blocks, k_blocks, v_blocks, mask, scale, dropout)
    return o


def _explicit(q, k, v, pad, perm, bs, causal, scale, dropout):
    """Queries are the last n_q positions (decode step): a (n_q, n_k) mask over few queries."""
    n_q, n_k = q.shape[1], k.shape[1]
    q_pos = torch.arange(n_k - n_q, n_k, device=q.device)
    k_pos = torch.arange(n_k, device=q.device)
    perm_t = torch.tensor(perm, device=q.device)
    allowed = perm_t[q_pos // bs][:, None] == (k_pos // bs)[None, :]  # (n_q, n_k)
    if causal:
        allowed &= k_pos[None, :] <= q_pos[:, None]
    if pad is not None:
        allowed &= pad[None, :]
    first = int(k_pos[allowed.any(0)].min()) if bool(allowed.any()) else 0
    # only keys from the first reachable block on are read
    o, _ = attend(
        q[None], k[None, :, first:], v[None, :, first:], allowed[None, None, :, first:], scale, dropout
    )
    return o[0]
