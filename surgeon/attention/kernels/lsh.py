"""LSH attention (Reformer, Kitaev et al. 2020, §2 "Locality-sensitive hashing attention").

Per hash round: random rotations R hash each vector to argmax([xR; -xR]) (angular LSH, Andoni
et al. 2015), positions are sorted by bucket, the sorted sequence is cut into equal chunks of
`bucket_size`, and each query chunk attends to the key chunk with the same index and the one
before it (cyclically). Rounds are merged exactly by log-sum-exp.

Differences from the paper, and why:
- Pretrained models have separate Q and K (Reformer ties them). Both are hashed with the *same*
  rotations and sorted *separately*; chunk i of the sorted queries meets chunk i (and i-1) of the
  sorted keys, so equal-size clusters line up even when Q and K land in buckets unevenly (the
  SMYRF arrangement, Daras et al. 2020). Keys are centred before hashing only: subtracting the
  mean key adds a per-query constant to every score, which softmax ignores, but it spreads the
  keys over the buckets. `shared_qk=True` is Reformer's own scheme instead: keys := Q/‖Q‖ and a
  token attends to itself only when nothing else is in reach (for models trained that way).
- A (query, key) pair met in several rounds is counted once: a pair already seen in an earlier
  round is masked out of the later ones (Reformer §2 divides by the count instead; both make the
  result exactly softmax attention over the union of the rounds' neighbourhoods).
- Sequences shorter than two chunks are the whole neighbourhood: that is dense attention.
- Causal attention is not offered: which keys a query meets depends on where *later* tokens hash,
  so the output at position i would depend on the future (and would not survive a KV cache).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_NEG = -1e30  # finite "minus infinity": a fully masked row stays NaN-free and gets weight 0
_SELF = -1e5  # Reformer's shared-QK self-attention penalty


def _rotations(seed: int, n_hashes: int, head_dim: int, n_buckets: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_hashes, head_dim, n_buckets // 2, generator=gen)  # (R, D, nb/2)


def _hash(x: Tensor, rot: Tensor) -> Tensor:  # (B, h, N, D), (D, nb/2) -> (B, h, N) long
    proj = torch.matmul(x, rot.to(x.dtype))  # (B, h, N, nb/2)
    return torch.cat([proj, -proj], dim=-1).argmax(dim=-1)


def _order(buckets: Tensor, real: Tensor, n_buckets: int) -> Tensor:
    """Stable sort of positions by bucket; padding goes last in its own bucket, so real queries
    and real keys occupy the same leading chunks."""
    n = buckets.shape[-1]
    buckets = torch.where(real, buckets, n_buckets)  # (B, h, N)
    pos = torch.arange(n, device=buckets.device)
    return torch.argsort(buckets * n + pos, dim=-1)  # (B, h, N)


def _chunk_of(order: Tensor, chunk: int) -> Tensor:  # (B, h, N) position -> its chunk index
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank // chunk).to(torch.int32)


def _gather(x: Tensor, order: Tensor) -> Tensor:  # (B, h, N, D) by (B, h, N) -> (B, h, N, D)
    return x.gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1]))


def _with_previous(x: Tensor) -> Tensor:
    """(B, h, C, c, ...) -> (B, h, C, 2c, ...): each chunk followed by the chunk before it."""
    if x.shape[2] == 1:
        return x
    return torch.cat([x, x.roll(1, dims=2)], dim=3)


def _prepare(query, key, value, key_padding_mask, bucket_size, shared_qk):
    """Pad to whole chunks; returns q, k, v (B, H, N, D), real (B, N), hash keys, n."""
    b, h, n, d = query.shape
    groups = h // key.shape[1]
    if groups > 1:  # GQA: each query head gets its KV head's keys, hashed alongside it
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    real = (
        torch.ones(b, n, dtype=torch.bool, device=query.device)
        if key_padding_mask is None
        else key_padding_mask.bool()
    )
    if shared_qk:
        key = query / query.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    chunks = max(1, math.ceil(n / bucket_size))
    pad = chunks * bucket_size - n
    if pad:
        query, key, value = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (query, key, value))
        real = torch.nn.functional.pad(real, (0, pad), value=False)
    if shared_qk:
        hash_k = key
    else:
        w = real[:, None, :, None].to(key.dtype)  # (B, 1, N, 1)
        mean = (key * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1)
        hash_k = key - mean  # softmax is blind to this shift; the buckets are not
    return query, key, value, real, hash_k, n, chunks


def lsh_orders(
    query: Tensor,
    key: Tensor,
    *,
    n_hashes: int,
    bucket_size: int,
    seed: int,
    key_padding_mask: Tensor | None = None,
    shared_qk: bool = False,
) -> list[tuple[Tensor, Tensor]]:
    """The per-round (query order, key order), each (B, H, N): who meets whom. For tests and
    inspection; `lsh_attention` computes the same orders head block by head block."""
    q, _, _, real, hash_k, _, chunks = _prepare(query, key, key, key_padding_mask, bucket_size, shared_qk)
    n_buckets = _n_buckets(chunks)
    rot = _rotations(seed, n_hashes, q.shape[-1], n_buckets)
    real_h = real[:, None, :].expand(-1, q.shape[1], -1)
    out = []
    for r in range(n_hashes):
        q_order = _order(_hash(q, rot[r]), real_h, n_buckets)
        k_order = q_order if shared_qk else _order(_hash(hash_k, rot[r]), real_h, n_buckets)
        out.append((q_order, k_order))
    return out


def _n_buckets(chunks: int) -> int:
    return max(2, chunks + chunks % 2)  # about one bucket per chunk (Reformer), even for ±R


def lsh_attention(
    query: Tensor,  # (B, H, n, D)
    key: Tensor,  # (B, H_kv, n, D)
    value: Tensor,  # (B, H_kv, n, D)
    *,
    n_hashes: int,
    bucket_size: int,
    seed: int,
    key_padding_mask: Tensor | None,  # (B, n) bool, True = real token
    scaling: float,
    shared_qk: bool = False,
    score_budget: int = 1 << 22,  # score elements held at once: bounds peak memory
) -> Tensor:  # (B, H, n, D)
    if n_hashes <= 0 or bucket_size <= 0:
        raise ValueError(f"n_hashes ({n_hashes}) and bucket_size ({bucket_size}) must be positive")
    if query.shape[2] != key.shape[2]:
        raise ValueError("LSH attention needs queries and keys of the same length (self-attention)")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} KV heads")
    q, k, v, real, hash_k, n, chunks = _prepare(query, key, value, key_padding_mask, bucket_size, shared_qk)
    b, h, big_n, d = q.shape
    c = bucket_size
    n_buckets = _n_buckets(chunks)
    rot = _rotations(seed, n_hashes, d, n_buckets)
    per_head = b * big_n * c * (2 if chunks > 1 else 1)
    step = max(1, min(h, score_budget // per_head))
    out = torch.empty_like(q)
    for h0 in range(0, h, step):
        hs = slice(h0, min(h, h0 + step))
        out[:, hs] = _lsh_heads(
            q[:, hs], k[:, hs], v[:, hs], hash_k[:, hs], real, rot, n_buckets, c, scaling, shared_qk
        )
    return out[:, :, :n]


def _lsh_heads(q, k, v, hash_k, real, rot, n_buckets, c, scaling, shared_qk):
    """All hash rounds for one block of heads; (B, h, N, D) in, (B, h, N, D) out."""
    b, h, big_n, d = q.shape
    chunks = big_n // c
    real_h = real[:, None, :].expand(-1, h, -1)  # (B, h, N)
    out = torch.zeros_like(q)
    lse = torch.full((b, h, big_n), -math.inf, dtype=q.dtype, device=q.device)
    seen_q, seen_k = [], []  # earlier rounds' chunk index of every query / key position
    for r in range(rot.shape[0]):
        q_order = _order(_hash(q, rot[r]), real_h, n_buckets)  # (B, h, N)
        k_order = q_order if shared_qk else _order(_hash(hash_k, rot[r]), real_h, n_buckets)
        sq = _gather(q, q_order).view(b, h, chunks, c, d) * scaling  # (B, h, C, c, D)
        wk = _with_previous(_gather(k, k_order).view(b, h, chunks, c, d))  # (B, h, C, w, D)
        wv = _with_previous(_gather(v, k_order).view(b, h, chunks, c, d))
        qpos = q_order.view(b, h, chunks, c)  # (B, h, C, c)
        kpos = _with_previous(k_order.view(b, h, chunks, c))  # (B, h, C, w)
        scores = torch.matmul(sq, wk.transpose(-1, -2))  # (B, h, C, c, w)

        drop = ~real_h.gather(2, kpos.flatten(2)).view_as(kpos)[..., None, :]  # (B,h,C,1,w)
        for cq, ck in zip(seen_q, seen_k):
            a = cq.gather(2, q_order).view(b, h, chunks, c)[..., :, None]  # (B, h, C, c, 1)
            z = ck.gather(2, kpos.flatten(2)).view_as(kpos)[..., None, :]  # (B, h, C, 1, w)
            gap = a - z  # query chunk - key chunk in that round: met iff 0 or 1 (cyclic)
            drop = drop | (gap == 0) | (gap == 1) | (gap == 1 - chunks)
        scores.masked_fill_(drop, _NEG)
        if shared_qk:  # Reformer: attend to yourself only if nothing else is in reach
            scores.masked_fill_((qpos[..., :, None] == kpos[..., None, :]) & ~drop, _SELF)

        round_lse = torch.logsumexp(scores, dim=-1)  # (B, h, C, c)
        probs = torch.exp(scores.sub_(round_lse[..., None]))
        round_out = torch.matmul(probs, wv).view(b, h, big_n, d)  # sorted query order
        round_lse = round_lse.view(b, h, big_n)

        # Back to position order, then merge with the earlier rounds by log-sum-exp.
        unsorted_out = torch.empty_like(round_out).scatter_(2, q_order[..., None].expand(-1, -1, -1, d), round_out)
        unsorted_lse = torch.empty_like(round_lse).scatter_(2, q_order, round_lse)
        new_lse = torch.logaddexp(lse, unsorted_lse)
        out = out * torch.exp(lse - new_lse)[..., None] + unsorted_out * torch.exp(unsorted_lse - new_lse)[..., None]
        lse = new_lse
        if r + 1 < rot.shape[0]:
            seen_q.append(_chunk_of(q_order, c))
            seen_k.append(seen_q[-1] if shared_qk else _chunk_of(k_order, c))
    return out


def lsh_cost(n: int, heads: int, head_dim: int, n_hashes: int, bucket_size: int) -> dict:
    """Multiply-add FLOPs (×2) and bytes of attention scores held at once (fp32)."""
    window = min(n, 2 * bucket_size)
    attend = 2 * 2 * heads * n * window * head_dim * n_hashes
    hashing = 2 * heads * n * head_dim * max(1, n // bucket_size) * n_hashes  # x·R for Q and K
    return {"flops": attend + hashing, "score_bytes": 4 * heads * n * window}
