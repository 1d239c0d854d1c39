"""The report from config.json alone (meta device) agrees with the loaded model, and is fast."""

from __future__ import annotations

import json
import time

import pytest
import transformers

from conftest import tiny_model

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


def test_notes_wrap_at_word_boundaries_and_json_keeps_them_whole():
    model = tiny_model("bert")
    recipe = {"surgeon": 1, "rules": [{"do": "extend_positions", "select": {"role": "embed"}, "with": {"length": 2048}}]}
    report = surgeon.patch(model, recipe).report()
    notes = report.to_dict()["rules"][0]["notes"]
    assert "embeddings.position_embeddings.weight: (64, 32) -> (2048, 32)" in notes
    cells = [line.split("│")[-2].strip() for line in report.render().splitlines() if "│" in line]
    text = " ".join(c for c in cells if c)
    for note in notes:  # every word of every note is in the table, none split in two
        for word in note.split():
            assert word in text.split(), word


def test_causal_ratio_is_against_causal_dense():
    model = tiny_model("llama")
    recipe = {"surgeon": 1, "rules": [{"do": "sliding_window", "select": {"role": "attn"}, "with": {"window": 512}}]}
    report = surgeon.patch(model, recipe).report(seq_len=2048).to_dict()
    row = report["attention_cost"]["modules"][0]
    heads, head_dim, n = 4, 8, 2048
    assert row["causal"] and row["dense_flops"] == 4 * heads * head_dim * n * (n + 1) // 2
    w = 512  # exact: the first w queries see 1 … w keys, the other n - w see w
    assert row["flops"] == 4 * heads * head_dim * (w * (w + 1) // 2 + (n - w) * w)
    assert row["dense_flops"] / row["flops"] == pytest.approx(2.29, rel=0.01)  # not 4.0 (full n²)
    bert = surgeon.patch(tiny_model("bert"), {"surgeon": 1, "rules": [
        {"do": "sliding_window", "select": {"role": "attn"}, "with": {"window": 512}}]}).report(seq_len=2048)  # fmt: skip
    row = bert.to_dict()["attention_cost"]["modules"][0]
    assert not row["causal"] and row["dense_flops"] == 4 * heads * head_dim * n * n
    text = " ".join(bert.render().split())
    assert "the fp32 score matrix of all heads of one sequence" in text and "n(n+1)/2 causal pairs" in text


def test_identical_layers_collapse_to_one_row(tmp_path):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=80, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=96)  # fmt: skip
    meta, _ = _meta(config, tmp_path)
    recipe = {"surgeon": 1, "rules": [{"do": "lora", "select": {"role": "attn.q", "layers": "40:"}}]}
    text = surgeon.patch(meta, recipe).report(seq_len=64).render()
    assert "0–39 (×40)" in text and "40–79 (×40)" in text
    assert "model.layers.{0–79}.self_attn (×80)" in text
    assert text.count("model.layers") < 10


def test_totals_add_up_on_a_stack_of_recipes():
    from test_recipe_library import assert_report_adds_up

    model = tiny_model("bert")
    surgery = surgeon.patch(model, {"surgeon": 1, "base": "trainable", "rules": [
        {"do": "freeze", "select": {"role": "layer", "layers": "0:2"}},
        {"do": "extend_positions", "select": {"role": "embed"}, "with": {"length": 100}},
        {"do": "lora", "select": {"role": ["attn.q", "attn.v"], "layers": "0:2"}, "with": {"r": 2}},
        {"do": "unfreeze", "select": {"role": "layer", "layers": "1"}},
        {"do": "adapter", "select": {"role": "layer", "layers": "-1:"}, "with": {"size": 4}},
    ]})  # fmt: skip
    report = surgery.report().to_dict()
    assert report["base_trainable_params"] > 0  # base: trainable, still owning what no rule touched
    assert_report_adds_up(report, model)
    surgery = surgeon.patch(model, {"surgeon": 1, "base": "trainable", "rules": [
        {"do": "bitfit", "select": {"role": "attn"}}, {"do": "freeze", "select": {"role": "embed"}}]})  # fmt: skip
    assert_report_adds_up(surgery.report().to_dict(), model)


def _meta(config, tmp_path):
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    return build_meta_model(str(tmp_path))
