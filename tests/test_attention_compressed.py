"""linformer / latent / lsh actions on tiny random models: outputs, padding, params, diff, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import first_output, output_of, tiny_inputs, tiny_model

import surgeon
from surgeon.errors import SurgeonError

def recipe(do, select=None, **params):
    return {"surgeon": 1, "rules": [{"do": do, "select": select or {"role": "attn"}, "with": params}]}


def bert_inputs(seq=20, real=13):
    inputs = tiny_inputs("bert", seq=seq)
    inputs["attention_mask"][1, real:] = 0
    return inputs


CASES = [
    ("linformer", {"k": 8}),
    ("linformer", {"k": 8, "share": "kv", "init": "random"}),
    ("linformer", {"k": 8, "share": "layer"}),
    ("latent", {"m": 6}),
    ("latent", {"m": 6, "summary_keys": "attended"}),
    ("linformer", {"k": 8, "local_window": 4}),
    ("latent", {"m": 6, "local_window": 6}),
    ("lsh", {"n_hashes": 2, "bucket_size": 4}),
]


@pytest.mark.parametrize("do,params", CASES)
def test_padded_batch_row_equals_the_sequence_alone(do, params):
    # All three must ignore what sits under the padding. Linformer and latent are moreover
    # exactly padding-invariant (same result as the sequence alone); LSH is not — the padded
    # length changes the number of chunks and buckets — so it is compared with its pair-exact
    # reference in the kernel tests instead.
    model = tiny_model("bert")
    surgeon.patch(model, recipe(do, **params))
    inputs = bert_inputs()
    out = output_of(model, inputs)
    assert torch.isfinite(out).all()
    poisoned = {**inputs, "input_ids": inputs["input_ids"].clone()}
    poisoned["input_ids"][1, 13:] = 5  # other tokens under the padding
    torch.testing.assert_close(output_of(model, poisoned)[1, :13], out[1, :13], rtol=1e-5, atol=1e-5)
    if do != "lsh":
        alone = {k: v[1:, :13] for k, v in inputs.items()}
        torch.testing.assert_close(output_of(model, alone)[0], out[1, :13], rtol=1e-5, atol=1e-5)


def test_linformer_identity_projection_reproduces_the_dense_model():
    model = tiny_model("bert")
    inputs = bert_inputs()
    dense = output_of(model, inputs)
    surgeon.patch(model, recipe("linformer", k=64))  # max_length = the model's 64 positions
    with torch.no_grad():
        for layer in model.encoder.layer:
            variant = layer.attention.self.surgeon_attention
            variant.proj_k.copy_(torch.eye(64))
            variant.proj_v.copy_(torch.eye(64))
    torch.testing.assert_close(output_of(model, inputs)[0], dense[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output_of(model, inputs)[1, :13], dense[1, :13], rtol=1e-5, atol=1e-5)


def test_lsh_with_one_chunk_reproduces_the_dense_model():
    model = tiny_model("bert")
    inputs = bert_inputs()
    dense = output_of(model, inputs)
    surgeon.patch(model, recipe("lsh", n_hashes=3, bucket_size=32))
    out = output_of(model, inputs)
    torch.testing.assert_close(out[0], dense[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :13], dense[1, :13], rtol=1e-5, atol=1e-5)


def test_lsh_changes_attention_when_sparse():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", seq=40)
    dense = output_of(model, inputs)
    surgeon.patch(model, recipe("lsh", n_hashes=1, bucket_size=4))
    assert not torch.allclose(output_of(model, inputs), dense, atol=1e-4)


@pytest.mark.parametrize("share,expected", [("none", 3 * 2 * 8 * 64), ("kv", 3 * 8 * 64), ("layer", 8 * 64)])
def test_linformer_added_parameters(share, expected):
    model = tiny_model("bert")
    surgery = surgeon.patch(model, recipe("linformer", k=8, share=share))
    assert surgery.ledger.added_total == expected
    added = [n for n, p in model.named_parameters() if "surgeon_attention" in n]
    assert sum(dict(model.named_parameters())[n].numel() for n in added) == expected
    assert set(added) == set(surgery.ledger.added)
    assert all(dict(model.named_parameters())[n].requires_grad for n in added)
    if share == "layer":  # one tensor, used by every layer
        proj = model.encoder.layer[0].attention.self.surgeon_attention.proj_k
        for layer in model.encoder.layer:
            assert layer.attention.self.surgeon_attention.projections()[0] is proj


def test_latent_added_parameters_per_layer():
    model = tiny_model("bert")
    surgery = surgeon.patch(model, recipe("latent", m=6))
    assert surgery.ledger.added_total == 3 * 4 * 6 * 8  # layers × heads × m × head_dim
    assert surgery.ledger.added_total > 0


def test_lsh_adds_nothing():
    model = tiny_model("bert")
    assert surgeon.patch(model, recipe("lsh", n_hashes=2, bucket_size=4)).ledger.added_total == 0


def test_shared_layer_projection_trains_as_one_tensor():
    model = tiny_model("bert")
    surgeon.patch(model, recipe("linformer", k=8, share="layer"))
    output_of(model, bert_inputs())  # no error
    first_output(model(**bert_inputs())).sum().backward()
    proj = model.encoder.layer[0].attention.self.surgeon_attention.proj_k
    assert proj.grad is not None and proj.grad.abs().sum() > 0


@pytest.mark.parametrize("do,params", [
    ("linformer", {"k": 8}), ("linformer", {"k": 8, "share": "layer"}), ("latent", {"m": 6}),
    ("linformer", {"k": 8, "local_window": 4}), ("latent", {"m": 6, "local_window": 4}),
    ("lsh", {"n_hashes": 2, "bucket_size": 4}),
])  # fmt: skip
def test_diff_roundtrip_reproduces_outputs(do, params, tiny_model_dir, tmp_path):
    base = tiny_model_dir("bert")
    model, _ = surgeon.load_model(base)
    surgeon.patch(model, recipe(do, **params))
    torch.manual_seed(3)
    with torch.no_grad():  # stand-in for training
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    surgeon.save_diff(model, str(tmp_path / "d"))
    loaded = surgeon.load(base, str(tmp_path / "d"))
    inputs = bert_inputs()
    assert torch.equal(output_of(loaded, inputs), output_of(model, inputs))


def test_local_window_changes_the_output_and_the_cost():
    from surgeon.report import attention_cost

    inputs = bert_inputs()
    outs, costs = [], []
    for window in (0, 4):
        model = tiny_model("bert")
        surgeon.patch(model, recipe("latent", m=6, local_window=window))
        outs.append(output_of(model, inputs))
        costs.append(attention_cost(surgeon.modelmap.ModelMap(model), 64)["modules"][0]["flops"])
    assert not torch.allclose(outs[0], outs[1])
    heads, head_dim = 4, 8  # the tiny BERT's attention (hidden 32)
    assert costs[1] - costs[0] == 4 * heads * 64 * 5 * head_dim  # Q·Kᵀ and P·V over 5 keys per query


def test_report_cost_uses_the_variant():
    from surgeon.report import attention_cost

    model = tiny_model("bert")
    surgeon.patch(model, recipe("linformer", k=8, select={"role": "attn", "layers": "0:1"}))
    cost = attention_cost(surgeon.modelmap.ModelMap(model), 64)
    rows = {row["module"]: row for row in cost["modules"]}
    first = rows["encoder.layer.0.attention.self"]
    assert first["variant"] == "linformer" and first["flops"] < first["dense_flops"]
    assert rows["encoder.layer.1.attention.self"]["variant"] == "dense"


@pytest.mark.parametrize("do,params,message", [
    ("linformer", {"k": 0}, r"with.k: must be ≥ 1 \(got 0\)$"),  # the recipe's own error: no module to name
    ("linformer", {"k": 65}, r"encoder.layer.0.attention.self: k=65 exceeds max_length=64 .*\(and 2 more layers\)$"),
    ("lsh", {"bucket_size": -4}, r"with.bucket_size: must be ≥ 1 \(got -4\)$"),
])  # fmt: skip
def test_bad_parameters_are_one_line(do, params, message):
    # range checks at validation (test_action_limits.py has them all); the model's own limits
    # once per rule, naming the first module and counting the others
    model = tiny_model("bert")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(SurgeonError, match=message) as info:
        surgeon.patch(model, recipe(do, **params))
    assert len(str(info.value).splitlines()) == 1
    assert not hasattr(model.encoder.layer[0].attention.self, "surgeon_attention")
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("do,params", [("linformer", {"k": 8}), ("latent", {"m": 4}), ("lsh", {})])
def test_causal_modules_refused(family, do, params):
    model = tiny_model(family)
    with pytest.raises(SurgeonError, match="causal") as info:
        surgeon.patch(model, recipe(do, **params))
    assert ".0." in str(info.value)


@pytest.mark.parametrize("do,params", [("linformer", {"k": 8}), ("latent", {"m": 4}), ("lsh", {})])
def test_non_attention_targets_refused(do, params):
    model = tiny_model("bert")
    with pytest.raises(SurgeonError, match="not a self-attention module") as info:
        surgeon.patch(model, recipe(do, select={"role": "mlp.up"}, **params))
    assert "encoder.layer.0.intermediate.dense" in str(info.value)


def test_t5_position_bias_refused_at_run_time():
    model = tiny_model("t5")
    encoder = {"path": "encoder.block.*.layer.0.SelfAttention"}
    surgeon.patch(model, recipe("lsh", select=encoder, n_hashes=2, bucket_size=4))
    with pytest.raises(SurgeonError, match="position bias"):
        output_of(model, tiny_inputs("t5", seq=20))


def test_linformer_too_long_input_refused_at_run_time():
    # max_length below the model's positions: the module takes inputs up to max_length only
    model = tiny_model("bert")
    surgery = surgeon.patch(model, recipe("linformer", k=8, max_length=32))
    assert any("inputs over max_length=32 tokens are refused" in n for r in surgery.ledger.rules for n in r.notes)
    output_of(model, tiny_inputs("bert", seq=32))
    with pytest.raises(SurgeonError, match="encoder.layer.0.attention.self: input of 40 tokens exceeds max_length 32"):
        output_of(model, tiny_inputs("bert", seq=40))
