"""A generation KV cache no longer than each patched layer's window.

A causal sliding window of w keys (Beltagy et al., 2020; transformers' `sliding_window`
convention: query p sees keys p - w + 1 … p) never looks further back than w - 1 positions,
and with dilation δ no further than (w - 1)·δ. The kernels only use offsets relative to the
query (the queries are the last n_q of the keys), so a cache that drops everything older gives
the same outputs. transformers' own `DynamicSlidingWindowLayer(sliding_window=s)` keeps exactly
the last s - 1 positions; `window_cache(model)` builds transformers' default `DynamicCache` for
the model's config and puts such a layer at every layer whose attention variant says how far it
reaches (`AttentionVariant.decode_reach`). Every other layer keeps what transformers would give
it (full, or the config's own sliding window, as for Mistral and Qwen2).

Every sliding layer of one cache keeps the same length, the largest any of them needs: the model
builds one padding mask per forward, sized from one layer of the cache (the first full layer, or
the first sliding one), and the attention function slices it from the right to each layer's keys
(interface.py); a sliding layer kept longer than its window attends the same keys.

`install(model)` makes this the default of `model.generate(...)`: it wraps the model's
`_prepare_cache_for_generation`, the one place transformers 5 builds the default cache, and
replaces the plain `DynamicCache` it made with the windowed one. A cache the caller passes is
left alone if it keeps enough keys for every patched layer, and refused in one line if not;
static caches are refused (their keys are padded at the end, so the last-n_q rule fails).

Per-call global tokens (`global_attention_mask`) do not reach `generate` on a causal LM
(transformers refuses the unused model kwarg); a direct `model(...)` call with a window-sized
cache and one is refused by the variant, whose mask must not be longer than the keys.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import SurgeonError
from .interface import variant_of

INSTALLED_ATTR = "_surgeon_window_cache"


def layer_reaches(model: torch.nn.Module) -> dict[int, int | None]:
    """{decoder layer index: keys a decode step of its patched attention can reach (itself
    included), or None when it may need every earlier key} for every patched layer."""
    reaches: dict[int, int | None] = {}
    for module in model.modules():
        variant = variant_of(module)
        layer_idx = getattr(module, "layer_idx", None)
        if variant is None or not isinstance(layer_idx, int):
            continue
        reach_of = getattr(variant, "decode_reach", None)
        reach = None
        if reach_of is not None:
            reach = reach_of(causal=bool(getattr(module, "is_causal", False)))
        # two patched modules on one layer (unusual): the layer keeps what the wider one needs
        if layer_idx in reaches:
            old = reaches[layer_idx]
            reach = None if old is None or reach is None else max(old, reach)
        reaches[layer_idx] = reach
    return reaches


def window_cache(model: torch.nn.Module) -> DynamicCache:
    """transformers' default DynamicCache for `model`, with window-sized layers where the
    patched attention allows."""
    config = model.config.get_text_config(decoder=True)
    cache = DynamicCache(config=config)
    reaches = layer_reaches(model)
    if not reaches:
        return cache
    layers = list(cache.layers) or [DynamicLayer() for _ in range(_layer_count(config))]
    if max(reaches) >= len(layers):
        raise SurgeonError(f"window cache: layer_idx {max(reaches)} but the config has {len(layers)} layers")
    for idx, reach in reaches.items():
        layers[idx] = DynamicLayer() if reach is None else DynamicSlidingWindowLayer(sliding_window=reach)
    keep = max((layer.sliding_window for layer in layers if isinstance(layer, DynamicSlidingWindowLayer)),
               default=None)  # fmt: skip
    if keep is not None:
        layers = [DynamicSlidingWindowLayer(sliding_window=keep) if isinstance(layer, DynamicSlidingWindowLayer)
                  else layer for layer in layers]  # fmt: skip
    cache.layers = layers
    cache.layer_class_to_replicate = None
    return cache


def _layer_count(config) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise SurgeonError(f"window cache: {type(config).__name__} names no layer count")


def check_cache(model: torch.nn.Module, cache: Cache) -> None:
    """Refuse, in one line, a caller's cache that would drop keys a patched layer still attends."""
    if cache.__class__.__name__.startswith("Static") or any(
        type(layer).__name__.startswith("Static") for layer in getattr(cache, "layers", [])
    ):
        raise SurgeonError(
            "generate: a static cache (cache_implementation='static' or a StaticCache) is not supported on a "
            "surgeon-patched model: surgeon's attention takes the queries to be the last keys, and a static "
            "cache pads keys at the end; use the default cache"
        )
    layers = getattr(cache, "layers", [])
    for idx, reach in layer_reaches(model).items():
        if idx >= len(layers) or not getattr(layers[idx], "is_sliding", False):
            continue
        kept = layers[idx].get_max_length()
        if reach is None or kept < reach:
            needs = "every key" if reach is None else f"a window of {reach}"
            raise SurgeonError(
                f"generate: the cache passed keeps a window of {kept} at layer {idx}, but its patched attention "
                f"needs {needs}; pass no cache (surgeon builds one that fits) or a full DynamicCache()"
            )


class WindowCachePreparer:
    """Stands in for the model's `_prepare_cache_for_generation`: runs transformers' own, then
    swaps the plain DynamicCache it built for `window_cache(model)` and checks any other cache.
    An object rather than a bound method or closure, so that pickle and copy.deepcopy carry it
    with the model (a copy's preparer holds the copy)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, generation_config, model_kwargs, *args, **kwargs):
        model = self.model
        given = model_kwargs.get("cache")
        result = type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if cache is None:
            return result
        if given is not None or type(cache) is not DynamicCache or getattr(cache, "offloading", False):
            check_cache(model, cache)
            return result
        model_kwargs["cache"] = window_cache(model)
        return result


def install(model: torch.nn.Module) -> None:
    """Make `model.generate` build the window-sized cache by default (idempotent; a model without
    `generate` is left as it is)."""
    if getattr(model, INSTALLED_ATTR, False) or not hasattr(type(model), "_prepare_cache_for_generation"):
        return
    model._prepare_cache_for_generation = WindowCachePreparer(model)
    setattr(model, INSTALLED_ATTR, True)
