"""Action parameters are checked when the recipe is validated, before any model loads: a bad
value is one line with file:line, the field and the limit; what depends on the model is
checked per target and printed once per rule with a count of the other modules."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import output_of, tiny_inputs, tiny_model

import surgeon
from surgeon.actions import limits
from surgeon.attention import interface
from surgeon.errors import RecipeError, SurgeonError


def recipe_text(do: str, with_yaml: str, select: str = "{role: attn}") -> str:
    return f"surgeon: 1\nrules:\n  - do: {do}\n    select: {select}\n    with: {with_yaml}\n"


# (action, `with:` as written in YAML, a fragment of the one-line message)
BAD = [
    ("sliding_window", "{window: 0}", "with.window: must be ≥ 1 (got 0)"),
    ("sliding_window", "{window: 100000000000000000000}", "exceeds the limit of 16,777,216 (2**24 positions"),
    ("sliding_window", "{window: [4, 0, 4]}", "with.window[1]: must be ≥ 1 (got 0)"),
    ("sliding_window", "{window: {start: 0, end: 64}}", "with.window.start: must be ≥ 1 (got 0)"),
    ("sliding_window", "{window: 4, dilation: 0}", "with.dilation: must be ≥ 1 (got 0)"),
    ("sliding_window", "{window: 4, dilation: []}", "with.dilation: List should have at least 1 item"),
    ("sliding_window", "{window: 4, dilation: 100000000000000000000}", "exceeds the limit of 16,777,216"),
    ("sliding_window", "{window: 4, global_tokens: [-1]}", "with.global_tokens[0]: must be ≥ 0 (got -1)"),
    ("sliding_window", "{window: 4, global_tokens: [16777216]}", "exceeds the limit of 16,777,215"),
    ("sliding_window", "{window: 4, block_size: 0}", "with.block_size: must be ≥ 1 (got 0)"),
    ("blockwise", "{block_size: 0}", "with.block_size: must be ≥ 1 (got 0)"),
    ("blockwise", "{block_size: 100000000000000000000}", "exceeds the limit of 16,777,216"),
    ("blockwise", "{block_size: 4, permutations: 0}", "with.permutations: must be ≥ 1 (got 0)"),
    ("blockwise", "{block_size: 4, permutations: 100000}", "exceeds the limit of 65,536 (2**16"),
    ("blockwise", "{block_size: 4, permutations: [[0, 1], [1, 1]]}", "[1, 1] is not a permutation of 0 … 1"),
    ("blockwise", "{block_size: 4, permutations: [[0, 1], [0, 1, 2]]}", "different lengths (2 and 3)"),
    ("linformer", "{k: 0}", "with.k: must be ≥ 1 (got 0)"),
    ("linformer", "{k: 100000000000000000000}", "with.k: 100,000,000,000,000,000,000 exceeds the limit of 16,777,216"),
    ("linformer", "{k: 8, max_length: 0}", "with.max_length: must be ≥ 1 (got 0)"),
    ("linformer", "{k: 65, max_length: 64}", "with: k=65 exceeds max_length=64"),
    ("linformer", "{k: 65536, max_length: 65536}", "65,536 × 65,536 = 4,294,967,296 elements, over the limit of 2**31"),
    ("linformer", "{k: 8, seed: 18446744073709551616}", "exceeds the limit of 9,223,372,036,854,775,807"),
    ("linformer", "{k: 8, seed: -1}", "with.seed: must be ≥ 0 (got -1)"),
    ("linformer", "{k: 8, local_window: -2}", "with.local_window: must be ≥ 0 (got -2)"),
    ("latent", "{m: 0}", "with.m: must be ≥ 1 (got 0)"),
    ("latent", "{m: 100000000000000000000}", "exceeds the limit of 16,777,216"),
    ("latent", "{m: 4, local_window: -1}", "with.local_window: must be ≥ 0 (got -1)"),
    ("latent", "{m: 4, seed: 100000000000000000000}", "with.seed: 100,000,000,000,000,000,000 exceeds the limit"),
    ("lsh", "{n_hashes: 0}", "with.n_hashes: must be ≥ 1 (got 0)"),
    ("lsh", "{n_hashes: 100000000000000000000}", "exceeds the limit of 256 (256 rounds"),
    ("lsh", "{bucket_size: -4}", "with.bucket_size: must be ≥ 1 (got -4)"),
    ("lsh", "{bucket_size: 100000000000000000000}", "exceeds the limit of 16,777,216"),
    ("lsh", "{seed: 100000000000000000000}", "exceeds the limit of 9,223,372,036,854,775,807"),
    ("lora", "{r: 0}", "with.r: must be ≥ 1 (got 0)"),
    ("lora", "{r: 100000000000000000000}", "exceeds the limit of 16,777,216 (2**24, wider than any weight"),
    ("lora", "{alpha: .inf}", "with.alpha: alpha must be finite (got inf)"),
    ("lora", "{alpha: .nan}", "with.alpha: alpha must be finite (got nan)"),
    ("lora", "{alpha: -1}", "with.alpha: alpha must be > 0 (got -1"),
    ("lora", "{r: 1, alpha: 1.0e+6}", "with: alpha/r = 1e+06 overflows float16 (largest value 65504)"),
    ("lora", "{r: 4, alpha: 1.0e+6, rslora: true}", "with: alpha/sqrt(r) = 500000 overflows float16"),
    ("lora", "{r: 8, alpha: 1.0e-9}", "underflows float16"),
    ("lora", "{dropout: 1.0}", "with.dropout: dropout must be in [0, 1)"),
    ("adapter", "{size: 0}", "with.size: must be ≥ 1 (got 0)"),
    ("adapter", "{reduction_factor: -1}", "with.reduction_factor: must be ≥ 1 (got -1)"),
    ("adapter", "{size: 100000000000000000000}", "exceeds the limit of 16,777,216"),
    ("extend_positions", "{length: 0}", "with.length: must be ≥ 1 (got 0)"),
    ("extend_positions", "{length: 33554432}", "33,554,432 exceeds the limit of 16,777,216"),
]  # fmt: skip


@pytest.mark.parametrize("do,with_yaml,fragment", BAD, ids=[f"{d}-{w}" for d, w, _ in BAD])
def test_bad_value_is_one_line_at_validation(tmp_path, do, with_yaml, fragment):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(do, with_yaml))
    with pytest.raises(RecipeError) as info:
        surgeon.load_recipe(str(path))  # no model anywhere
    assert len(info.value.problems) == 1, info.value.problems
    line = info.value.problems[0]
    assert line.startswith(f"{path}:5: rules[0].with"), line
    assert fragment in line, line


@pytest.mark.parametrize("do,with_yaml", [
    ("sliding_window", f"{{window: {limits.MAX_POSITIONS}, dilation: [{limits.MAX_POSITIONS}, 1]}}"),
    ("sliding_window", f"{{window: {{start: 2, end: {limits.MAX_POSITIONS}}}, global_tokens: [{limits.MAX_POSITIONS - 1}]}}"),
    ("blockwise", f"{{block_size: {limits.MAX_POSITIONS}, permutations: {limits.MAX_HEAD_GROUPS}}}"),
    ("linformer", f"{{k: {2**15}, max_length: {2**16}, seed: {limits.MAX_SEED}, local_window: {limits.MAX_POSITIONS}}}"),
    ("latent", f"{{m: {limits.MAX_POSITIONS}, seed: {limits.MAX_SEED}}}"),
    ("lsh", f"{{n_hashes: {limits.MAX_HASH_ROUNDS}, bucket_size: {limits.MAX_POSITIONS}, seed: {limits.MAX_SEED}}}"),
    ("lora", f"{{r: {limits.MAX_WIDTH}, alpha: {65504 * limits.MAX_WIDTH}}}"),
    ("adapter", f"{{size: {limits.MAX_WIDTH}}}"),
    ("extend_positions", f"{{length: {limits.MAX_POSITIONS}}}"),
])  # fmt: skip
def test_values_at_the_limits_are_accepted(tmp_path, do, with_yaml):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text(do, with_yaml))
    surgeon.load_recipe(str(path))


def recipe(do, select=None, **params):
    return {"surgeon": 1, "rules": [{"do": do, "select": select or {"role": "attn"}, "with": params}]}


def test_a_window_of_2_to_the_24_covers_the_input_exactly():
    model, dense = tiny_model("bert"), tiny_model("bert")
    inputs = tiny_inputs("bert", seq=20)
    surgeon.patch(model, recipe("sliding_window", window=limits.MAX_POSITIONS))
    torch.testing.assert_close(output_of(model, inputs), output_of(dense, inputs), rtol=1e-5, atol=1e-5)


def test_largest_seeds_are_usable():
    inputs = tiny_inputs("bert", seq=20)
    for rule in (recipe("lsh", seed=limits.MAX_SEED, bucket_size=4),
                 recipe("latent", m=4, seed=limits.MAX_SEED),  # layer i uses seed + i: past 2**63, inside 2**64
                 recipe("linformer", k=8, init="random", seed=limits.MAX_SEED)):  # fmt: skip
        model = tiny_model("bert")
        surgeon.patch(model, rule)
        assert bool(output_of(model, inputs).isfinite().all())


def test_one_line_per_distinct_problem_with_a_count_of_the_other_modules():
    with pytest.raises(SurgeonError) as info:
        surgeon.patch(tiny_model("bert"), recipe("linformer", k=65))
    lines = str(info.value).splitlines()
    assert lines == [("<dict>: rule 1 (do: linformer): linformer: encoder.layer.0.attention.self: k=65 exceeds "
                      "max_length=64 (the model's positions) (and 2 more layers)")]  # fmt: skip
    # llama: k_proj (32 -> 16) and gate_proj (32 -> 48) fail differently in each of the 3 layers
    with pytest.raises(SurgeonError) as info:
        surgeon.patch(tiny_model("llama"), recipe("lora", {"role": ["attn.k", "mlp.gate"]}, r=40))
    lines = str(info.value).splitlines()
    assert len(lines) == 2, lines
    assert "min(32, 16) of model.layers.0.self_attn.k_proj" in lines[0] and lines[0].endswith("(and 2 more layers)")
    assert "min(32, 48) of model.layers.0.mlp.gate_proj" in lines[1] and lines[1].endswith("(and 2 more layers)")
    # two modules of one layer are "modules", not layers
    with pytest.raises(SurgeonError, match=r"k_proj .*\(and 5 more modules\)$"):
        surgeon.patch(tiny_model("llama"), recipe("lora", {"role": ["attn.k", "attn.v"]}, r=20))


def meta_model(**config):
    config = transformers.BertConfig(num_hidden_layers=2, vocab_size=96, **config)
    with torch.device("meta"):
        return transformers.BertModel(config)


def test_added_tensors_are_sized_before_anything_is_allocated():
    with pytest.raises(SurgeonError, match=r"latents would be 16 × 16,777,216 × 64 = 17,179,869,184 elements, over the "
                                           r"limit of 2\*\*31 .*\(and 1 more layer\)$"):  # fmt: skip
        surgeon.patch(meta_model(hidden_size=1024, num_attention_heads=16), recipe("latent", m=limits.MAX_POSITIONS))
    with pytest.raises(SurgeonError, match=r"embeddings.position_embeddings: the new table would be 4,194,304 × 1,024"):
        surgeon.patch(meta_model(hidden_size=1024, num_attention_heads=16),
                      recipe("extend_positions", {"role": "embed"}, length=2**22))
    with pytest.raises(SurgeonError, match="each projection E, F would be 65,536 × 65,536"):
        surgeon.patch(meta_model(max_position_embeddings=2**16), recipe("linformer", k=2**16))


def test_a_meta_model_gets_meta_variants():
    # a dry run or report of a large but valid setting computes nothing (here 1 GiB in all)
    model = meta_model(hidden_size=64, num_attention_heads=4)
    surgery = surgeon.patch(model, recipe("linformer", k=2**10, max_length=2**16))
    variant = interface.variant_of(model.encoder.layer[0].attention.self)
    assert variant.proj_k.is_meta and variant.proj_v.is_meta
    assert surgery.ledger.added_total == 2 * 2 * 2**10 * 2**16
    model = meta_model(hidden_size=64, num_attention_heads=4)
    surgeon.patch(model, recipe("latent", m=2**20))
    assert interface.variant_of(model.encoder.layer[1].attention.self).latents.is_meta


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "surgeon", *args], capture_output=True, text=True, env=env)


def test_dry_run_refuses_a_huge_value_before_reading_the_model(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text("linformer", "{k: 100000000000000000000}"))
    # the model directory does not exist: the recipe's error comes first, the model is never opened
    result = run_cli("apply", str(path), str(tmp_path / "no-such-model"), "--dry-run")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        (f"surgeon: error: {path}:5: rules[0].with.k: 100,000,000,000,000,000,000 exceeds the limit of 16,777,216 "
         "(2**24 positions, the largest count float32 represents exactly)")
    ]  # fmt: skip


def test_dry_run_of_a_large_valid_value_allocates_nothing(tmp_path, tiny_model_dir):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text("linformer", f"{{k: {2**10}, max_length: {2**16}}}"))
    result = run_cli("apply", str(path), tiny_model_dir("bert"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"added {3 * 2 * 2**10 * 2**16:,}" in result.stdout  # 3 layers × E, F: 1.5 GiB if it were allocated
