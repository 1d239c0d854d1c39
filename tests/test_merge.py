"""Exact LoRA merge: merged == unmerged, unmerge bit-exact, fp32-then-round-once for bf16,
tied weights refused unless untied, and the `merge_pieces` interface (also on meta models)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import output_of, tiny_inputs, tiny_model

import surgeon
import surgeon.lora as L
from surgeon.errors import SurgeonError
from surgeon.lora.merge import MergePiece

ALL_ROLES = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]
CASES = [
    ("bert", {"role": ALL_ROLES}),
    ("gpt2", {"role": ["attn.q", "attn.v", "mlp.up", "mlp.down"]}),
    ("llama", {"role": ALL_ROLES}),
    ("llama", {"path": "model.embed_tokens"}),
]
IDS = ["bert", "gpt2-slices", "llama", "llama-embedding"]


def _recipe(select, **params) -> dict:
    return {"surgeon": 1, "rules": [{"do": "lora", "select": select, "with": params}]}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merged_equals_unmerged_and_unmerge_is_exact(case):
    family, select = case
    model, inputs = tiny_model(family), tiny_inputs(family)
    surgeon.patch(model, _recipe(select, r=4, alpha=8.0, init="random"))
    state = {n: t.clone() for n, t in model.state_dict().items()}
    unmerged = output_of(model, inputs)
    assert L.merge(model) > 0
    changed = [n for n, t in model.state_dict().items() if not torch.equal(t, state[n])]
    assert changed and all(n.endswith(".weight") and ".surgeon_lora." not in n for n in changed)
    assert _rel(output_of(model, inputs), unmerged) <= 1e-5
    L.unmerge(model)
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items())
    assert torch.equal(output_of(model, inputs), unmerged)


def test_bf16_merge_rounds_once_from_fp32_and_unmerges_exactly():
    model = tiny_model("llama").to(torch.bfloat16)
    surgeon.patch(model, _recipe({"role": ["attn.q", "mlp.down"]}, r=4, init="random"))
    q = model.model.layers[0].self_attn.q_proj
    original = q.weight.detach().clone()
    (adapter,) = [a for _, _, a in q.surgeon_lora.adapters()]
    assert adapter.lora_A.dtype == torch.bfloat16  # created in the weight's dtype
    expected = (original.float() + adapter.delta_weight()).to(torch.bfloat16)
    L.merge(model)
    assert torch.equal(q.weight, expected)
    for _ in range(3):  # no drift over cycles
        L.unmerge(model)
        assert torch.equal(q.weight, original)
        L.merge(model)
    L.unmerge(model)
    assert torch.equal(q.weight, original)


def test_merge_selected_adapters_and_switch_guard():
    model, inputs = tiny_model("llama"), tiny_inputs("llama")
    surgeon.patch(model, {"surgeon": 1, "rules": [
        {"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 2, "name": "a", "init": "random"}},
        {"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 3, "name": "b", "init": "random"}},
    ]})  # fmt: skip
    both = output_of(model, inputs)
    L.merge(model, ["a"])
    assert _rel(output_of(model, inputs), both) <= 1e-5  # a merged, b still adds in forward
    L.merge(model, ["b"])  # recomputed from the original: one rounding for a + b
    q = model.model.layers[0].self_attn.q_proj
    expected = q.surgeon_lora.original_weight.clone()
    for _, _, adapter in q.surgeon_lora.adapters():
        expected += adapter.delta_weight()
    assert torch.equal(q.weight, expected)
    assert _rel(output_of(model, inputs), both) <= 1e-5
    with pytest.raises(SurgeonError, match="unmerge"):
        L.set_active(model, "a")
    with pytest.raises(SurgeonError, match="unmerge"):
        with L.disable_adapters(model):
            pass
    with pytest.raises(SurgeonError, match="no LoRA adapter named 'c'"):
        L.merge(model, ["c"])
    L.unmerge(model)
    assert torch.equal(output_of(model, inputs), both)


def test_tied_lm_head_refused_unless_untie():
    model, inputs = tiny_model("gpt2"), tiny_inputs("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    surgeon.patch(model, _recipe({"path": "lm_head"}, r=4, init="random"))
    with pytest.raises(SurgeonError, match=r"lm_head.weight: it is tied to transformer.wte.weight.*untie: true"):
        L.merge(model)
    with pytest.raises(SurgeonError, match="tied"):
        L.merge_pieces(model)
    assert model.lm_head.weight is model.transformer.wte.weight  # nothing changed

    model = tiny_model("gpt2")
    embed = model.transformer.wte.weight.detach().clone()
    surgeon.patch(model, _recipe({"path": "lm_head"}, r=4, init="random", untie=True))
    unmerged = output_of(model, inputs)
    assert L.untied_names(model) == {"transformer.wte.weight": "transformer.wte.weight", "lm_head.weight": "transformer.wte.weight"}
    (piece,) = L.merge_pieces(model)
    assert piece.param_name == "lm_head.weight" and piece.index is None
    L.merge(model)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.transformer.wte.weight, embed)  # the input embeddings are untouched
    assert _rel(output_of(model, inputs), unmerged) <= 1e-5
    assert L.untied_names(model) == {"transformer.wte.weight": "transformer.wte.weight", "lm_head.weight": "transformer.wte.weight"}
    L.unmerge(model)
    assert model.lm_head.weight is model.transformer.wte.weight  # re-tied
    assert torch.equal(output_of(model, inputs), unmerged)


def test_tied_embedding_side_refused_too():
    model = tiny_model("gpt2")
    with pytest.warns(UserWarning, match="tied"):
        surgeon.patch(model, _recipe({"path": "transformer.wte"}, r=4))
    with pytest.raises(SurgeonError, match=r"transformer.wte.weight: it is tied to lm_head.weight"):
        L.merge(model)


def test_lora_on_a_tied_weight_warns_when_applied(recwarn):
    """The merge refusal above is announced when the rule is applied, not first at export."""
    model = tiny_model("gpt2")
    surgery = surgeon.patch(model, _recipe({"role": "embed"}, r=4))  # wte (tied to lm_head) and wpe
    (message,) = surgery.warnings
    assert "transformer.wte.weight, which is tied to lm_head.weight" in message and "untie: true" in message
    assert [str(w.message) for w in recwarn.list if issubclass(w.category, UserWarning)] == [message]
    recwarn.clear()
    assert surgeon.patch(tiny_model("gpt2"), _recipe({"role": "embed"}, r=4, untie=True)).warnings == []
    assert surgeon.patch(tiny_model("bert"), _recipe({"regex": ".*word_embeddings"}, r=4)).warnings == []  # untied
    assert not [w for w in recwarn.list if issubclass(w.category, UserWarning)]


def _apply_pieces(state: dict, pieces: list[MergePiece]) -> dict:
    out = {n: t.clone().float() for n, t in state.items()}
    for piece in pieces:
        target = out[piece.param_name]
        if piece.index is None:
            target += piece.delta()
        else:
            target[piece.index] += piece.delta()
    return out


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_pieces_reproduce_the_merge(case):
    family, select = case
    model = tiny_model(family)
    surgeon.patch(model, _recipe(select, r=4, init="random"))
    pieces = L.merge_pieces(model)
    assert pieces and all(isinstance(p, MergePiece) and p.adapter == "default" for p in pieces)
    base = {n: p.detach() for n, p in model.named_parameters() if ".surgeon_lora." not in n}
    assert all(p.param_name in base for p in pieces)
    for piece in pieces:
        delta = piece.delta()
        assert delta.dtype == torch.float32
        region = base[piece.param_name] if piece.index is None else base[piece.param_name][piece.index]
        assert delta.shape == region.shape
    expected = _apply_pieces(base, pieces)
    L.merge(model)
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.detach().float(), expected[name], rtol=0, atol=1e-6)
    if family == "gpt2":
        slices = [p for p in pieces if p.index is not None]
        assert slices and all(p.index[0] == slice(None) for p in slices)  # Conv1D: column ranges


def test_merge_pieces_on_meta_model_with_assigned_lora_tensors(tiny_model_dir):
    base = tiny_model_dir("gpt2")
    recipe = _recipe({"role": ["attn.q", "attn.v", "mlp.up"]}, r=4, init="random")
    model, _ = surgeon.load_model(base)
    surgeon.patch(model, recipe)
    small = {n: t.detach().clone() for n, t in model.state_dict().items() if ".surgeon_lora." in n}
    meta, _ = surgeon.build_meta_model(base)
    surgeon.patch(meta, recipe)
    meta.load_state_dict(small, strict=False, assign=True)
    live = {(p.param_name, str(p.index)): p.delta() for p in L.merge_pieces(model)}
    got = {(p.param_name, str(p.index)): p.delta() for p in L.merge_pieces(meta)}
    assert live.keys() == got.keys()
    for key in live:
        assert torch.equal(live[key], got[key]), key
    assert L.non_mergeable(meta) == []


def test_merge_survives_deepcopy_and_non_mergeable_lists_bottlenecks():
    model, inputs = tiny_model("bert"), tiny_inputs("bert")
    surgeon.patch(model, {"surgeon": 1, "rules": [
        {"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 2, "init": "random"}},
        {"do": "adapter", "select": {"role": "layer", "layers": 0}, "with": {"size": 4}},
    ]})  # fmt: skip
    lines = L.non_mergeable(model)
    assert lines == [
        "encoder.layer.0.attention.output.dense: bottleneck adapter 'default' (292 params) is a nonlinear branch and cannot be merged into the weights",
        "encoder.layer.0.output.dense: bottleneck adapter 'default' (292 params) is a nonlinear branch and cannot be merged into the weights",
    ]
    expected = output_of(model, inputs)
    clone = copy.deepcopy(model)
    assert torch.equal(output_of(clone, inputs), expected)
    L.merge(clone)  # LoRA folds in; the bottleneck adapters keep running in forward
    assert _rel(output_of(clone, inputs), expected) <= 1e-5
    assert torch.equal(output_of(model, inputs), expected)  # the original is untouched


def test_lora_and_bottleneck_on_one_module_merge_consistently():
    """The bottleneck must see W0x + BAx whether LoRA is merged or not, whatever the rule order."""
    model, inputs = tiny_model("llama"), tiny_inputs("llama")
    surgeon.patch(model, {"surgeon": 1, "rules": [
        {"do": "adapter", "select": {"role": "attn.o"}, "with": {"size": 4}},
        {"do": "lora", "select": {"role": "attn.o"}, "with": {"r": 2, "init": "random"}},
    ]})  # fmt: skip
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_up" in name:
                param.normal_(0, 0.5)
    unmerged = output_of(model, inputs)
    L.merge(model)
    assert _rel(output_of(model, inputs), unmerged) <= 1e-5


def test_non_finite_merge_changes_nothing():
    model = tiny_model("llama")
    surgeon.patch(model, _recipe({"role": ["attn.q", "mlp.down"]}, r=2, init="random"))
    state = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.surgeon_lora.default.lora_B[0, 0] = float("inf")
    with pytest.raises(SurgeonError, match=r"model.layers.2.mlp.down_proj.weight gives non-finite values"):
        L.merge(model)
    assert all(torch.equal(t, state[n]) for n, t in model.state_dict().items() if "lora_B" not in n)
    assert not any(a.merged for _, _, h in L.lora_hosts(model) for _, _, a in h.adapters())
