"""Sliding-window attention with dilation and global tokens (Longformer; Beltagy et al., 2020).

Semantics (positions are key positions; the n_q queries are the *last* n_q of the n_k keys, so
a decode step with a KV cache is the same function as a full forward):
- bidirectional, window w: query p attends keys k with |p - k| <= w // 2 ("±w/2");
- causal, window w: query p attends keys p - w + 1 … p (w keys including itself — the
  convention of transformers' `sliding_window`, so a Mistral-style window maps one to one);
- dilation δ (one per head group, heads split into equal contiguous groups): the window is
  taken over keys at distances that are multiples of δ — the same w keys, δ× the reach;
- global tokens (Longformer's task-specific global attention): a global key is attended by
  every query (still respecting causality and padding); a global query attends every key;
- key padding: masked keys are never attended; a query with no key left outputs zeros.

How it is fast (../shared/DESIGN.md §2): queries are cut into blocks of c; block b needs the
key strip [s - hi, s + c - 1 - lo] of length L = c + hi - lo. For interior blocks (strip in
range, no masked key) the strips are an `as_strided` view of the keys — no copy — and they all
go through the fused CPU flash kernel in one call with one tiny (c, L) band mask shared by
every block. The other blocks (sequence edges, padded stretches, neighbours of a global key)
go in short runs on contiguous slices with their own explicit (rows, keys) mask, at most
~L/4 rows at a time (band_plan lists these calls). Global keys and global queries are separate
small attentions, merged exactly by log-sum-exp. Nothing of size n_q × n_k is ever built.

Short inputs (at most 2^20 scores per batch element) may instead go through one masked call
(sliding_masked.py) when its measured cost model says that is cheaper: the fixed cost of the
blocked path's many calls outweighs the scores the mask wastes there.

Training runs fused kernels backward too: the strips' key gradient is summed back by
strips.py, and with global tokens the band and the global keys form one softmax whose backward
is joint.py's (the fused backward per call, with the joint output and log-sum-exp).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import SurgeonError
from .strips import add_strips_, overlapping_strips

__all__ = ["sliding_window_attention", "window_bounds", "default_block_size"]


def window_bounds(window: int, causal: bool) -> tuple[int, int]:
    """Allowed offsets r = p - k (query minus key position), inclusive: lo <= r <= hi."""
    if causal:
        return 0, window - 1
    return -(window // 2), window // 2


def default_block_size(lo: int, hi: int) -> int:
    """Query block size c. Each block computes c + hi - lo keys per query, so small c wastes
    less; too small and the flash kernel's per-block cost dominates. Measured (12 heads, d=64,
    fp32, 2 threads, window 512, interleaved rounds, best of 10 / 5; seconds):
    n=4096 ±256: c=32 0.056, 48 0.059, 64 0.059; causal 0.058 / 0.062 / 0.061;
    n=16384 ±256: 0.245 / 0.256 / 0.259; causal 0.259 / 0.273 / 0.270. Smaller blocks
    (16, 24) lose again: the kernel's fixed cost per block takes over."""
    return 32


def sliding_window_attention(
    query: Tensor,  # (B, H, n_q, D)
    key: Tensor,  # (B, H_kv, n_k, D)
    value: Tensor,  # (B, H_kv, n_k, D)
    *,
    window: int,
    causal: bool,
    dilation: int | Sequence[int] = 1,
    global_mask: Tensor | None = None,  # (B, n_k) bool, True = global token
    key_padding_mask: Tensor | None = None,  # (B, n_k) bool, True = real token
    scaling: float | None = None,
    dropout: float = 0.0,
    block_size: int | None = None,
    method: str = "auto",  # "blocked": band_plan's calls; "masked": one masked call (sliding_masked.py)
) -> Tensor:  # (B, H, n_q, D)
    b, h, n_q, d = query.shape
    n_k = key.shape[2]
    _check_inputs(query, key, value, window, global_mask, key_padding_mask)
    dilations = _dilations_per_group(dilation, h)
    scale = d**-0.5 if scaling is None else scaling
    lo, hi = window_bounds(window, causal)
    q0 = n_k - n_q  # position of the first query among the keys

    key, value = expand_kv(key, h), expand_kv(value, h)  # (B, H, n_k, D)
    if method not in ("auto", "blocked", "masked"):
        raise SurgeonError(f"sliding_window_attention: method must be auto, blocked or masked, got {method!r}")
    if global_mask is not None and key_padding_mask is not None:
        global_mask = global_mask & key_padding_mask  # a padded position is never global
    if global_mask is not None and not bool(global_mask.any()):
        global_mask = None
    if method != "blocked":
        from .sliding_masked import masked_is_cheaper, masked_sliding_attention

        if method == "masked" or masked_is_cheaper(
            b, h, d, n_q, n_k, lo, hi, dilations, global_mask is not None, block_size
        ):
            return masked_sliding_attention(
                query, key, value, lo=lo, hi=hi, causal=causal, dilations=dilations, global_mask=global_mask,
                key_padding_mask=key_padding_mask, scale=scale, dropout=dropout,
            )  # fmt: skip
    # (B, H, n_q, D) view of a (B, n_q, H, D) buffer: transformers wants (B, n_q, H, D) back,
    # so the caller's transpose(1, 2).contiguous() is then free instead of a copy of the output.
    out = query.new_empty(b, n_q, h, d).transpose(1, 2)
    group = h // len(dilations)
    # Writing straight into out[bi, hs] saves a copy, but autograd cannot follow in-place writes
    # through two levels of views: with gradients, each part gets a fresh buffer.
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    for bi in range(b):
        pad = key_padding_mask[bi] if key_padding_mask is not None else None  # (n_k,)
        glob = global_mask[bi] if global_mask is not None else None  # (n_k,), already & pad
        if glob is not None and not bool(glob.any()):
            glob = None
        # the window part must not see global keys: they are attended once, in the global part
        window_keys_ok = pad if glob is None else (~glob if pad is None else pad & ~glob)
        for gi, dil in enumerate(dilations):
            hs = slice(gi * group, (gi + 1) * group)
            q, k, v = query[bi, hs], key[bi, hs], value[bi, hs]  # (Hg, n, D)
            if glob is not None and grad and dil == 1 and dropout == 0.0 and q.device.type == "cpu":
                # training with global tokens: band and global keys in one softmax whose
                # backward runs the fused kernel too (joint.py)
                from .joint import band_with_extra_keys

                g_idx = glob.nonzero().flatten()  # (G,)
                pieces = band_plan(n_q, n_k, window_keys_ok, lo, hi, q0, block_size, q.device)
                allowed = _global_key_mask(g_idx, n_q, causal, q0)[None]  # (1, n_q, G)
                o = band_with_extra_keys(q, k, v, k[:, g_idx], v[:, g_idx], allowed, pieces, scale)
                out[bi, hs] = _global_queries(o, q, k, v, glob, pad, causal, q0, scale, dropout, False)
                continue
            # the LSE feeds a merge only with global tokens; then it must carry gradient
            o, lse = _dilated_band(
                q, k, v, window_keys_ok, lo, hi, dil, q0, scale, dropout, block_size,
                glob is not None, None if grad else out[bi, hs],
            )
            if glob is not None:
                # without autograd, o is out[bi, hs] itself and both steps update it in place
                o = _add_global_keys(o, lse, q, k, v, glob, causal, q0, scale, dropout, not grad)
                o = _global_queries(o, q, k, v, glob, pad, causal, q0, scale, dropout, not grad)
            if grad:
                out[bi, hs] = o
    return out


def _check_inputs(query, key, value, window, global_mask, key_padding_mask) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape:
        raise SurgeonError("sliding_window_attention: expected query (B,H,n_q,D), key/value (B,H_kv,n_k,D)")
    if window < 1:
        raise SurgeonError(f"sliding_window_attention: window must be >= 1, got {window}")
    b, h, n_q, _ = query.shape
    if key.shape[0] != b or h % key.shape[1] or n_q > key.shape[2]:
        raise SurgeonError(
            f"sliding_window_attention: incompatible shapes query {tuple(query.shape)} key {tuple(key.shape)}"
        )
    for name, m in (("global_mask", global_mask), ("key_padding_mask", key_padding_mask)):
        if m is not None and (m.dtype != torch.bool or tuple(m.shape) != (b, key.shape[2])):
            raise SurgeonError(
                f"sliding_window_attention: {name} must be a bool (B, n_k)=({b}, {key.shape[2]}) tensor,"
                f" got {m.dtype} {tuple(m.shape)}"
            )


def _dilations_per_group(dilation: int | Sequence[int], heads: int) -> list[int]:
    dils = [dilation] if isinstance(dilation, int) else list(dilation)
    if not dils or any((not isinstance(x, int)) or x < 1 for x in dils):
        raise SurgeonError(f"sliding_window_attention: dilation must be integers >= 1, got {dilation!r}")
    if heads % len(dils):
        raise SurgeonError(
            f"sliding_window_attention: {len(dils)} dilation head groups do not divide {heads} heads"
        )
    return dils


def _dilated_band(q, k, v, keys_ok, lo, hi, dil, q0, scale, dropout, block_size, lse_grad, out):
    """Band attention with dilation δ: position p = δ·t + ρ only meets keys of its own residue
    ρ, at residue-space offsets in [lo, hi] — so it is δ independent undilated bands."""
    if dil == 1:
        return _band(q, k, v, keys_ok, lo, hi, q0, scale, dropout, block_size, lse_grad, out)
    hg, n_q, d = q.shape
    n_k = k.shape[1]
    if out is None:
        out = q.new_empty(hg, n_q, d)
    lse = q.new_full((hg, n_q), float("-inf"), dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
    for rho in range(dil):
        k_idx = torch.arange(rho, n_k, dil, device=q.device)  # keys of residue ρ
        # queries of residue ρ: positions q0 + i ≡ ρ (mod δ)
        first = (rho - q0) % dil
        q_idx = torch.arange(first, n_q, dil, device=q.device)
        if len(q_idx) == 0:
            continue
        # in residue space the queries are the last len(q_idx) keys of this residue
        ok = keys_ok[k_idx] if keys_ok is not None else None
        o_r, l_r = _band(
            q[:, q_idx], k[:, k_idx], v[:, k_idx], ok, lo, hi,
            len(k_idx) - len(q_idx), scale, dropout, block_size, lse_grad,
        )
        out[:, q_idx] = o_r
        lse[:, q_idx] = l_r.to(lse.dtype)
    return out, lse


@dataclass
class BandPiece:
    """One fused call of the band: `blocks` blocks of `step` query rows from r0 (one block: rows
    r0 … r1 - 1), block i seeing keys start + i·step … start + i·step + length - 1. mask: bool
    (rows of one block, length) or broadcastable, True = may attend; None = every key."""

    r0: int
    r1: int
    blocks: int
    step: int
    start: int
    length: int
    mask: Tensor | None
    is_causal: bool = False

    @property
    def scores(self) -> int:  # (query, key) pairs the call computes, per head
        return (self.r1 - self.r0) * self.length

    def rows(self, x: Tensor) -> Tensor:  # (Hg, n_q, ...) -> (N, Hg, rows of a block, ...), a view
        if self.blocks == 1:
            return x[None, :, self.r0 : self.r1]
        return x[:, self.r0 : self.r1].unflatten(1, (self.blocks, self.step)).transpose(0, 1)

    def keys(self, x: Tensor) -> Tensor:  # (Hg, n_k, D) -> (N, Hg, length, D), a view
        if self.blocks == 1:
            return x[None, :, self.start : self.start + self.length]
        return overlapping_strips(x, self.start, self.blocks, self.step, self.length)

    def add_to_keys_(self, target: Tensor, grad: Tensor) -> None:  # the gradient of keys()
        if self.blocks == 1:
            target[:, self.start : self.start + self.length] += grad[0]
        else:
            add_strips_(target, grad, self.start, self.blocks, self.step, self.length)


def band_plan(n_q, n_k, keys_ok, lo, hi, q0, block_size, device) -> list[BandPiece]:
    """The fused calls that compute the undilated band: query i (position q0 + i) attends key j
    iff lo <= q0 + i - j <= hi and keys_ok[j]. A piece of length 0 has no key in reach."""
    if hi >= n_k - 1 and lo <= q0 - n_k + 1:  # the window covers every key: dense attention
        return [BandPiece(0, n_q, 1, n_q, 0, n_k, None if keys_ok is None else keys_ok[None, :])]
    c = max(1, min(block_size or default_block_size(lo, hi), n_q))
    nb = -(-n_q // c)
    strip = c + hi - lo  # keys seen by one query block
    if strip >= 64:
        # The fused kernel runs measurably faster on key counts that are multiples of 16 (its
        # vector width): at c = 32, 543 keys took 6 % longer than 544, 95 took 15 % longer than
        # 96. So the strip grows to one; the band mask leaves the extra keys out.
        strip = -(-strip // 16) * 16
    starts = q0 - hi + c * torch.arange(nb, device=device)  # first key of each block's strip
    # Interior blocks: full block, strip inside [0, n_k), every key attendable. They are read
    # as strided views of q/k/v (no copy) and share one (c, L) band mask.
    interior = (starts >= 0) & (starts + strip <= n_k)
    interior &= torch.arange(nb, device=device) * c + c <= n_q
    if keys_ok is not None:
        bad = torch.cat([keys_ok.new_zeros(1, dtype=torch.long), (~keys_ok).long().cumsum(0)])
        s0, s1 = starts.clamp(0, n_k), (starts + strip).clamp(0, n_k)
        interior &= bad[s1] - bad[s0] == 0
    pieces = []
    # Causal prefix of a full forward (q0 = 0): while p <= hi the window reaches back to key 0,
    # so query p attends keys [0, p] — plain causal attention, one fused is_causal call instead
    # of many explicitly masked edge blocks (at n = 2·window that is half the queries).
    prefix = (min(hi + 1, n_q) // c) * c if lo == 0 and q0 == 0 else 0
    if prefix and (keys_ok is None or bool(keys_ok[:prefix].all())):
        pieces.append(BandPiece(0, prefix, 1, prefix, 0, prefix, None, is_causal=True))
    else:
        prefix = 0
    runs = _runs(interior.tolist())
    if len(runs) > 8:  # ragged padding: fewer, bigger calls beat many strided ones
        runs, interior = [], torch.zeros_like(interior)
    # Band of one block: query i (strip position i + hi) attends strip key j iff i <= j <= i + hi - lo.
    i = torch.arange(c, device=device)[:, None]
    j = torch.arange(strip, device=device)[None, :]
    band = (j >= i) & (j <= i + hi - lo)  # (c, L)
    pieces += [BandPiece(a * c, z * c, z - a, c, int(starts[a]), strip, band) for a, z in runs]
    # Edge, partial and padded blocks: consecutive ones go together as one call on contiguous
    # q/k/v slices (views) with an explicit (rows, keys) mask. Calls are capped at ~L/4 rows
    # so that a long padded stretch never turns into an n×n mask.
    edge = ~interior
    edge[: prefix // c] = False  # done above
    chunk = max(1, (strip // 4) // c)
    for a, z in _runs(edge.tolist()):
        for a2 in range(a, z, chunk):
            r0, r1 = a2 * c, min(min(z, a2 + chunk) * c, n_q)
            k0, k1 = max(0, q0 + r0 - hi), min(n_k, q0 + r1 - lo)
            if k1 <= k0:  # no key in reach
                pieces.append(BandPiece(r0, r1, 1, r1 - r0, k0, 0, None))
                continue
            rel = torch.arange(q0 + r0, q0 + r1, device=device)[:, None] - torch.arange(k0, k1, device=device)
            mask = (rel >= lo) & (rel <= hi)  # (rows, keys)
            if keys_ok is not None:
                mask &= keys_ok[k0:k1]
            pieces.append(BandPiece(r0, r1, 1, r1 - r0, k0, k1 - k0, mask))
    return pieces


def _band(q, k, v, keys_ok, lo, hi, q0, scale, dropout, block_size, lse_grad=False, out=None):
    """Undilated band (see band_plan). q: (Hg, n_q, D), k/v: (Hg, n_k, D). Returns out
    (Hg, n_q, D) — written into `out` when given — and lse (Hg, n_q)."""
    pieces = band_plan(q.shape[1], k.shape[1], keys_ok, lo, hi, q0, block_size, q.device)
    return run_band(q, k, v, pieces, scale, dropout, lse_grad, out)


def run_band(q, k, v, pieces, scale, dropout=0.0, lse_grad=False, out=None):
    """The fused calls of a band_plan: out (Hg, n_q, D), written into `out` when given, and
    lse (Hg, n_q)."""
    hg, n_q, d = q.shape
    if out is None:
        out = q.new_empty(hg, n_q, d)
    lse = q.new_empty(hg, n_q, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
    for piece in pieces:
        if piece.length == 0:  # output 0 (the kernel's convention for empty rows)
            piece.rows(out).zero_()
            piece.rows(lse).fill_(float("-inf"))
            continue
        mask = None if piece.mask is None else piece.mask[None, None]
        o, l_ = attend(piece.rows(q), piece.keys(k), piece.keys(v), mask, scale, dropout, lse_grad,
                       is_causal=piece.is_causal)  # fmt: skip
        piece.rows(out).copy_(o)
        piece.rows(lse).copy_(l_)
    return out, lse


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs [a, z) of True."""
    runs, start = [], None
    for idx, f in enumerate(flags + [False]):
        if f and start is None:
            start = idx
        elif not f and start is not None:
            runs.append((start, idx))
            start = None
    return runs


def _add_global_keys(o, lse, q, k, v, glob, causal, q0, scale, dropout, inplace):
    """Every query also attends the global keys (Longformer's symmetric global attention)."""
    g_idx = glob.nonzero().flatten()  # (G,)
    allowed = _global_key_mask(g_idx, q.shape[1], causal, q0)  # (n_q, G)
    o_g, l_g = attend(
        q[None], k[None, :, g_idx], v[None, :, g_idx], allowed[None, None], scale, dropout,
        need_lse_grad=True,
    )
    return merge_lse(o, lse, o_g[0], l_g[0], inplace=inplace)


def _global_key_mask(g_idx: Tensor, n_q: int, causal: bool, q0: int) -> Tensor:  # (n_q, G) bool
    """Which queries may attend each global key: all of them, or those at or after it if causal."""
    allowed = torch.ones(n_q, len(g_idx), dtype=torch.bool, device=g_idx.device)
    if causal:
        q_pos = torch.arange(q0, q0 + n_q, device=g_idx.device)[:, None]
        allowed = allowed & (g_idx[None, :] <= q_pos)
    return allowed


def _global_queries(o, q, k, v, glob, pad, causal, q0, scale, dropout, inplace):
    """Global queries attend every (real, causally visible) key: overwrite their rows."""
    n_k = k.shape[1]
    g_pos = glob[q0:].nonzero().flatten()  # query indices that are global
    if len(g_pos) == 0:
        return o
    k_pos = torch.arange(n_k, device=q.device)[None, :]
    allowed = torch.ones(len(g_pos), n_k, dtype=torch.bool, device=q.device)  # (G, n_k)
    if pad is not None:
        allowed = allowed & pad[None, :]
    if causal:
        allowed = allowed & (k_pos <= (g_pos + q0)[:, None])
    o_g, _ = attend(q[None, :, g_pos], k[None], v[None], allowed[None, None], scale, dropout)
    if not inplace:
        o = o.clone()
    o[:, g_pos] = o_g[0]
    return o


# ---- shared helpers (also used by blockwise.py) -------------------------------------------

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
