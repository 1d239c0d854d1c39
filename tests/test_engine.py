"""patch(): counts equal independent sums, frozen params get no grad, errors before any change."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, first_output, tiny_inputs, tiny_model

import surgeon
from surgeon.errors import SurgeonError

STACKS = {
    "bert": ["encoder.layer"], "roberta": ["roberta.encoder.layer"], "distilbert": ["transformer.layer"],
    "gpt2": ["transformer.h"], "llama": ["model.layers"], "mistral": ["model.layers"], "qwen2": ["model.layers"],
    "t5": ["encoder.block", "decoder.block"], "bart": ["encoder.layers", "decoder.layers"], "vit": ["layers"],
}  # fmt: skip
LAYER_COUNT = {"encoder.block": 3, "decoder.block": 2, "encoder.layers": 3, "decoder.layers": 2}


def last_layer_prefixes(family):
    return [f"{s}.{LAYER_COUNT.get(s, 3) - 1}." for s in STACKS[family]]


# recipe name -> (recipe, expected trainable names computed without surgeon)
def cases(family):
    yield "bitfit", {"surgeon": 1, "rules": [{"do": "bitfit", "select": {"role": "model"}}]}, (
        lambda name: name.endswith(".bias")
    )
    yield "unfreeze-last", {"surgeon": 1, "rules": [{"do": "unfreeze", "select": {"role": "layer", "layers": "-1:"}}]}, (
        lambda name: any(name.startswith(p) for p in last_layer_prefixes(family))
    )
    yield "freeze-first-two", {
        "surgeon": 1, "base": "trainable",
        "rules": [{"do": "freeze", "select": {"role": "layer", "layers": ":2"}}],
    }, (lambda name: not any(name.startswith(f"{s}.{i}.") for s in STACKS[family] for i in (0, 1)))  # fmt: skip
    yield "bitfit-then-freeze-attn", {
        "surgeon": 1,
        "rules": [
            {"do": "unfreeze", "select": {"role": "layer", "layers": [0]}},
            {"do": "freeze", "select": {"role": "attn", "layers": [0]}},
        ],
    }, (lambda name: any(name.startswith(f"{s}.0.") for s in STACKS[family]) and not _in_self_attn(family, name))


def _in_self_attn(family, name):
    markers = {
        "bert": ".attention.self.", "roberta": ".attention.self.", "distilbert": ".attention.", "gpt2": ".attn.",
        "llama": ".self_attn.", "mistral": ".self_attn.", "qwen2": ".self_attn.", "t5": ".SelfAttention.",
        "bart": ".self_attn.", "vit": ".attention.",
    }  # fmt: skip
    return markers[family] in name


ALL_CASES = [(f, name) for f in sorted(FAMILIES) for name, _, _ in cases(f)]


@pytest.mark.parametrize("family,case", ALL_CASES)
def test_trainable_set_and_counts_match_independent_computation(family, case):
    model = tiny_model(family)
    _, recipe, expected_fn = next(c for c in cases(family) if c[0] == case)
    if family in ("llama", "mistral", "t5") and case == "bitfit":
        with pytest.raises(SurgeonError, match="has a bias parameter"):  # bias-free families
            surgeon.patch(model, recipe)
        return
    surgery = surgeon.patch(model, recipe)
    names = dict(model.named_parameters())
    expected = {n for n in names if expected_fn(n)}
    trainable = {n for n, p in names.items() if p.requires_grad}
    assert trainable == expected
    report = surgery.report().to_dict()
    assert report["trainable_params"] == sum(names[n].numel() for n in expected)
    assert report["total_params"] == sum(p.numel() for p in names.values())
    assert report["added_params"] == 0
    # each trainable tensor is counted once, under the rule that last made it trainable (or base)
    assert sum(r["trainable_params"] for r in report["rules"]) + report["base_trainable_params"] == (
        report["trainable_params"]
    )
    assert surgery.ledger.diff_names() == sorted(expected)


@pytest.mark.parametrize("family", ["bert", "gpt2", "bart", "vit"])
def test_frozen_params_get_no_gradient(family):
    model = tiny_model(family)
    surgeon.patch(model, {"surgeon": 1, "rules": [
        {"do": "bitfit", "select": {"role": "model"}},
        {"do": "unfreeze", "select": {"role": "layer", "layers": "-1:"}},
    ]})  # fmt: skip
    model.train()
    out = first_output(model(**tiny_inputs(family)))
    out.float().pow(2).mean().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        assert param.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_outputs_unchanged_by_freeze_actions():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    before = first_output(model(**inputs))
    surgeon.patch(model, {"surgeon": 1, "rules": [{"do": "bitfit", "select": {"role": "model"}}]})
    assert torch.equal(first_output(model(**inputs)), before)


def test_same_rule_twice_is_an_error_and_other_rules_stack():
    model = tiny_model("bert")
    recipe = {"surgeon": 1, "rules": [{"do": "bitfit", "select": {"role": "attn"}}]}
    surgeon.patch(model, recipe)
    with pytest.raises(SurgeonError, match="already applied"):
        surgeon.patch(model, recipe)
    surgery = surgeon.patch(model, {"surgeon": 1, "rules": [{"do": "unfreeze", "select": {"role": "head"}}]})
    assert len(surgery.rules) == 2 and len(surgery.recipes) == 2
    with pytest.raises(SurgeonError, match="conflicts"):
        surgeon.patch(model, {"surgeon": 1, "base": "trainable", "rules": [{"do": "freeze", "select": {"role": "embed"}}]})


def test_selector_matching_nothing():
    model = tiny_model("bert")
    empty = {"do": "unfreeze", "select": {"role": "xattn"}}
    with pytest.raises(SurgeonError, match=r"rule 1 \(do: unfreeze\): selector \{role='xattn'\} matched no module"):
        surgeon.patch(model, {"surgeon": 1, "rules": [empty]})
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing touched
    with pytest.warns(UserWarning, match="matched no module"):
        surgery = surgeon.patch(model, {"surgeon": 1, "rules": [dict(empty, on_empty="warn")]})
    assert surgery.warnings


def test_errors_reported_before_any_change():
    model = tiny_model("gpt2")
    recipe = {"surgeon": 1, "rules": [
        {"do": "bitfit", "select": {"role": "model"}},
        {"do": "freeze", "select": {"role": "attn.q"}},
    ]}  # fmt: skip
    with pytest.raises(SurgeonError, match=r"freeze cannot act on a slice of the fused projection transformer\.h\.0\.attn\.c_attn"):
        surgeon.patch(model, recipe)
    assert all(p.requires_grad for p in model.parameters())  # rule 1 did not run
    assert surgeon.surgery_of(model) is None


def test_bitfit_on_bias_free_model():
    with pytest.raises(SurgeonError, match="has a bias parameter"):
        surgeon.patch(tiny_model("llama"), {"surgeon": 1, "rules": [{"do": "bitfit", "select": {"role": "attn"}}]})


def test_tied_weights_counted_once():
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    surgery = surgeon.patch(model, {"surgeon": 1, "rules": [{"do": "unfreeze", "select": {"role": "head"}}]})
    assert surgery.ledger.trainable_names() == ["transformer.wte.weight"]
    assert surgery.report().to_dict()["total_params"] == sum(p.numel() for p in model.parameters())


def test_real_minilm_counts(minilm_dir):
    model, _ = surgeon.load_model(minilm_dir)
    surgery = surgeon.patch(model, "recipes/minilm-bitfit.yaml")
    report = surgery.report().to_dict()
    assert report["total_params"] == 22_713_216
    names = dict(model.named_parameters())
    expected = {n for n in names if n.endswith(".bias") or n.startswith(("encoder.layer.4.", "encoder.layer.5."))}
    assert report["trainable_params"] == sum(names[n].numel() for n in expected)
    assert set(surgery.ledger.diff_names()) == expected
