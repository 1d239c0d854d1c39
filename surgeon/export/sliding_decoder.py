"""Llama-family decoders with a causal sliding window → transformers' Mistral or Qwen2.

surgeon's causal `window: S` lets query q see keys q − S < k ≤ q, which is exactly Mistral's
`sliding_window: S` (transformers' masking_utils uses the same rule), so a Llama whose every
layer has window S is a `MistralForCausalLM` with the same tensors (a Llama state dict loads
strictly into Mistral): same logits, same greedy tokens, and transformers' sliding-window KV
cache, which keeps only what the window can still reach. Windows on only some layers are
Qwen2's `use_sliding_window` with per-layer `layer_types`; Qwen2 has q/k/v biases, written as
zeros, so it computes the Llama function. A base that already is Mistral or Qwen2 keeps its own
windows on the layers surgery left alone.

Mistral and Qwen2 hold one window size, no dilation, no global (sink) tokens, and no o_proj or
MLP biases: a diff needing any of these is refused.
"""

from __future__ import annotations

import re

from ..attention.variants_local import SlidingWindowVariant, as_list
from .conversion import Conversion, describe_modules, layer_attention, source_of, target_config
from .meta_diff import MetaDiff
from .plan import Layout

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
_SUFFIXES = ("ForCausalLM", "Model")
_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "rope_parameters", "attention_dropout",
)  # fmt: skip
_QKV_WEIGHT = re.compile(r"^(.*\.self_attn\.[qkv]_proj)\.weight$")


def to_sliding_decoder(
    meta: MetaDiff, layout: Layout, config_changes: dict
) -> tuple[Conversion | None, list[str]]:
    """(the conversion, []) or (None, one line per reason it cannot be one)."""
    problems = []
    source = source_of(meta, FAMILIES, _SUFFIXES, "Mistral/Qwen2", problems)
    config, family, suffix = source.config, source.family, source.suffix
    if family == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        problems.append(
            "the Llama config has attention_bias or mlp_bias; Mistral and Qwen2 have no o_proj or MLP biases"
        )
    layers = layer_attention(meta)
    windows: list[int | None] = []
    for layer in layers:
        variant = layer.variant
        if variant is None:  # left alone: a Mistral/Qwen2 base's own window, if the layer has one
            own = getattr(layer.module, "sliding_window", None)  # Qwen2 sets it per layer
            windows.append(own or (config.sliding_window if family == "mistral" else None) or None)
            continue
        where = f"{layer.path} ({layer.rule})"
        if not isinstance(variant, SlidingWindowVariant):
            problems.append(
                f"{where} uses {getattr(variant, 'name', type(variant).__name__)} attention; Mistral/Qwen2 hold a sliding window only"
            )
        elif not variant.causal:
            problems.append(f"{where} is a bidirectional window; Mistral/Qwen2 windows are causal")
        elif any(d != 1 for d in as_list(variant.dilation)):
            problems.append(f"{where} has dilation {variant.dilation}; Mistral/Qwen2 windows have none")
        elif variant.global_tokens:
            problems.append(
                f"{where} has global tokens {variant.global_tokens}; Mistral/Qwen2 have no global (sink) tokens"
            )
        windows.append(variant.window)
    sizes = sorted({w for w in windows if w is not None})
    if len(sizes) > 1:
        per = "; ".join(
            f"{s} on {describe_modules([a for a, w in zip(layers, windows) if w == s])}" for s in sizes
        )
        problems.append(
            f"layers use different windows ({per}); Mistral and Qwen2 hold one sliding_window for all layers"
        )
    if problems:
        return None, problems

    window = sizes[0]
    every_layer = all(w is not None for w in windows)
    target = "Mistral" if every_layer and family != "qwen2" else "Qwen2"
    architecture = target + suffix
    fields = {k: getattr(config, k) for k in _FIELDS if getattr(config, k, None) is not None}
    if "tie_word_embeddings" in config_changes:
        fields["tie_word_embeddings"] = config_changes["tie_word_embeddings"]
    converted: Layout = {file: {n: o.renamed(n) for n, o in outs.items()} for file, outs in layout.items()}
    if target == "Qwen2":
        layer_types = ["sliding_attention" if w is not None else "full_attention" for w in windows]
        fields.update(use_sliding_window=True, sliding_window=window, layer_types=layer_types,
                      max_window_layers=config.num_hidden_layers)  # fmt: skip
        if family != "qwen2":
            _add_zero_qkv_biases(converted)
        from transformers import Qwen2Config as TargetConfig
    else:
        fields.update(sliding_window=window)
        from transformers import MistralConfig as TargetConfig
    out_config = target_config(meta, TargetConfig(**fields).to_dict(), architecture)
    sliding = [i for i, w in enumerate(windows) if w is not None]
    return Conversion(architecture, converted, out_config, _readme(source.name, architecture, window, sliding, len(windows)),
                      {"sliding_window": window, "sliding_layers": sliding}), []  # fmt: skip


def _add_zero_qkv_biases(layout: Layout) -> None:
    """Qwen2's q/k/v projections have biases; zeros make them Llama's bias-free ones."""
    for outs in layout.values():
        for name, out in list(outs.items()):
            match = _QKV_WEIGHT.match(name)
            if match:
                bias = f"{match[1]}.bias"
                outs[bias] = out.renamed(bias, shape=(out.shape[0],), source=("zeros", "", ""), pieces=[])


def _readme(source: str, architecture: str, window: int, sliding: list[int], layers: int) -> str:
    which = "every layer" if len(sliding) == layers else f"layers {sliding}"
    return (
        "## Exported by surgeon\n\n"
        f"This `{architecture}` is a `{source}` whose self-attention surgeon restricted to a causal sliding "
        f"window of {window} tokens on {which} (each token sees itself and the {window - 1} before it); "
        f"transformers' `{architecture}` computes the same function with `sliding_window: {window}`"
        + (" and `layer_types`" if architecture.startswith("Qwen2") else "")
        + ", and its cache keeps only the window on those layers.\n"
    )
