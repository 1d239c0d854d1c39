"""The report from config.json alone (meta device) agrees with the loaded model, and is fast."""

from __future__ import annotations

import json
import time

import pytest
import transformers

import surgeon
from surgeon.checkpoint import build_meta_model


def test_meta_report_equals_loaded_report(tiny_model_dir):
    base = tiny_model_dir("gpt2")
    recipe = {"surgeon": 1, "rules": [
        {"do": "bitfit", "select": {"role": "model"}},
        {"do": "unfreeze", "select": {"role": "attn", "layers": "1:"}},
    ]}  # fmt: skip
    meta, _ = build_meta_model(base)
    assert all(p.is_meta for p in meta.parameters())
    loaded, _ = surgeon.load_model(base)
    a = surgeon.patch(meta, recipe).report().to_dict()
    b = surgeon.patch(loaded, recipe).report().to_dict()
    for key in ("total_params", "trainable_params", "added_params", "rules", "layers", "training_memory"):
        assert a[key] == b[key], key


def test_llama_70b_config_reports_in_seconds(tmp_path):
    config = transformers.LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, dtype="bfloat16",
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    from click.testing import CliRunner

    from surgeon.cli import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("surgeon: 1\nrules:\n  - do: unfreeze\n    select: {role: norm}\n")
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["report", str(tmp_path), "--recipe", str(recipe), "--json"])
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    # independent count: embeddings + lm_head + 80 x (attention + MLP + 2 norms) + final norm
    h, f, kv = 8192, 28672, 8 * 128
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * f + 2 * h
    expected = 2 * 128256 * h + 80 * per_layer + h
    assert data["total_params"] == expected
    assert data["trainable_params"] == 80 * 2 * h + h
    assert data["dtype"] == "bfloat16"
    assert data["training_memory"]["weights_bytes"] == expected * 2
    assert elapsed < 30, elapsed


@pytest.mark.parametrize("seq_len", [128])
def test_report_seq_len_lists_dense_attention_cost(tiny_model_dir, seq_len):
    meta, _ = build_meta_model(tiny_model_dir("bert"))
    report = surgeon.patch(meta, {"surgeon": 1, "rules": [{"do": "bitfit", "select": {"role": "attn"}}]}).report(
        seq_len=seq_len
    )
    cost = report.to_dict()["attention_cost"]
    assert len(cost["modules"]) == 3
    first = cost["modules"][0]
    assert first["variant"] == "dense" and first["flops"] == first["dense_flops"] == 4 * 4 * 128 * 128 * 8
    assert "attention cost at seq_len=128" in report.render()
