"""The band plus a few extra keys (global tokens, compressed slots) in one softmax, trained
with fused kernels both ways.

Forward: the band's fused calls (band.band_plan) and one fused call over the extra keys,
merged by log-sum-exp. Differentiating that merge by autograd needs the gradient of each part's
log-sum-exp, which the fused CPU kernel does not give, so it would run on explicit scores
(primitives.attend's math path): at n = 4096, ±256 with one global token, a training step that
way was barely faster than dense attention's.

Backward, as FlashAttention-2 does for split keys (Dao 2023): the joint softmax's gradient
restricted to one part's keys is that part's attention backward evaluated with the *joint*
output O and log-sum-exp L — P_ij = exp(s_ij - L_i) and D_i = dO_i · O_i are the joint ones.
So every part calls the fused backward once with (O, L) of the union, and the strips' key
gradients are summed back with strips.add_strips_.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .band import BandPiece, run_band
from .primitives import additive_mask, attend, merge_lse

_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def band_with_extra_keys(
    q: Tensor,  # (Hg, n_q, D)
    k: Tensor,  # (Hg, n_k, D): the band's keys
    v: Tensor,  # (Hg, n_k, D)
    extra_k: Tensor,  # (Hg, G, D): keys every query may also attend
    extra_v: Tensor,  # (Hg, G, D)
    extra_mask: Tensor | None,  # bool, broadcastable to (Hg, n_q, G); True = may attend
    pieces: list[BandPiece],  # band.band_plan(...) for q, k
    scale: float,
) -> Tensor:  # (Hg, n_q, D): softmax over [band keys | extra keys] · [V_band ; V_extra]
    """Exact; no dropout. CPU only (the fused backward is the CPU flash kernel's)."""
    return _BandWithExtraKeys.apply(q, k, v, extra_k, extra_v, extra_mask, pieces, scale)


class _BandWithExtraKeys(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, extra_k, extra_v, extra_mask, pieces, scale):
        with torch.no_grad():
            out, lse = run_band(q, k, v, pieces, scale=scale)
            mask = None if extra_mask is None else extra_mask[None]
            o_x, l_x = attend(q[None], extra_k[None], extra_v[None], mask, scale)
            joint_lse = torch.logaddexp(lse, l_x[0].to(lse.dtype))  # (Hg, n_q); -inf: no key at all
            out = merge_lse(out, lse, o_x[0], l_x[0], inplace=True)
        ctx.save_for_backward(q, k, v, extra_k, extra_v, out, joint_lse)
        ctx.pieces, ctx.extra_mask, ctx.scale = pieces, extra_mask, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # (Hg, n_q, D)
        q, k, v, extra_k, extra_v, out, lse = ctx.saved_tensors
        # rows that attend nothing output 0 whatever q, k, v are: no gradient; a finite L keeps
        # exp(s - L) = 0 there instead of NaN
        empty = torch.isneginf(lse)
        lse = lse.masked_fill(empty, 0.0)
        grad_out = grad_out.masked_fill(empty[..., None], 0.0).contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for piece in ctx.pieces:
            if piece.length == 0:
                continue
            mask = None if piece.mask is None else additive_mask(piece.mask, q.dtype)[None, None]
            gq, gk, gv = _flash_backward(
                piece.rows(grad_out), piece.rows(q), piece.keys(k), piece.keys(v), piece.rows(out),
                piece.rows(lse).contiguous(), 0.0, piece.is_causal, attn_mask=mask, scale=ctx.scale,
            )  # fmt: skip
            piece.rows(dq).add_(gq)
            piece.add_to_keys_(dk, gk)
            piece.add_to_keys_(dv, gv)
        mask = None if ctx.extra_mask is None else additive_mask(ctx.extra_mask, q.dtype)[None]
        gq, gxk, gxv = _flash_backward(grad_out[None], q[None], extra_k[None], extra_v[None], out[None],
                                       lse[None].contiguous(), 0.0, False, attn_mask=mask, scale=ctx.scale)  # fmt: skip
        dq += gq[0]
        return dq, dk, dv, gxk[0], gxv[0], None, None, None
