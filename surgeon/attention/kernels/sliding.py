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

route.py picks how: the band's blocked plan of fused calls (band.py), for short inputs one
masked call (sliding_masked.py), or — on CUDA by default — one FlexAttention call whose block mask
skips the tiles outside the pattern (flex.py). On the blocked route global keys and global queries are
separate small attentions, merged exactly by log-sum-exp, and nothing of size n_q × n_k is
ever built. Training runs fused kernels backward too: the strips' key gradient is summed back
by strips.py, and with global tokens the band and the global keys form one softmax whose
backward is joint.py's (the fused backward per call, with the joint output and log-sum-exp).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import SurgeonError
from .band import BandSpec, dilated_band, window_bounds
from .flex import check_flex_inputs, flex_sliding_attention
from .joint import band_with_extra_keys
from .primitives import attend, expand_kv, merge_lse
from .route import FLEX, MASKED, choose_route
from .sliding_masked import masked_sliding_attention

__all__ = ["sliding_window_attention"]


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
    method: str = "auto",  # a route.METHODS name: "auto" (route.choose_route), "sdpa", "blocked", "masked", "flex"
) -> Tensor:  # (B, H, n_q, D)
    b, h, n_q, d = query.shape
    n_k = key.shape[2]
    _check_inputs(query, key, value, window, global_mask, key_padding_mask)
    dilations = _dilations_per_group(dilation, h)
    scale = d**-0.5 if scaling is None else scaling
    lo, hi = window_bounds(window, causal)
    spec = BandSpec(lo=lo, hi=hi, q0=n_k - n_q, scale=scale, dropout=dropout, block_size=block_size, causal=causal)

    if global_mask is not None and key_padding_mask is not None:
        global_mask = global_mask & key_padding_mask  # a padded position is never global
    if global_mask is not None and not bool(global_mask.any()):
        global_mask = None
    if method == "auto" and n_q == 1 and causal and global_mask is None and dilations == [1] * len(dilations):
        return _decode_step(query, key, value, window, key_padding_mask, scale, dropout)
    route = choose_route(method, batch=b, heads=h, head_dim=d, n_q=n_q, n_k=n_k, lo=lo, hi=hi, dilations=dilations,
                         has_global=global_mask is not None, block_size=block_size, device_type=query.device.type,
                         dtype=query.dtype, dropout=dropout)  # fmt: skip
    if route == FLEX:  # grouped-query keys stay unexpanded: FlexAttention reads them per KV head
        check_flex_inputs("sliding_window_attention", dropout, query, key, value)
        return flex_sliding_attention(
            query, key, value, lo=lo, hi=hi, causal=causal, dilations=dilations, global_mask=global_mask,
            key_padding_mask=key_padding_mask, scale=scale,
        )  # fmt: skip
    key, value = expand_kv(key, h), expand_kv(value, h)  # (B, H, n_k, D)
    if route == MASKED:
        return masked_sliding_attention(
            query, key, value, lo=lo, hi=hi, causal=causal, dilations=dilations, global_mask=global_mask,
            key_padding_mask=key_padding_mask, scale=scale, dropout=dropout,
        )  # fmt: skip
    return _blocked(query, key, value, spec, dilations, global_mask, key_padding_mask)


def _decode_step(
    query: Tensor,  # (B, H, 1, D): the last position
    key: Tensor,  # (B, H_kv, n_k, D)
    value: Tensor,  # (B, H_kv, n_k, D)
    window: int,
    key_padding_mask: Tensor | None,  # (B, n_k)
    scale: float,
    dropout: float,
) -> Tensor:  # (B, H, 1, D)
    """One causal decode step without dilation or global tokens: its window is exactly the last
    `window` keys, so one fused SDPA call over them (GQA heads shared in the kernel) does it; the
    band plan would cost ~6x more at window 512 (benchmarks/kv_cache_window.py)."""
    w = min(window, key.shape[2])
    key, value = key[:, :, -w:], value[:, :, -w:]  # (B, H_kv, w, D)
    pad = key_padding_mask[:, -w:] if key_padding_mask is not None else None  # (B, w)
    mask = pad[:, None, None, :] if pad is not None else None  # (B, 1, 1, w)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale,
                                         enable_gqa=key.shape[1] != query.shape[1])  # fmt: skip
    if pad is not None:  # a query with no real key left outputs zeros (SDPA would give NaN)
        out = out.masked_fill(~pad.any(-1)[:, None, None, None], 0.0)
    return out


def _blocked(
    query: Tensor,  # (B, H, n_q, D)
    key: Tensor,  # (B, H, n_k, D), already expanded to the query heads
    value: Tensor,  # (B, H, n_k, D)
    spec: BandSpec,
    dilations: list[int],
    global_mask: Tensor | None,  # (B, n_k), already & key padding; None when no token is global
    key_padding_mask: Tensor | None,  # (B, n_k)
) -> Tensor:  # (B, H, n_q, D)
    """The blocked route: per batch element and dilation head group, the band's fused calls,
    then the global keys and queries."""
    b, h, n_q, d = query.shape
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
            if glob is not None and grad and dil == 1 and spec.dropout == 0.0 and q.device.type == "cpu":
                # training with global tokens: band and global keys in one softmax whose
                # backward runs the fused kernel too (joint.py)
                g_idx = glob.nonzero().flatten()  # (G,)
                pieces = spec.plan(n_q, k.shape[1], window_keys_ok, q.device)
                allowed = _global_key_mask(g_idx, n_q, spec)[None]  # (1, n_q, G)
                o = band_with_extra_keys(q, k, v, k[:, g_idx], v[:, g_idx], allowed, pieces, spec.scale)
                out[bi, hs] = _global_queries(o, q, k, v, glob, pad, spec, inplace=False)
                continue
            # the LSE feeds a merge only with global tokens; then it must carry gradient
            o, lse = dilated_band(q, k, v, window_keys_ok, spec, dil, lse_grad=glob is not None,
                                  out=None if grad else out[bi, hs])  # fmt: skip
            if glob is not None:
                # without autograd, o is out[bi, hs] itself and both steps update it in place
                o = _add_global_keys(o, lse, q, k, v, glob, spec, inplace=not grad)
                o = _global_queries(o, q, k, v, glob, pad, spec, inplace=not grad)
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


def _add_global_keys(o, lse, q, k, v, glob: Tensor, spec: BandSpec, *, inplace: bool) -> Tensor:
    """Every query also attends the global keys (Longformer's symmetric global attention).
    o: (Hg, n_q, D) and lse (Hg, n_q) of the band; q: (Hg, n_q, D); k, v: (Hg, n_k, D); glob: (n_k,)."""
    g_idx = glob.nonzero().flatten()  # (G,)
    allowed = _global_key_mask(g_idx, q.shape[1], spec)  # (n_q, G)
    o_g, l_g = attend(
        q[None], k[None, :, g_idx], v[None, :, g_idx], allowed[None, None], spec.scale, spec.dropout,
        need_lse_grad=True,
    )
    return merge_lse(o, lse, o_g[0], l_g[0], inplace=inplace)


def _global_key_mask(g_idx: Tensor, n_q: int, spec: BandSpec) -> Tensor:  # (n_q, G) bool
    """Which queries may attend each global key: all of them, or those at or after it if causal."""
    allowed = torch.ones(n_q, len(g_idx), dtype=torch.bool, device=g_idx.device)
    if spec.causal:
        q_pos = torch.arange(spec.q0, spec.q0 + n_q, device=g_idx.device)[:, None]
        allowed = allowed & (g_idx[None, :] <= q_pos)
    return allowed


def _global_queries(o, q, k, v, glob: Tensor, pad: Tensor | None, spec: BandSpec, *, inplace: bool) -> Tensor:
    """Global queries attend every (real, causally visible) key: overwrite their rows of o."""
    n_k = k.shape[1]
    g_pos = glob[spec.q0 :].nonzero().flatten()  # query indices that are global
    if len(g_pos) == 0:
        return o
    k_pos = torch.arange(n_k, device=q.device)[None, :]
    allowed = torch.ones(len(g_pos), n_k, dtype=torch.bool, device=q.device)  # (G, n_k)
    if pad is not None:
        allowed = allowed & pad[None, :]
    if spec.causal:
        allowed = allowed & (k_pos <= (g_pos + spec.q0)[:, None])
    o_g, _ = attend(q[None, :, g_pos], k[None], v[None], allowed[None, None], spec.scale, spec.dropout)
    if not inplace:
        o = o.clone()
    o[:, g_pos] = o_g[0]
    return o
