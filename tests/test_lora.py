"""The `lora` action: identity at init, the math against a float64 reference, training touches
only adapters, diffs reproduce outputs, named adapters, ledger counts, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import first_output, output_of, tiny_inputs, tiny_model

import surgeon
import surgeon.lora as L
from surgeon.errors import SurgeonError
from surgeon.lora.layer import InputGroup, LoraAdapter, _keep_mask, _MaskedProject, project

ALL_ROLES = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]

# (case id, family, selector, expected adapted-module kinds)
CASES = [
    ("bert-all", "bert", {"role": ALL_ROLES}),
    ("gpt2-qv-slices", "gpt2", {"role": ["attn.q", "attn.v"]}),
    ("gpt2-mlp-conv1d", "gpt2", {"role": ["mlp.up", "mlp.down", "attn.o"]}),
    ("llama-gqa-all", "llama", {"role": ALL_ROLES}),
    ("llama-embedding", "llama", {"path": "model.embed_tokens"}),
]
IDS = [c[0] for c in CASES]


def _recipe(select, **params) -> dict:
    return {"surgeon": 1, "rules": [{"do": "lora", "select": select, "with": params}]}


def _adapters(model):
    return [(path, name, part, a) for path, _, host in L.lora_hosts(model) for name, part, a in host.adapters()]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_outputs_identical_at_init(case):
    _, family, select = case
    model, inputs = tiny_model(family), tiny_inputs(family)
    before = output_of(model, inputs)
    surgeon.patch(model, _recipe(select, r=4, dropout=0.1))
    assert _adapters(model)
    assert torch.equal(output_of(model, inputs), before)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_modules_match_float64_reference(case):
    """Each adapted module's output equals W0·x + (alpha/r)·B·A·x computed in float64."""
    _, family, select = case
    model = tiny_model(family)
    surgeon.patch(model, _recipe(select, r=3, alpha=5.0, init="random"))
    generator = torch.Generator().manual_seed(3)
    for path, _, host in L.lora_hosts(model):
        module = model.get_submodule(path)
        weight = module.weight.detach().double()
        if host.kind == "embedding":
            x = torch.randint(0, weight.shape[0], (2, 5), generator=generator)
            ref = weight[x]
        else:
            in_f = weight.shape[1] if host.kind == "linear" else weight.shape[0]
            x = torch.randn(2, 5, in_f, generator=generator)
            w = weight if host.kind == "linear" else weight.t()  # (out, in)
            ref = x.double() @ w.t()
            if module.bias is not None:
                ref = ref + module.bias.detach().double()
        for _, _, adapter in host.adapters():
            a, b = adapter.lora_A.detach().double(), adapter.lora_B.detach().double()
            scale = 5.0 / 3
            low = a.t()[x] if host.kind == "embedding" else x.double() @ a.t()  # (..., r)
            delta = scale * low @ b.t()
            if adapter.out_range is None:
                ref = ref + delta
            else:
                ref[..., slice(*adapter.out_range)] += delta
        with torch.no_grad():
            got = module(x).double()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_gpt2_slices_leave_k_third_alone():
    model = tiny_model("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 4, c_attn.weight.shape[0])
    before = c_attn(x).detach()
    surgeon.patch(model, _recipe({"role": ["attn.q", "attn.v"]}, r=2, init="random"))
    after = c_attn(x).detach()
    third = before.shape[-1] // 3
    assert torch.equal(after[..., third : 2 * third], before[..., third : 2 * third])
    assert not torch.equal(after[..., :third], before[..., :third])
    assert not torch.equal(after[..., 2 * third :], before[..., 2 * third :])
    names = {n for n, _ in model.named_parameters()}
    assert "transformer.h.0.attn.c_attn.surgeon_lora.default.q.lora_B" in names
    assert model.transformer.h[0].attn.c_attn.surgeon_lora.default.q.lora_B.shape == (third, 2)
    assert "transformer.h.0.attn.c_attn.weight" in names  # base names never change


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_three_steps_change_only_adapters(case):
    _, family, select = case
    model, inputs = tiny_model(family), tiny_inputs(family)
    model.train()
    surgeon.patch(model, _recipe(select, r=4, dropout=0.1))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".surgeon_lora." not in n}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if ".surgeon_lora." in n}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        first_output(model(**inputs)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, value in model.named_parameters():
        if name in base:
            assert torch.equal(value, base[name]), name
        else:
            assert not torch.equal(value, lora[name]), f"{name} did not train"


def test_diff_roundtrip_reproduces_outputs(tiny_model_dir, tmp_path):
    for family, select in [("gpt2", {"role": ["attn.q", "attn.v", "mlp.up"]}), ("llama", {"role": ALL_ROLES}),
                           ("bert", {"role": ["attn.q", "attn.v"]})]:  # fmt: skip
        base = tiny_model_dir(family)
        model, _ = surgeon.load_model(base)
        inputs = tiny_inputs(family)
        surgeon.patch(model, _recipe(select, r=4, dropout=0.1))
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            first_output(model(**inputs)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        expected = output_of(model, inputs)
        out = tmp_path / f"{family}-diff"
        surgeon.save_diff(model, str(out), base_dir=base)
        loaded = surgeon.load(base, str(out))
        assert torch.equal(output_of(loaded, inputs), expected)


def test_real_minilm(minilm_dir, tmp_path):
    model, _ = surgeon.load_model(minilm_dir)
    model.eval()
    inputs = {"input_ids": torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    before = output_of(model, inputs)
    surgeon.patch(model, _recipe({"role": ["attn.q", "attn.v"]}, r=8, alpha=16.0, dropout=0.1))
    assert torch.equal(output_of(model, inputs), before)
    assert len(_adapters(model)) == 12  # 6 layers × (q, v)
    with torch.no_grad():
        for _, _, _, adapter in _adapters(model):
            adapter.lora_B.normal_(0, 0.02)
    expected = output_of(model, inputs)
    assert not torch.equal(expected, before)
    surgeon.save_diff(model, str(tmp_path / "d"), base_dir=minilm_dir)
    assert torch.equal(output_of(surgeon.load(minilm_dir, str(tmp_path / "d")), inputs), expected)
    merged = copy.deepcopy(model)
    L.merge(merged)
    torch.testing.assert_close(output_of(merged, inputs), expected, rtol=1e-5, atol=1e-5)


def test_ledger_counts_equal_independent_sums():
    model = tiny_model("llama")
    cfg = model.config
    surgery = surgeon.patch(model, _recipe({"role": ALL_ROLES}, r=4))
    h, kv, ff = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads), cfg.intermediate_size
    per_layer = sum(4 * (i + o) for i, o in [(h, h), (h, kv), (h, kv), (h, h), (h, ff), (h, ff), (ff, h)])
    expected = per_layer * cfg.num_hidden_layers
    ledger = surgery.ledger
    assert ledger.added_total == expected
    assert sum(model.get_parameter(n).numel() for n in ledger.trainable) == expected
    assert ledger.base_total == sum(p.numel() for n, p in model.named_parameters() if ".surgeon_lora." not in n)
    report = surgery.report().to_dict()
    assert report["trainable_params"] == expected
    assert report["trainable_percent"] == pytest.approx(100 * expected / ledger.base_total)
    assert report["rules"][0]["matched_modules"] == 7 * cfg.num_hidden_layers
    assert report["rules"][0]["added_params"] == expected


def test_named_adapters_switch_and_save(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama")
    model, _ = surgeon.load_model(base)
    inputs = tiny_inputs("llama")
    plain = output_of(model, inputs)
    surgeon.patch(model, {"surgeon": 1, "rules": [
        {"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 4, "name": "task_a", "init": "random"}},
        {"do": "lora", "select": {"role": ["attn.v", "mlp.up"]}, "with": {"r": 2, "name": "task_b", "init": "random"}},
    ]})  # fmt: skip
    assert L.adapter_names(model) == ["task_a", "task_b"]
    both = output_of(model, inputs)
    L.set_active(model, "task_a")
    only_a = output_of(model, inputs)
    L.set_active(model, ["task_b"])
    only_b = output_of(model, inputs)
    with L.disable_adapters(model):
        assert torch.equal(output_of(model, inputs), plain)
    assert torch.equal(output_of(model, inputs), only_b)  # restored after the block
    assert len({tuple(t.flatten().tolist()) for t in (plain, both, only_a, only_b)}) == 4
    for name, expected in (("task_a", only_a), ("task_b", only_b)):
        out = tmp_path / name
        L.save_adapter_diff(model, str(out), name, base_dir=base)
        loaded = surgeon.load(base, str(out))
        assert L.adapter_names(loaded) == [name]
        assert torch.equal(output_of(loaded, inputs), expected)
    assert L.active_adapters(model) == ["task_b"]  # saving left the live model as it was
    surgeon.save_diff(model, str(tmp_path / "all"), base_dir=base)  # the ledger is still consistent
    with pytest.raises(SurgeonError, match="no adapter named 'task_c'"):
        L.set_active(model, "task_c")


def test_group_shares_one_projection_and_matches_separate(monkeypatch):
    """q/k/v (and gate/up) read one input: one dropout mask and one matmul per group."""
    import surgeon.lora.layer as layer

    model, inputs = tiny_model("llama"), tiny_inputs("llama")
    surgeon.patch(model, _recipe({"role": ALL_ROLES}, r=3, init="random", dropout=0.1))
    calls = []
    apply = layer._MaskedProject.apply
    monkeypatch.setattr(layer._MaskedProject, "apply", lambda *args: calls.append(args[1].shape[0]) or apply(*args))
    model.train()
    first_output(model(**inputs)).sum().backward()
    # per layer: q+k+v (3·3 rows of A), o (3), gate+up (2·3), down (3)
    assert calls == [9, 3, 6, 3] * model.config.num_hidden_layers
    model.eval()
    grouped = output_of(model, inputs)
    for *_, adapter in _adapters(model):
        adapter.group = None
    torch.testing.assert_close(output_of(model, inputs), grouped, rtol=1e-6, atol=1e-6)


def test_group_falls_back_when_inputs_differ():
    """A group whose members read different tensors must not reuse the first member's result."""
    torch.manual_seed(0)
    a = LoraAdapter("linear", 6, 5, r=2, alpha=2.0, init="random")
    b = LoraAdapter("linear", 6, 5, r=2, alpha=2.0, init="random")
    group = InputGroup(("test",))
    group.members += [a, b]
    a.group = b.group = group
    x, y = torch.randn(3, 6), torch.randn(3, 6)
    a.delta(x)
    torch.testing.assert_close(b.delta(y), y @ b.lora_A.t() @ b.lora_B.t())
    torch.testing.assert_close(b.delta(x), x @ b.lora_A.t() @ b.lora_B.t())


def test_masked_projection_gradients():
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a: _MaskedProject.apply(x, a, 0.3, 123), (x, a))
    keep, rescale = _keep_mask(x.shape, 0.3, 123, x.device)
    torch.testing.assert_close(_MaskedProject.apply(x, a, 0.3, 123), (x * keep * rescale) @ a.t())
    big, _ = _keep_mask((1000, 1000), 0.05, 9, torch.device("cpu"))
    assert abs(big.float().mean().item() - 0.95) < 2e-3
    # mixed dtype: bf16 input, fp32 adapter; nothing of input size is saved but the input
    xb = torch.randn(8, 7, dtype=torch.bfloat16, requires_grad=True)
    af = torch.randn(4, 7, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        u = project(xb, af, 0.1)
    u.sum().backward()
    assert u.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    assert all(t.dtype != torch.float32 or t.shape != xb.shape for t in saved)


def test_rslora_scale_and_meta_device():
    model = tiny_model("llama")
    surgeon.patch(model, _recipe({"role": "attn.q"}, r=4, alpha=8.0, rslora=True))
    assert {a.scale for *_, a in _adapters(model)} == {4.0}
    from accelerate import init_empty_weights

    with init_empty_weights():
        meta = type(model)(model.config)
    surgeon.patch(meta, _recipe({"role": ["attn.q", "mlp.down"]}, r=4))
    assert all(a.lora_A.is_meta for *_, a in _adapters(meta))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"r": 0}, r"r: must be ≥ 1 \(got 0\)"),
        ({"r": -2}, r"r: must be ≥ 1 \(got -2\)"),
        ({"r": 33}, r"r=33 exceeds min\(in, out\)"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"alpha": -1}, "alpha must be > 0"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"name": "a.b"}, "adapter name"),
        ({"rank": 4}, "rank"),
    ],
)
def test_bad_params_are_clear_errors(params, message):
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(SurgeonError, match=message):
        surgeon.patch(model, _recipe({"role": "attn.q"}, **params))
    assert set(model.state_dict()) == set(before)  # nothing was added


def test_r_checked_against_the_fused_part():
    model = tiny_model("gpt2")  # c_attn: in 32, out 96 (32 per part)
    with pytest.raises(SurgeonError, match=r"transformer.h.0.attn.c_attn\[q:0:32\]"):
        surgeon.patch(model, _recipe({"role": "attn.q"}, r=33))


def test_unsupported_module_names_module_and_type():
    model = tiny_model("llama")
    with pytest.raises(SurgeonError, match=r"model.layers.0.input_layernorm is a LlamaRMSNorm"):
        surgeon.patch(model, _recipe({"path": "model.layers.0.input_layernorm"}))
    with pytest.raises(SurgeonError, match=r"model.layers.0.self_attn is a LlamaAttention"):
        surgeon.patch(model, _recipe({"role": "attn", "layers": 0}))
    assert not list(L.lora_hosts(model))


def test_same_adapter_name_twice_is_an_error():
    model = tiny_model("gpt2")
    twice = {"surgeon": 1, "rules": [
        {"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 2}},
        {"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 4}},
    ]}  # fmt: skip
    with pytest.raises(SurgeonError, match=r"adapter 'default' is already on transformer.h.0.attn.c_attn\[q"):
        surgeon.patch(model, twice)
    assert not list(L.lora_hosts(model))  # nothing applied
    surgeon.patch(model, _recipe({"role": "attn.q"}, r=2))
    with pytest.raises(SurgeonError, match="already on"):
        surgeon.patch(model, _recipe({"role": "attn.q"}, r=3))
    with pytest.raises(SurgeonError, match="already on"):  # whole module after a slice, same name
        surgeon.patch(model, _recipe({"path": "transformer.h.0.attn.c_attn"}, r=3))
    surgeon.patch(model, _recipe({"role": "attn.q"}, r=3, name="other"))  # another name is fine
    assert L.adapter_names(model) == ["default", "other"]
