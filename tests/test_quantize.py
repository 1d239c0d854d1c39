"""`quantize` (QLoRA's frozen NF4 / int8 base): storage, LoRA over it, diffs, exports, refusals."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import output_of, tiny_inputs, tiny_model
from export_support import make_diff
from trainkit import FAST, data_file, make_base
from trainkit import make_diff as make_untrained_diff

import surgeon
from surgeon import quant
from surgeon.cli import cli
from surgeon.errors import SurgeonError
from surgeon.quant import QuantSpec

pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")

# tiny llama: q/o (32, 32), k/v (16, 32), gate/up (48, 32), down (32, 48)
NF4 = {"format": "nf4", "block_size": 16, "scaler_block_size": 4}
PROJ = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]


def qlora(fmt: dict = NF4, base: str = "frozen") -> dict:
    return {
        "surgeon": 1,
        "base": base,
        "rules": [
            {"do": "quantize", "select": {"role": PROJ}, "with": fmt},
            {
                "do": "lora",
                "select": {"role": ["attn.q", "attn.v", "mlp.down"]},
                "with": {"r": 4, "init": "random"},
            },
        ],
    }


@pytest.mark.parametrize(
    "spec", [QuantSpec("nf4", 16, 4), QuantSpec("nf4", 64, 2), QuantSpec("int8"), QuantSpec("int8", 16)]
)
def test_stored_bytes_match_the_shape_formula_and_error_is_bounded(spec):
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    q = quant.quantize(weight, spec)
    assert quant.stored_bytes(q) == quant.expected_bytes((48, 64), spec)
    assert quant.stored_bytes(q) < weight.numel() * 4 / (6 if spec.format == "nf4" else 3)
    err = (quant.dequantize(q) - weight).abs().max().item()
    assert 0 < err < (0.6 if spec.format == "nf4" else 0.03) * weight.abs().max().item()
    # deterministic: the same weight gives the same bits (what lets a diff omit the base)
    assert torch.equal(quant.dequantize(quant.quantize(weight, spec)), quant.dequantize(q))


@pytest.mark.parametrize("fmt", [NF4, {"format": "int8"}, {"format": "int8", "block_size": 16}])
def test_qlora_trains_lora_only_and_report_counts_quantised_bytes(fmt):
    model = tiny_model("llama")
    inputs = tiny_inputs("llama")
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    surgery = surgeon.patch(model, qlora(fmt))
    ledger = surgery.ledger
    assert len(ledger.quantized) == 3 * len(PROJ)
    for name in ledger.quantized:
        param = dict(model.named_parameters())[name]
        assert quant.is_quantized(param) and not param.requires_grad
        assert name not in ledger.diff_names()
        assert torch.equal(quant.dequantize(param), quant.roundtrip(dense[name], ledger.quantized[name][0]))
    # the quantised model computes with the dequantised weights, and LoRA trains over them
    model.train()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(ledger.trainable) and all(".surgeon_lora." in n for n in grads)

    data = surgery.report().to_dict()
    elements, stored = ledger.quantized_bytes()
    mem = data["training_memory"]
    assert data["quantized"]["params"] == elements and data["quantized"]["bytes"] == stored
    assert mem["weights_bytes"] == (data["model_params"] - elements) * 4 + stored
    assert mem["total_bytes"] == mem["weights_bytes"] + mem["grads_bytes"] + mem["optimizer_bytes"]


def test_merge_folds_lora_into_the_dequantised_weight_and_unmerge_restores_it():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama")
    surgeon.patch(model, qlora())
    before = output_of(model.eval(), inputs)
    q_proj = model.model.layers[0].self_attn.q_proj
    quantised = q_proj.weight
    assert surgeon.merge(model) == 9
    assert not quant.is_quantized(q_proj.weight) and q_proj.weight.dtype == torch.float32
    torch.testing.assert_close(output_of(model, inputs), before, rtol=1e-5, atol=1e-5)
    assert surgeon.unmerge(model) == 9
    assert q_proj.weight is quantised
    assert torch.equal(output_of(model, inputs), before)


def test_diff_omits_the_quantised_base_and_loads_bit_identical(tmp_path, tiny_model_dir):
    base = tiny_model_dir("llama")
    diff = make_diff(base, str(tmp_path / "diff"), qlora())
    from safetensors import safe_open

    with safe_open(f"{diff}/diff.safetensors", framework="pt") as handle:
        stored = set(handle.keys())
    assert stored and all(".surgeon_lora." in n for n in stored)
    inputs = tiny_inputs("llama")
    first = output_of(surgeon.load(base, diff), inputs)
    again = surgeon.load(base, diff)
    assert quant.is_quantized(again.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(output_of(again, inputs), first)


def test_exports_merged_fp32_and_surgeon_keeps_the_quantised_base(tmp_path, tiny_model_dir):
    base = tiny_model_dir("llama")
    diff = make_diff(base, str(tmp_path / "diff"), qlora())
    inputs = tiny_inputs("llama")
    patched = surgeon.load(base, diff)
    want = output_of(patched, inputs)
    runner = CliRunner()
    hf = str(tmp_path / "hf")
    result = runner.invoke(cli, ["export", diff, "-o", hf, "--no-progress"])
    assert result.exit_code == 0, result.output
    import transformers

    plain = transformers.LlamaForCausalLM.from_pretrained(hf).eval()
    assert all(not quant.is_quantized(p) and p.dtype == torch.float32 for p in plain.parameters())
    # LoRA merged into dequantize(quantize(W)) in fp32: the trained model's function, not W's
    torch.testing.assert_close(output_of(plain, inputs), want, rtol=1e-4, atol=1e-4)
    merged = surgeon.load(base, diff)
    surgeon.merge(merged)
    assert torch.equal(
        plain.model.layers[0].self_attn.q_proj.weight, merged.model.layers[0].self_attn.q_proj.weight
    )

    own = str(tmp_path / "own")
    result = runner.invoke(cli, ["export", diff, "-o", own, "--format", "surgeon", "--no-progress"])
    assert result.exit_code == 0, result.output
    back = surgeon.load(own)
    assert quant.is_quantized(back.model.layers[2].self_attn.k_proj.weight)
    assert torch.equal(output_of(back, inputs), want)


def test_surgeon_train_updates_lora_over_an_nf4_base_and_leaves_it_bit_identical(tmp_path):
    base = make_base(tmp_path / "base", "llama")
    rules = [
        {"do": "quantize", "select": {"role": PROJ}, "with": {"format": "nf4", "block_size": 16}},
        {"do": "lora", "select": {"role": PROJ}, "with": {"r": 4, "alpha": 8}},
    ]
    diff = make_untrained_diff(base, str(tmp_path / "d"), rules)
    before = {
        n: quant.dequantize(p)
        for n, p in surgeon.load(base, diff).named_parameters()
        if quant.is_quantized(p)
    }
    out = str(tmp_path / "out")
    result = surgeon.train_diff(
        diff, [data_file(tmp_path)], out_dir=out, objective="clm", steps=30, lr=1e-2, **FAST
    )
    losses = result.losses
    # a tiny random model starts near log(vocab) = 5.55; LoRA over fp32 reaches ~5.39 here too
    assert sum(losses[-5:]) / 5 < losses[0] - 0.1, losses
    trained = surgeon.load(base, out)
    after = {n: quant.dequantize(p) for n, p in trained.named_parameters() if quant.is_quantized(p)}
    assert after.keys() == before.keys() and len(after) == 2 * len(PROJ)
    assert all(torch.equal(after[n], before[n]) for n in before)
    from safetensors import safe_open

    with safe_open(f"{out}/diff.safetensors", framework="pt") as handle:
        assert all(".surgeon_lora." in n for n in handle.keys())


def _patch_error(recipe: dict, family: str = "llama") -> str:
    model = tiny_model(family)
    with pytest.raises(SurgeonError) as info:
        surgeon.patch(model, recipe)
    assert not any(quant.is_quantized(p) for p in model.parameters())  # refused before any change
    return str(info.value)


def one(select: dict, fmt: dict = NF4, base: str = "frozen", before=()) -> dict:
    """A recipe of `before` rules, then one quantize rule."""
    return {"surgeon": 1, "base": base, "rules": [*before, {"do": "quantize", "select": select, "with": fmt}]}


def test_refusals_are_one_line_before_any_change():
    message = _patch_error(one({"role": "norm"}))
    assert "LlamaRMSNorm" in message and "nn.Linear weights only" in message and "\n" not in message
    message = _patch_error(one({"role": "attn.q"}, base="trainable"))
    assert "trainable when this rule runs" in message and "\n" not in message
    unfreeze = {"do": "unfreeze", "select": {"role": "layer", "layers": "0"}}
    message = _patch_error(one({"role": "attn.q", "layers": "0"}, before=[unfreeze]))
    assert "model.layers.0.self_attn.q_proj.weight is trainable" in message
    later = qlora()
    later["rules"].append({"do": "unfreeze", "select": {"role": "layer", "layers": "1"}})
    message = _patch_error(later)
    assert "stored quantised and cannot be trained" in message and "\n" not in message
    message = _patch_error(one({"role": "attn.k"}, {"format": "nf4", "scaler_block_size": 256}))
    assert "scaler_block_size" in message and "would fit" in message
    message = _patch_error(one({"role": "attn.k"}, {"format": "nf4", "block_size": 1024}))
    assert "512 elements are not a multiple of block_size=1024" in message
    message = _patch_error(one({"path": "lm_head"}, {"format": "int8"}, before=[]), family="gpt2")
    assert "Conv1D" in message or "tied" in message
    with pytest.raises(SurgeonError, match="power of two"):
        surgeon.patch(tiny_model("llama"), one({"role": "attn.q"}, {"format": "nf4", "block_size": 48}))
    with pytest.raises(SurgeonError, match="nf4 only"):
        surgeon.patch(
            tiny_model("llama"), one({"role": "attn.q"}, {"format": "int8", "scaler_block_size": 4})
        )


def test_nf4_default_scaler_block_fits_the_shape():
    model = tiny_model("llama")
    surgeon.patch(model, one({"role": ["attn.q", "attn.k"]}, {"format": "nf4", "block_size": 16}))
    specs = {
        name.rsplit(".", 2)[-2]: spec
        for name, (spec, _) in surgeon.surgery_of(model).ledger.quantized.items()
    }
    assert specs["q_proj"] == QuantSpec("nf4", 16, 64) and specs["k_proj"] == QuantSpec("nf4", 16, 32)


def test_report_memory_per_rank_for_strategies(tmp_path, tiny_model_dir):
    base = tiny_model_dir("llama")
    recipe = tmp_path / "q.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(qlora()))
    runner = CliRunner()
    import json

    def report(*extra):
        result = runner.invoke(cli, ["report", base, "-r", str(recipe), "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    single = report()
    assert single["quantized"]["params"] == 3 * (32 * 32 * 2 + 16 * 32 * 2 + 48 * 32 * 2 + 32 * 48)
    ddp = report("--world-size", "4", "--strategy", "ddp")["training_memory"]
    fsdp = report("--world-size", "4", "--strategy", "fsdp")["training_memory"]
    assert ddp["per_rank_bytes"] == single["training_memory"]["total_bytes"]
    for part in ("weights_bytes", "grads_bytes", "optimizer_bytes"):
        assert fsdp["per_rank"][part] == -(-single["training_memory"][part] // 4)
    text = runner.invoke(cli, ["report", base, "-r", str(recipe), "--world-size", "4", "--strategy", "fsdp"])
    assert "per rank (fsdp, 4 ranks)" in text.output and "quantised" in text.output
    bad = runner.invoke(cli, ["report", base, "-r", str(recipe), "--world-size", "0"])
    assert bad.exit_code == 2
