"""BERT/RoBERTa-family encoders with a sliding window → transformers' Longformer classes.

Longformer (Beltagy et al. 2020) is a RoBERTa whose self-attention is a band plus global
tokens; surgeon's bidirectional `sliding_window: {window: W}` is `attention_window: W` there
(W//2 keys on each side, inclusive), and surgeon's global tokens are Longformer's
`global_attention_mask`, with the separate global projections (`query_global`, `key_global`,
`value_global`) set to copies of Q/K/V. Checked against a patched RoBERTa to ~1e-7 (tests).

What the conversion has to adapt:
- positions: Longformer numbers them from `padding_idx + 1` and skips padding (as RoBERTa does);
  a BERT table starts at 0, so it is shifted down by `pad_token_id + 1` rows (zero rows
  before it). With right padding (or none) the outputs are the patched model's; with left
  padding a BERT numbered the padded positions too and the two differ.
- windows: Longformer has no dilation, needs even windows ≥ 4 that divide the largest, and one
  global set for every layer; a layer surgery left dense becomes a window covering every position.
- heads: BERT's MLM transform → `lm_head`; BERT's pooler + classifier → Longformer's
  classification head (dense, tanh, out_proj on token 0: the same function).
"""

from __future__ import annotations

import math
import re

import torch

from ..attention.variants_local import SlidingWindowVariant, as_list
from .conversion import (
    Conversion,
    LayerAttention,
    describe_modules,
    layer_attention,
    source_of,
    target_config,
)
from .meta_diff import MetaDiff
from .plan import Layout

FAMILIES = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert"}
_HEADS = {  # source class suffix -> Longformer class
    "Model": "LongformerModel",
    "ForMaskedLM": "LongformerForMaskedLM",
    "ForSequenceClassification": "LongformerForSequenceClassification",
    "ForTokenClassification": "LongformerForTokenClassification",
}
_QKV = re.compile(r"^(.*\.attention\.self\.)(query|key|value)\.(weight|bias)$")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # recomputed by Longformer
# BERT head tensor -> Longformer head tensor, per head (RoBERTa's heads already match by name)
_BERT_HEADS = {
    "ForMaskedLM": [
        (r"^cls\.predictions\.transform\.dense\.", "lm_head.dense."),
        (r"^cls\.predictions\.transform\.LayerNorm\.", "lm_head.layer_norm."),
        (r"^cls\.predictions\.decoder\.", "lm_head.decoder."),
        (r"^cls\.predictions\.bias$", "lm_head.bias"),
    ],
    "ForSequenceClassification": [
        (r"^bert\.pooler\.dense\.", "classifier.dense."),
        (r"^classifier\.", "classifier.out_proj."),
    ],
    "ForTokenClassification": [(r"^classifier\.", "classifier.")],
}
_ROBERTA_HEADS = {
    "ForMaskedLM": r"^lm_head\.",
    "ForSequenceClassification": r"^classifier\.",
    "ForTokenClassification": r"^classifier\.",
}


def to_longformer(
    meta: MetaDiff, layout: Layout, config_changes: dict
) -> tuple[Conversion | None, list[str]]:
    """(the conversion, []) or (None, one line per reason it cannot be one)."""
    problems = []
    source = source_of(meta, FAMILIES, _HEADS, "Longformer", problems)
    config, family, suffix = source.config, source.family, source.suffix
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        problems.append(
            f"position_embedding_type {config.position_embedding_type!r}: Longformer has absolute positions only"
        )
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        problems.append(f"{source.name} is configured as a decoder; Longformer is an encoder")
    if family == "bert" and suffix == "ForMaskedLM" and config.hidden_act != "gelu":
        problems.append(
            f"the MLM head's activation is {config.hidden_act!r}; Longformer's LM head applies gelu"
        )
    pad = config.pad_token_id
    if pad is None:
        problems.append("the config has no pad_token_id, from which Longformer numbers positions")
    layers = layer_attention(meta)
    windows, glob = _windows(layers, problems, _positions(config, family))
    if problems:
        return None, problems

    shift = pad + 1 if family == "bert" else 0  # RoBERTa's table already starts at padding_idx + 1
    body = f"{meta.model.base_model_prefix}." if suffix != "Model" else ""
    target_body = "longformer." if suffix != "Model" else ""
    head_rules = (
        _BERT_HEADS.get(suffix, [])
        if family == "bert"
        else [(_ROBERTA_HEADS[suffix], None)]
        if suffix in _ROBERTA_HEADS
        else []
    )
    converted: Layout = {}
    for file, outs in layout.items():
        converted[file] = {}
        for name, out in outs.items():
            for new_name in _names(name, body, target_body, head_rules, problems):
                new = out.renamed(new_name)
                if shift and new_name.endswith("embeddings.position_embeddings.weight"):
                    rows, width = out.shape
                    new.source_shape, new.shape = out.shape, (rows + shift, width)
                    new.transform = lambda t, s=shift: torch.cat([t.new_zeros(s, t.shape[1]), t])
                converted[file][new_name] = new
    if problems:
        return None, problems

    architecture = _HEADS[suffix]
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act, hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings + shift, type_vocab_size=config.type_vocab_size,
        initializer_range=config.initializer_range, layer_norm_eps=config.layer_norm_eps, pad_token_id=pad,
        bos_token_id=getattr(config, "bos_token_id", None), eos_token_id=getattr(config, "eos_token_id", None),
        sep_token_id=getattr(config, "sep_token_id", None), tie_word_embeddings=config_changes.get(
            "tie_word_embeddings", getattr(config, "tie_word_embeddings", True)),
        attention_window=windows,
    )  # fmt: skip
    if suffix in ("ForSequenceClassification", "ForTokenClassification"):
        fields.update(id2label=config.id2label, label2id=config.label2id, problem_type=config.problem_type)
    from transformers import LongformerConfig

    out_config = target_config(meta, LongformerConfig(**fields).to_dict(), architecture)
    out_config["global_attention_positions"] = glob
    return Conversion(architecture, converted, out_config, _readme(source.name, architecture, windows, glob, family, suffix, pad),
                      {"global_attention_positions": glob, "attention_window": windows}), []  # fmt: skip


def _positions(config, family: str) -> int:
    """Token positions the table holds (RoBERTa's first padding_idx + 1 rows are not positions)."""
    if family == "bert":
        return config.max_position_embeddings
    return config.max_position_embeddings - (config.pad_token_id or 0) - 1


def _windows(
    layers: list[LayerAttention], problems: list[str], positions: int
) -> tuple[list[int], list[int]]:
    """Longformer's attention_window per layer and the one global set, or problems.

    Longformer pads every input to a multiple of the largest window and each layer's banded
    matmul needs the padded length to be a multiple of its own window, so every window must
    divide the largest. A layer surgery left dense gets the smallest multiple of the other
    windows that reaches every position."""
    windows: list[int | None] = []
    globals_seen: dict[tuple, list[LayerAttention]] = {}
    for layer in layers:
        variant = layer.variant
        if variant is None:
            windows.append(None)
            continue
        where = f"{layer.path} ({layer.rule})"
        if not isinstance(variant, SlidingWindowVariant):
            name = getattr(variant, "name", type(variant).__name__)
            problems.append(f"{where} uses {name} attention; Longformer holds a sliding window only")
            continue
        if variant.causal:
            problems.append(f"{where} is a causal window; Longformer's is bidirectional")
        if any(d != 1 for d in as_list(variant.dilation)):
            problems.append(
                f"{where} has dilation {variant.dilation}; transformers' Longformer has no dilation"
            )
        if variant.window // 2 < 2:
            problems.append(
                f"{where} has window {variant.window} (±{variant.window // 2}); transformers' Longformer needs "
                "attention_window >= 4 (its banded matmul fails for ±1)"
            )
        windows.append(max(4, 2 * (variant.window // 2)))  # ±W//2 keys: odd W is W - 1 there
        globals_seen.setdefault(tuple(variant.global_tokens), []).append(layer)
    if len(globals_seen) > 1:
        sets = "; ".join(f"{list(g) or 'none'} on {describe_modules(ls)}" for g, ls in globals_seen.items())
        problems.append(
            f"layers differ in global tokens ({sets}); Longformer's global_attention_mask is one for all layers"
        )
    patched = [w for w in windows if w is not None]
    step = math.lcm(*patched) if patched else 4
    dense = step * -(-2 * positions // step)  # one-sided >= positions: every key of every input
    windows = [dense if w is None else w for w in windows]
    largest = max(windows, default=4)
    for w in sorted(set(windows)):
        if largest % w:
            at = describe_modules([a for a, v in zip(layers, windows) if v == w])
            problems.append(
                f"attention_window {w} on {at} does not divide the largest, {largest}: Longformer pads inputs to a "
                "multiple of the largest window, and every layer's window must divide that length"
            )
    glob = list(next(iter(globals_seen))) if len(globals_seen) == 1 else []
    return windows, glob


def _names(name: str, body: str, target_body: str, head_rules, problems: list[str]) -> list[str]:
    """The Longformer names of one planned tensor: none (a buffer Longformer recomputes), one, or
    four (Q/K/V and their global copies)."""
    for pattern, replacement in head_rules:  # heads first: BERT's pooler may be a head's dense
        if re.match(pattern, name):
            return [re.sub(pattern, replacement, name) if replacement is not None else name]
    if not name.startswith(body):
        problems.append(f"tensor {name} has no Longformer counterpart")
        return []
    rest = name[len(body) :]
    if rest in _BUFFERS:
        return []
    new = target_body + rest
    match = _QKV.match(new)
    if match:
        return [new, f"{match[1]}{match[2]}_global.{match[3]}"]
    return [new]


def _readme(
    source: str, architecture: str, windows: list[int], glob: list[int], family: str, suffix: str, pad: int
) -> str:
    if glob:
        mask = f"global_attention_mask = torch.zeros_like(input_ids)\nglobal_attention_mask[:, {glob}] = 1"
    else:
        mask = "global_attention_mask = torch.zeros_like(input_ids)  # no global tokens"
    lines = [
        "## Exported by surgeon",
        "",
        (
            f"This `{architecture}` is a `{source}` whose self-attention surgeon replaced by a sliding window; "
            f"transformers' Longformer computes the same function (attention_window per layer: {windows})."
        ),
        "",
        "Pass the global tokens the model was converted (and trained) with on every call:",
        "",
        "```python",
        mask,
        "outputs = model(input_ids, attention_mask=attention_mask, global_attention_mask=global_attention_mask)",
        "```",
        "",
        f"`global_attention_positions` in config.json records them ({glob}).",
    ]
    if glob:
        lines.append(
            "Code that does not pass global_attention_mask (e.g. sentence-transformers' Transformer module) runs "
            "the model without its global tokens, which is not the function it was converted with."
        )
    if suffix == "ForSequenceClassification" and glob != [0]:
        lines.append("LongformerForSequenceClassification makes token 0 global when no global_attention_mask is given: "
                     "pass the mask above.")  # fmt: skip
    if family == "bert":
        lines.append(f"Positions are numbered from the first non-padding token (pad id {pad}) as in RoBERTa: pad on "
                     "the right; with left padding the outputs differ from the BERT the model came from.")  # fmt: skip
    if max(windows) > min(windows):
        lines.append("Longformer pads every input to a multiple of the largest window; a layer that stayed dense has "
                     "a window covering every position.")  # fmt: skip
    return "\n".join(lines) + "\n"
