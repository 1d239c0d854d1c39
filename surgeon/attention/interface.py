"""Route a transformers v5 model's attention calls through surgeon.

transformers v5 looks up `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` in every
attention module and calls it as `fn(module, query, key, value, attention_mask, dropout=,
scaling=, **kwargs)`. surgeon registers one function under the name "surgeon" that reads the
per-module setting `module.surgeon_attention` (an `AttentionVariant`) and falls back to dense
SDPA where a module has none (cross-attention, unpatched layers, cases a variant declines).

The matching *mask* function matters: without one transformers passes `attention_mask=None`
and padding silently disappears (seen with padded batches on BERT, GPT-2, Llama, Mistral and T5
under transformers 5.24). We register the flash-attention mask
function, which hands us a compact (B, kv_len) bool padding mask (True = real token) or None
when nothing is padded, so no n×n mask is built on the way (the sliding window builds one only
for short inputs, where one masked call beats its blocked plan: kernels/route.py).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SurgeonError
from .kernels.sliding import sliding_window_attention

ATTN_IMPLEMENTATION = "surgeon"
VARIANT_ATTR = "surgeon_attention"

_registered = False


@runtime_checkable
class AttentionVariant(Protocol):
    """What an efficient-attention action attaches to an attention module.

    A variant that owns learned parameters is an `nn.Module`; it is then registered as the
    child `surgeon_attention` of the attention module, so its tensors live in the state dict.
    """

    name: str

    def forward_attention(
        self,
        module: torch.nn.Module,
        query: Tensor,  # (B, H, n_q, D), rotary already applied
        key: Tensor,  # (B, H_kv, n_k, D), cache already updated
        value: Tensor,  # (B, H_kv, n_k, D)
        *,
        key_padding_mask: Tensor | None,  # (B, n_k) bool, True = real token; None = no padding
        scaling: float,
        dropout: float,
        causal: bool,
        **kwargs,
    ) -> Tensor | None:  # (B, H, n_q, D), or None to fall back to dense attention
        ...

    # Optional: `decode_reach(causal=) -> int | None`, the keys a decode step can reach counting
    # itself; window_cache.py keeps only that many per layer during generate. Absent or None:
    # the layer keeps every key.


def ensure_registered() -> None:
    """Register surgeon's attention and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, surgeon_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    _registered = True


def attach(model: torch.nn.Module, module: torch.nn.Module, variant: AttentionVariant) -> None:
    """Give `module` its variant and switch the model to the surgeon implementation."""
    ensure_registered()
    if isinstance(variant, torch.nn.Module):
        module.add_module(VARIANT_ATTR, variant)
    else:
        setattr(module, VARIANT_ATTR, variant)
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


def variant_of(module: torch.nn.Module) -> AttentionVariant | None:
    return getattr(module, VARIANT_ATTR, None)


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    # (B, H_kv, n, D) -> (B, H_kv * groups, n, D), GQA heads share a KV head
    if groups == 1:
        return x
    b, h_kv, n, d = x.shape
    return x[:, :, None].expand(b, h_kv, groups, n, d).reshape(b, h_kv * groups, n, d)


def dense_attention(
    query: Tensor,  # (B, H, n_q, D)
    key: Tensor,  # (B, H_kv, n_k, D)
    value: Tensor,  # (B, H_kv, n_k, D)
    *,
    key_padding_mask: Tensor | None,  # (B, n_k) bool, True = real token
    scaling: float,
    dropout: float,
    causal: bool,
    position_bias: Tensor | None = None,  # additive (1|B, H, n_q, n_k), e.g. T5
) -> Tensor:  # (B, H, n_q, D)
    """Exact dense attention with the fused SDPA kernel: the fallback and the reference."""
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    n_q, n_k = query.shape[2], key.shape[2]
    if key_padding_mask is None and position_bias is None:
        # Queries are the last n_q positions of the keys (decode with a KV cache): causal only
        # needs a mask when n_q > 1; SDPA's is_causal is top-left aligned, so use it only if square.
        if not causal or n_q == 1:
            return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling)
        if n_q == n_k:
            return F.scaled_dot_product_attention(
                query, key, value, dropout_p=dropout, scale=scaling, is_causal=True
            )
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]  # (B, 1, 1, n_k)
    if causal and n_q > 1:
        q_pos = torch.arange(n_k - n_q, n_k, device=query.device)[:, None]
        k_pos = torch.arange(n_k, device=query.device)[None, :]
        causal_mask = k_pos <= q_pos  # (n_q, n_k)
        mask = causal_mask if mask is None else mask & causal_mask
    if position_bias is not None:
        bias = position_bias
        if mask is not None:
            bias = bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
        mask = bias
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )


def surgeon_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The function transformers calls; returns ((B, n_q, H, D), None) like every backend."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    causal = bool(kwargs.pop("is_causal", None) or getattr(module, "is_causal", False))
    # With the flash mask function, attention_mask is a compact (B, n_k) bool or None.
    # A 4-D mask means a caller built one itself (e.g. a model that bypasses the mask
    # interface): hand it to the dense path untouched.
    if attention_mask is not None and attention_mask.dim() == 4:
        out = _dense_with_full_mask(query, key, value, attention_mask, scaling, dropout)
        return out.transpose(1, 2).contiguous(), None
    key_padding_mask = attention_mask.bool() if attention_mask is not None else None
    n_k = key.shape[2]
    if key_padding_mask is not None and key_padding_mask.shape[1] != n_k:
        # One padding mask per forward, sized from one cache layer; a window-sized cache layer
        # (window_cache.py) holds only the last n_k positions: its columns are the mask's last n_k.
        if key_padding_mask.shape[1] < n_k:
            raise SurgeonError(
                f"{type(module).__name__}: the padding mask covers {key_padding_mask.shape[1]} positions, "
                f"the keys {n_k}: a cache layer keeps more keys than the mask was built for"
            )
        key_padding_mask = key_padding_mask[:, -n_k:]
    out = None
    variant = variant_of(module)
    if variant is not None:
        out = variant.forward_attention(
            module,
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            scaling=scaling,
            dropout=dropout,
            causal=causal,
            **kwargs,
        )
    window = kwargs.get("sliding_window")
    if out is None and causal and window and key.shape[2] > window:
        # Mistral/Qwen2 layers configured with a sliding window ask for one even when surgeon
        # leaves them unpatched: honour it (same convention: keys in (p - window, p]).
        out = sliding_window_attention(
            query, key, value, window=int(window), causal=True,
            key_padding_mask=key_padding_mask, scaling=scaling, dropout=dropout,
        )  # fmt: skip
    if out is None:
        out = dense_attention(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            scaling=scaling,
            dropout=dropout,
            causal=causal,
            position_bias=kwargs.get("position_bias"),
        )
    return out.transpose(1, 2).contiguous(), None  # (B, n_q, H, D)


def _dense_with_full_mask(query, key, value, mask, scaling, dropout):
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
