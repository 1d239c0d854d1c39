"""The band: every query attends the keys at offsets lo … hi from its own position, through the
fused CPU flash kernel, without ever building an n_q × n_k mask (the blocked route of the
sliding window, Longformer; Beltagy et al., 2020).

Queries are cut into blocks of c; block b needs the key strip [s - hi, s + c - 1 - lo] of length
L = c + hi - lo. For interior blocks (strip in range, no masked key) the strips are an
`as_strided` view of the keys — no copy — and they all go through the fused kernel in one call
with one tiny (c, L) band mask shared by every block. The other blocks (sequence edges, padded
stretches) go in short runs on contiguous slices with their own explicit (rows, keys) mask, at
most ~L/4 rows at a time. `band_plan` lists these calls (`BandPiece`s), `run_band` makes them;
`band` and `dilated_band` are the two together for one head group.

Positions: the n_q queries are the *last* n_q of the n_k keys (q0 = n_k - n_q is the position of
the first query), so a decode step with a KV cache is the same function as a full forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .primitives import attend
from .strips import add_strips_, overlapping_strips


def window_bounds(window: int, causal: bool) -> tuple[int, int]:
    """Allowed offsets r = p - k (query minus key position), inclusive: lo <= r <= hi.
    Bidirectional window w: ±w/2; causal: the w keys p - w + 1 … p (transformers' convention
    for `sliding_window`)."""
    if causal:
        return 0, window - 1
    return -(window // 2), window // 2


def default_block_size(lo: int, hi: int) -> int:
    """Query block size c. Each block computes c + hi - lo keys per query, so small c wastes
    less; too small and the flash kernel's fixed cost per block dominates. 32 was the fastest
    of 16 … 64 at ±256 and causal 512, n = 4096 and 16384 (timings in benchmarks/README.md,
    "Query block size")."""
    return 32


@dataclass(frozen=True, kw_only=True)
class BandSpec:
    """One band attention of one head group: query i (position q0 + i among the keys) attends
    key j iff lo <= q0 + i - j <= hi and the key is not masked."""

    lo: int
    hi: int
    q0: int  # position of the first query among the keys
    scale: float
    dropout: float = 0.0
    block_size: int | None = None  # query rows per block; None: default_block_size
    # the module is causal: the band is lo … hi either way, but global tokens (sliding.py)
    # respect causality when they reach beyond it
    causal: bool = False

    def plan(self, n_q: int, n_k: int, keys_ok: Tensor | None, device) -> list[BandPiece]:
        return band_plan(n_q, n_k, keys_ok, lo=self.lo, hi=self.hi, q0=self.q0, block_size=self.block_size,
                         device=device)  # fmt: skip


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


def band_plan(
    n_q: int, n_k: int, keys_ok: Tensor | None, *, lo: int, hi: int, q0: int, block_size: int | None, device,
) -> list[BandPiece]:  # fmt: skip
    """The fused calls that compute the undilated band: query i (position q0 + i) attends key j
    iff lo <= q0 + i - j <= hi and keys_ok[j] (keys_ok: (n_k,) bool or None). A piece of length
    0 has no key in reach."""
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
    band_mask = (j >= i) & (j <= i + hi - lo)  # (c, L)
    pieces += [BandPiece(a * c, z * c, z - a, c, int(starts[a]), strip, band_mask) for a, z in runs]
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


def run_band(
    q: Tensor,  # (Hg, n_q, D)
    k: Tensor,  # (Hg, n_k, D)
    v: Tensor,  # (Hg, n_k, D)
    pieces: list[BandPiece],
    *,
    scale: float,
    dropout: float = 0.0,
    lse_grad: bool = False,  # the log-sum-exp feeds a merge under autograd: it must carry gradient
    out: Tensor | None = None,  # (Hg, n_q, D) to write into
) -> tuple[Tensor, Tensor]:  # out (Hg, n_q, D), lse (Hg, n_q)
    """The fused calls of a band_plan."""
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


def band(
    q: Tensor,  # (Hg, n_q, D)
    k: Tensor,  # (Hg, n_k, D)
    v: Tensor,  # (Hg, n_k, D)
    keys_ok: Tensor | None,  # (n_k,) bool, True = may be attended
    spec: BandSpec,
    *,
    lse_grad: bool = False,
    out: Tensor | None = None,  # (Hg, n_q, D) to write into
) -> tuple[Tensor, Tensor]:  # out (Hg, n_q, D), lse (Hg, n_q)
    """The undilated band: its plan, run."""
    pieces = spec.plan(q.shape[1], k.shape[1], keys_ok, q.device)
    return run_band(q, k, v, pieces, scale=spec.scale, dropout=spec.dropout, lse_grad=lse_grad, out=out)


def dilated_band(
    q: Tensor,  # (Hg, n_q, D)
    k: Tensor,  # (Hg, n_k, D)
    v: Tensor,  # (Hg, n_k, D)
    keys_ok: Tensor | None,  # (n_k,) bool
    spec: BandSpec,
    dilation: int,
    *,
    lse_grad: bool = False,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # out (Hg, n_q, D), lse (Hg, n_q)
    """Band attention with dilation δ: position p = δ·t + ρ only meets keys of its own residue
    ρ, at residue-space offsets in [lo, hi] — so it is δ independent undilated bands."""
    if dilation == 1:
        return band(q, k, v, keys_ok, spec, lse_grad=lse_grad, out=out)
    hg, n_q, d = q.shape
    n_k = k.shape[1]
    if out is None:
        out = q.new_empty(hg, n_q, d)
    lse = q.new_full((hg, n_q), float("-inf"), dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
    for rho in range(dilation):
        k_idx = torch.arange(rho, n_k, dilation, device=q.device)  # keys of residue ρ
        # queries of residue ρ: positions q0 + i ≡ ρ (mod δ)
        first = (rho - spec.q0) % dilation
        q_idx = torch.arange(first, n_q, dilation, device=q.device)
        if len(q_idx) == 0:
            continue
        # in residue space the queries are the last len(q_idx) keys of this residue
        ok = keys_ok[k_idx] if keys_ok is not None else None
        residue = dataclasses.replace(spec, q0=len(k_idx) - len(q_idx))
        o_r, l_r = band(q[:, q_idx], k[:, k_idx], v[:, k_idx], ok, residue, lse_grad=lse_grad)
        out[:, q_idx] = o_r
        lse[:, q_idx] = l_r.to(lse.dtype)
    return out, lse
