"""Houlsby bottleneck adapters: placement, identity at init, training touches only adapters,
diffs reproduce outputs, named adapters, ledger counts, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import first_output, output_of, tiny_inputs, tiny_model

import surgeon
import surgeon.lora as L
from surgeon.adapters.bottleneck import BottleneckHost
from surgeon.errors import SurgeonError

# family -> the projections whose outputs get adapters (layer 0), attn then mlp
PLACES = {
    "bert": ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"],
    "gpt2": ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"],
    "llama": ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"],
}


def _recipe(select, **params) -> dict:
    return {"surgeon": 1, "rules": [{"do": "adapter", "select": select, "with": params}]}


def _hosts(model):
    return {path: host for path, module in model.named_modules() if (host := BottleneckHost.on(module))}


@pytest.mark.parametrize("family", sorted(PLACES))
def test_placement_and_identity_at_init(family):
    model, inputs = tiny_model(family), tiny_inputs(family)
    before = output_of(model, inputs)
    surgeon.patch(model, _recipe({"role": "layer"}, reduction_factor=4, activation="gelu"))
    hosts = _hosts(model)
    assert sorted(p for p in hosts if ".0." in p) == sorted(PLACES[family])
    assert len(hosts) == 2 * model.config.num_hidden_layers
    assert torch.equal(output_of(model, inputs), before)
    # non-zero up projection: the branch h + up(act(down(h))) is really added there
    module = model.get_submodule(PLACES[family][0])
    adapter = hosts[PLACES[family][0]].default
    with torch.no_grad():
        adapter.adapter_up.weight.normal_()
    x = torch.randn(2, 3, adapter.adapter_down.in_features)
    kind_weight = module.weight.t() if type(module).__name__ == "Linear" else module.weight
    h = x.double() @ kind_weight.double()
    if module.bias is not None:
        h = h + module.bias.double()
    down = adapter.adapter_down
    ref = h + torch.nn.functional.gelu(h @ down.weight.double().t() + down.bias.double()) @ adapter.adapter_up.weight.double().t() + adapter.adapter_up.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(module(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_placement_attn_only_and_direct_projection_selection():
    model = tiny_model("llama")
    surgeon.patch(model, _recipe({"role": "layer", "layers": "0:2"}, size=5, placement=["attn"]))
    assert sorted(_hosts(model)) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert model.model.layers[0].self_attn.o_proj.surgeon_adapter.default.adapter_down.out_features == 5
    model = tiny_model("bert")
    surgeon.patch(model, _recipe({"role": "mlp.down"}, size=3))
    assert sorted(_hosts(model)) == [f"encoder.layer.{i}.output.dense" for i in range(3)]


@pytest.mark.parametrize("family", sorted(PLACES))
def test_three_steps_change_only_adapters(family):
    model, inputs = tiny_model(family), tiny_inputs(family)
    model.train()
    surgery = surgeon.patch(model, _recipe({"role": "layer"}, size=4))
    adapter_names = {n for n, _ in model.named_parameters() if ".surgeon_adapter." in n}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter_names
    # ledger: added = independent count of (dim·size + size) + (size·dim + dim) per place
    dim = model.config.hidden_size if family != "gpt2" else model.config.n_embd
    assert surgery.ledger.added_total == 2 * model.config.num_hidden_layers * (2 * dim * 4 + 4 + dim)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        first_output(model(**inputs)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, value in model.named_parameters():
        if name in adapter_names:
            assert not torch.equal(value, before[name]), f"{name} did not train"
        else:
            assert torch.equal(value, before[name]), name


def test_diff_roundtrip_and_named_adapters(tiny_model_dir, tmp_path):
    base = tiny_model_dir("bert")
    model, _ = surgeon.load_model(base)
    inputs = tiny_inputs("bert")
    plain = output_of(model, inputs)
    surgeon.patch(model, {"surgeon": 1, "rules": [
        {"do": "adapter", "select": {"role": "layer"}, "with": {"size": 4, "name": "a"}},
        {"do": "adapter", "select": {"role": "layer"}, "with": {"size": 2, "name": "b", "placement": ["mlp"]}},
    ]})  # fmt: skip
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".surgeon_adapter." in name:
                param.normal_(0, 0.1)
    both = output_of(model, inputs)
    surgeon.save_diff(model, str(tmp_path / "both"), base_dir=base)
    assert torch.equal(output_of(surgeon.load(base, str(tmp_path / "both")), inputs), both)
    L.set_active(model, "a")
    only_a = output_of(model, inputs)
    with L.disable_adapters(model):
        assert torch.equal(output_of(model, inputs), plain)
    assert not torch.equal(only_a, both) and not torch.equal(only_a, plain)
    L.save_adapter_diff(model, str(tmp_path / "a"), "a", base_dir=base)
    loaded = surgeon.load(base, str(tmp_path / "a"))
    assert L.adapter_names(loaded) == ["a"]
    assert torch.equal(output_of(loaded, inputs), only_a)


def test_real_minilm_identity_at_init(minilm_dir):
    model, _ = surgeon.load_model(minilm_dir)
    model.eval()
    inputs = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 6251, 102]])}
    before = output_of(model, inputs)
    surgery = surgeon.patch(model, _recipe({"role": "layer"}))  # reduction_factor 16: 384 -> 24
    assert torch.equal(output_of(model, inputs), before)
    assert surgery.ledger.added_total == 6 * 2 * (2 * 384 * 24 + 24 + 384)


@pytest.mark.parametrize(
    "select, params, message",
    [
        ({"role": "layer"}, {"size": 4, "reduction_factor": 8}, "not both"),
        ({"role": "layer"}, {"size": 0}, r"size: must be ≥ 1 \(got 0\)"),
        ({"role": "layer"}, {"reduction_factor": -1}, r"reduction_factor: must be ≥ 1 \(got -1\)"),
        ({"role": "layer"}, {"size": 33}, "size 33 exceeds the hidden size 32"),
        ({"role": "layer"}, {"placement": []}, "placement needs at least one"),
        ({"role": "layer"}, {"activation": "softmax"}, "activation"),
        ({"role": "norm"}, {}, "contains no attn.o or mlp.down projection"),
    ],
)
def test_bad_input_is_a_clear_error(select, params, message):
    model = tiny_model("llama")
    with pytest.raises(SurgeonError, match=message):
        surgeon.patch(model, _recipe(select, **params))
    assert not _hosts(model)


def test_same_adapter_name_twice_is_an_error():
    model = tiny_model("llama")
    twice = {"surgeon": 1, "rules": [
        {"do": "adapter", "select": {"role": "layer"}, "with": {"size": 2}},
        {"do": "adapter", "select": {"role": "attn.o"}, "with": {"size": 2}},
    ]}  # fmt: skip
    with pytest.raises(SurgeonError, match="adapter 'default' is already on model.layers.0.self_attn.o_proj"):
        surgeon.patch(model, twice)
    assert not _hosts(model)
