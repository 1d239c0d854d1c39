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


def _rotations(seed: int, n_hashes: int, head_dim: int, n_buckets: int) -> list[Tensor]:
    """Per round, one or two rotation matrices (D, b/2); the bucket is the pair's joint code.

    Reformer uses one rotation with n_buckets/2 columns. Hashing then costs as much as the
    attention itself at 16k (256 buckets), so past 32 buckets we AND two independent
    cross-polytope hashes of √n_buckets buckets each (still an LSH for the angle, with the same
    number of buckets) at an eighth of the cost."""
    gen = torch.Generator().manual_seed(seed)
    sizes = _hash_sizes(n_buckets)
    return [
        [torch.randn(head_dim, size // 2, generator=gen) for size in sizes] for _ in range(n_hashes)
    ]


def _hash_sizes(n_buckets: int) -> list[int]:
    if n_buckets <= 32:
        return [n_buckets]
    first = 2 * math.ceil(math.sqrt(n_buckets) / 2)
    return [first, 2 * math.ceil(n_buckets / first / 2)]


def _hash_rounds(x: Tensor, rot: list[list[Tensor]]) -> list[Tensor]:
    """Bucket codes of every round, (B, h, N) long each. All rotations go through one GEMM:
    a few columns per round would leave the matrix multiply mostly idle."""
    flat = [r for round_rots in rot for r in round_rots]
    proj = torch.matmul(x, torch.cat(flat, dim=1).to(x.dtype))  # (B, h, N, Σ b/2)
    codes, col = [], 0
    for round_rots in rot:
        code = None
        for r in round_rots:
            half = r.shape[1]
            part = proj[..., col : col + half]  # (B, h, N, b/2)
            col += half
            # argmax over [xR; -xR] without building it: the larger of max(xR) and -min(xR)
            hi, hi_idx = part.max(dim=-1)
            lo, lo_idx = part.min(dim=-1)
            bucket = torch.where(hi >= -lo, hi_idx, lo_idx + half)
            code = bucket if code is None else code * (2 * half) + bucket
        codes.append(code)
    return codes


def _order(buckets: Tensor, real: Tensor, n_buckets: int) -> Tensor:
    """Stable sort of positions by bucket; padding goes last in its own bucket, so real queries
    and real keys occupy the same leading chunks."""
    n = buckets.shape[-1]
    buckets = torch.where(real, buckets, n_buckets)  # (B, h, N)
    pos = torch.arange(n, device=buckets.device)
    return torch.argsort(buckets * n + pos, dim=-1)  # (B, h, N)


def _rank(order: Tensor) -> Tensor:  # (B, h, N): the inverse permutation, position -> rank
    rank = torch.empty_like(order)
    return rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))


def _chunk_of(rank: Tensor, chunk: int) -> Tensor:  # (B, h, N) position -> its chunk index
    small = torch.int16 if rank.shape[-1] // chunk < 2**15 else torch.int32
    return (rank // chunk).to(small)


def _gather(x: Tensor, order: Tensor) -> Tensor:  # (B, h, N, D) by (B, h, M) -> (B, h, M, D)
    """Row gather along the sequence; whole D-rows through index_select (3× faster on CPU than
    an element-wise `gather` with the index broadcast over D)."""
    b, h, n, d = x.shape
    offset = torch.arange(b * h, device=x.device).view(b, h, 1) * n
    rows = x.reshape(b * h * n, d).index_select(0, (order + offset).flatten())
    return rows.view(b, h, order.shape[-1], d)


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
    rot = _rotations(seed, n_hashes, q.shape[-1], _n_buckets(chunks))
    real_h = real[:, None, :].expand(-1, q.shape[1], -1)
    q_codes = _hash_rounds(q, rot)
    k_codes = q_codes if shared_qk else _hash_rounds(hash_k, rot)
    out = []
    for r in range(n_hashes):
        n_buckets = _bucket_count(rot[r])
        q_order = _order(q_codes[r], real_h, n_buckets)
        k_order = q_order if shared_qk else _order(k_codes[r], real_h, n_buckets)
        out.append((q_order, k_order))
    return out


def _n_buckets(chunks: int) -> int:
    return max(2, chunks + chunks % 2)  # about one bucket per chunk (Reformer), even for ±R


def _bucket_count(rots: list[Tensor]) -> int:
    return math.prod(2 * rot.shape[1] for rot in rots)


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
    dropout: float = 0.0,
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
    rot = _rotations(seed, n_hashes, d, _n_buckets(chunks))
    per_head = b * big_n * c * (2 if chunks > 1 else 1)
    step = max(1, min(h, score_budget // per_head))
    out = torch.empty_like(q)
    for h0 in range(0, h, step):
        hs = slice(h0, min(h, h0 + step))
        out[:, hs] = _lsh_heads(
            q[:, hs], k[:, hs], v[:, hs], hash_k[:, hs], real, rot, c, scaling, shared_qk, dropout
        )
    return out[:, :, :n]


def _lsh_heads(q, k, v, hash_k, real, rot, c, scaling, shared_qk, dropout):
    """All hash rounds for one block of heads; (B, h, N, D) in, (B, h, N, D) out."""
    b, h, big_n, d = q.shape
    chunks = big_n // c
    real_h = real[:, None, :].expand(-1, h, -1)  # (B, h, N)
    out = torch.zeros_like(q)
    lse = torch.full((b, h, big_n), -math.inf, dtype=q.dtype, device=q.device)
    seen_q, seen_k = [], []  # earlier rounds' chunk index of every query / key position
    q = q * scaling  # once, before gathering; hashing is blind to a positive scale
    padded = not bool(real.all())
    neg = torch.tensor(_NEG, dtype=q.dtype, device=q.device)
    zero = torch.tensor(0.0, dtype=q.dtype, device=q.device)
    q_codes = _hash_rounds(q, rot)
    k_codes = q_codes if shared_qk else _hash_rounds(hash_k, rot)
    for r in range(len(rot)):
        n_buckets = _bucket_count(rot[r])
        q_order = _order(q_codes[r], real_h, n_buckets)  # (B, h, N)
        k_order = q_order if shared_qk else _order(k_codes[r], real_h, n_buckets)
        qpos = q_order.view(b, h, chunks, c)  # (B, h, C, c)
        kpos = _with_previous(k_order.view(b, h, chunks, c))  # (B, h, C, w)
        sq = _gather(q, q_order).view(b, h, chunks, c, d)  # (B, h, C, c, D)
        wk = _gather(k, kpos.flatten(2)).view(*kpos.shape, d)  # (B, h, C, w, D)
        wv = _gather(v, kpos.flatten(2)).view(*kpos.shape, d)
        # Additive mask over each chunk's window: padding, and pairs an earlier round already
        # covered. The fused kernel on (B·h, C, c, D) blocks is 2-3× faster than scores by hand
        # and returns the log-sum-exp the rounds are merged with.
        drop = None  # (B, h, C, c, w) bool, None = nothing to mask (round one without padding)
        if padded:
            drop = (~real_h.gather(2, kpos.flatten(2)).view_as(kpos))[..., None, :]  # (B,h,C,1,w)
            drop = drop.expand(b, h, chunks, c, kpos.shape[-1]).clone()
        for cq, ck in zip(seen_q, seen_k):
            # In that earlier round query chunk a met key chunks a and a-1 (cyclically).
            a = cq.gather(2, q_order).view(b, h, chunks, c)[..., :, None]  # (B, h, C, c, 1)
            z = ck.gather(2, kpos.flatten(2)).view_as(kpos)  # (B, h, C, w)
            z_next = torch.where(z == chunks - 1, 0, z + 1).to(z.dtype)[..., None, :]
            met = a == z[..., None, :]
            met |= a == z_next
            drop = met if drop is None else drop.bitwise_or_(met)
        bias = None
        if drop is not None:
            bias = torch.where(drop, neg, zero)  # (B, h, C, c, w)
        if shared_qk:  # Reformer: attend to yourself only if nothing else is in reach
            own = qpos[..., :, None] == kpos[..., None, :]  # (B, h, C, c, w)
            if drop is not None:
                own &= ~drop
            bias = (torch.zeros_like(own, dtype=q.dtype) if bias is None else bias).masked_fill_(own, _SELF)
        w = kpos.shape[-1]
        round_out, round_lse = _chunk_attention(
            sq.view(b * h, chunks, c, d),
            wk.view(b * h, chunks, w, d),
            wv.view(b * h, chunks, w, d),
            None if bias is None else bias.view(b * h, chunks, c, w),
            dropout,
        )  # (B·h, C, c, D), (B·h, C, c)
        round_out = round_out.reshape(b, h, big_n, d)  # sorted query order
        round_lse = round_lse.reshape(b, h, big_n).to(q.dtype)

        # Back to position order, then merge with the earlier rounds by log-sum-exp.
        q_rank = _rank(q_order)
        unsorted_out = _gather(round_out, q_rank)  # (B, h, N, D)
        unsorted_lse = round_lse.gather(2, q_rank)  # (B, h, N)
        new_lse = torch.logaddexp(lse, unsorted_lse)
        out = out * torch.exp(lse - new_lse)[..., None]
        out += unsorted_out * torch.exp(unsorted_lse - new_lse)[..., None]
        lse = new_lse
        if r + 1 < len(rot):
            seen_q.append(_chunk_of(q_rank, c))
            seen_k.append(seen_q[-1] if shared_qk else _chunk_of(_rank(k_order), c))
    return out


def _chunk_attention(q, k, v, bias, dropout):
    """Softmax attention of each chunk's queries over its window, and the log-sum-exp of the
    scores. q: (X, C, c, D) already scaled; k, v: (X, C, w, D); bias: (X, C, c, w) or None.

    Inference uses the fused CPU kernel, which returns the log-sum-exp. Its backward ignores
    the gradient that flows into that log-sum-exp (through the merge of rounds), so when a
    gradient is needed the scores are computed explicitly and autograd sees everything."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not needs_grad and q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout, attn_mask=bias, scale=1.0
        )
    scores = torch.matmul(q, k.transpose(-1, -2))  # (X, C, c, w)
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)  # (X, C, c)
    probs = torch.exp(scores - lse[..., None])
    if dropout:
        probs = torch.nn.functional.dropout(probs, dropout)
    return torch.matmul(probs, v), lse


def lsh_cost(n: int, heads: int, head_dim: int, n_hashes: int, bucket_size: int) -> dict:
    """Multiply-add FLOPs (×2) and bytes of attention scores held at once (fp32)."""
    window = min(n, 2 * bucket_size)
    attend = 2 * 2 * heads * n * window * head_dim * n_hashes
    columns = sum(_hash_sizes(_n_buckets(math.ceil(n / bucket_size)))) // 2
    hashing = 2 * 2 * heads * n * head_dim * columns * n_hashes  # x·R for Q and K
    return {"flops": attend + hashing, "score_bytes": 4 * heads * n * window}
