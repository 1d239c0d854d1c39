"""The shipped recipes: each one runs by name on a tiny model of every family it names, and keeps
what its header promises (outputs unchanged at init, a forward pass, the parts of its report
adding up to the totals)."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner
from conftest import output_of, tiny_inputs, tiny_model

import surgeon
from surgeon import recipe_library
from surgeon.cli import cli
from surgeon.errors import SurgeonError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# recipe -> the tiny families it is meant for (tests/conftest.py)
FAMILIES = {
    "minilm-bitfit": ["bert"],
    "bitfit-bert": ["bert", "roberta", "distilbert"],
    "lora-bert": ["bert", "roberta", "distilbert"],
    "lora-llama": ["llama", "mistral", "qwen2"],
    "lora-gpt2-qv": ["gpt2"],
    "adapters-houlsby": ["bert", "llama"],
    "freeze-lower-layers": ["bert", "llama", "gpt2"],
    "longformer-4096": ["bert", "roberta"],
    "sliding-window-llama": ["llama", "mistral", "qwen2"],
    "linformer-bert": ["bert"],
    "latent-bert": ["bert"],
    "lsh-bert": ["bert", "roberta"],
}
# these replace attention by an approximation at once (their headers say so): outputs change
CHANGES_OUTPUTS = {"linformer-bert", "latent-bert"}
# these make nothing trainable (their headers say what to combine them with)
TRAINS_NOTHING = {"sliding-window-llama", "lsh-bert"}
CASES = [(name, family) for name, families in FAMILIES.items() for family in families]


def test_every_shipped_recipe_is_tested_and_documented():
    assert sorted(FAMILIES) == recipe_library.names()
    for name in recipe_library.names():
        with open(recipe_library.path_of(name), encoding="utf-8") as handle:
            text = handle.read()
        header = text.split("surgeon: 1")[0]
        assert f"surgeon apply recipes:{name}" in header, name  # the exact command that runs it
        assert "Knobs:" in header, name
        assert surgeon.load_recipe(f"recipes:{name}").description, name


def test_repository_recipes_dir_is_the_package_library():
    # recipes/ in the repository points at surgeon/recipes (no second copy to drift)
    assert os.path.samefile(os.path.join(ROOT, "recipes"), recipe_library.LIBRARY_DIR)


@pytest.mark.parametrize("name,family", CASES)
def test_shipped_recipe_on_tiny_family(name, family):
    reference = tiny_model(family)
    model = tiny_model(family)
    inputs = tiny_inputs(family)
    surgery = surgeon.patch(model, f"recipes:{name}")
    out = output_of(model, inputs)
    assert torch.isfinite(out).all()
    if name in CHANGES_OUTPUTS:
        assert not torch.allclose(out, output_of(reference, inputs), atol=1e-4)
    else:
        torch.testing.assert_close(out, output_of(reference, inputs), atol=1e-5, rtol=1e-5)
    report = surgery.report(seq_len=16).to_dict()
    if name in TRAINS_NOTHING:
        assert report["trainable_params"] == 0
    else:
        assert report["trainable_params"] > 0
    assert_report_adds_up(report, model)


def assert_report_adds_up(report: dict, model) -> None:
    """Every total is the sum of its parts: rules, layers, trainable and added splits, the live model."""
    live = dict(model.named_parameters())
    assert report["model_params"] == sum(p.numel() for p in live.values())
    assert report["total_params"] + report["added_params"] == report["model_params"]
    assert report["trainable_params"] == sum(p.numel() for p in live.values() if p.requires_grad)
    assert report["trainable_base_params"] + report["added_trainable_params"] == report["trainable_params"]
    assert report["added_trainable_params"] + report["added_frozen_params"] == report["added_params"]
    rules = report["rules"]
    assert (
        sum(r["trainable_params"] for r in rules) + report["base_trainable_params"]
        == report["trainable_params"]
    )
    assert sum(r["added_params"] for r in rules) == report["added_params"]
    layers = report["layers"] + [report["outside_layers"]]
    assert sum(r["params"] for r in layers) == report["total_params"]
    assert sum(r["added_params"] for r in layers) == report["added_params"]
    assert sum(r["trainable_params"] for r in layers) == report["trainable_params"]


def test_longformer_counts_new_position_rows_as_added_everywhere():
    model = tiny_model("bert")  # 64 positions
    report = surgeon.patch(model, "recipes:longformer-4096").report().to_dict()
    growth = (4096 - 64) * 32
    assert report["added_params"] == growth
    assert report["added_trainable_params"] == growth  # the recipe unfreezes the table
    assert report["rules"][0]["added_params"] == growth  # extend_positions
    assert report["rules"][2]["trainable_params"] == 4096 * 32  # unfreeze: the whole table, counted once
    assert report["outside_layers"]["added_params"] == growth


def test_new_position_rows_stay_frozen_unless_unfrozen():
    model = tiny_model("bert")
    extend = {"do": "extend_positions", "select": {"role": "embed"}, "with": {"length": 128}}
    recipe = {"surgeon": 1, "rules": [extend, {"do": "bitfit", "select": {"role": "model"}}]}
    report = surgeon.patch(model, recipe).report().to_dict()
    assert report["added_params"] == report["added_frozen_params"] == (128 - 64) * 32
    assert report["added_trainable_params"] == 0
    assert_report_adds_up(report, model)


def test_load_recipe_by_name_and_did_you_mean():
    recipe = surgeon.load_recipe("recipes:longformer-4096")
    assert recipe.source == os.path.join(recipe_library.LIBRARY_DIR, "longformer-4096.yaml")
    with pytest.raises(SurgeonError, match=r"did you mean recipes:longformer-4096\?"):
        surgeon.load_recipe("recipes:longformer-4069")
    with pytest.raises(SurgeonError, match=r"not found \(the shipped recipe is recipes:lora-llama\)"):
        surgeon.load_recipe("lora-llama.yaml")


def test_cli_lists_and_prints_recipes():
    runner = CliRunner()
    result = runner.invoke(cli, ["recipes"])
    assert result.exit_code == 0, result.output
    for name in recipe_library.names():
        assert f"recipes:{name}" in result.output
    assert "Longformer conversion" in result.output
    result = runner.invoke(cli, ["recipes", "lsh-bert"])
    assert result.exit_code == 0 and result.output.startswith("# Reformer LSH attention")
    result = runner.invoke(cli, ["recipes", "lsh-bret"])
    assert result.exit_code == 2 and "did you mean recipes:lsh-bert" in result.output


def test_cli_dry_run_by_name(tiny_model_dir):
    result = CliRunner().invoke(cli, ["apply", "recipes:lora-llama", tiny_model_dir("llama"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "rule 1" in result.output and "lora: 21 modules" in result.output


MINILM_RECIPES = [n for n, families in FAMILIES.items() if "bert" in families]


@pytest.mark.parametrize("name", MINILM_RECIPES)
def test_bert_family_recipes_on_the_real_minilm_config(name, minilm_dir):
    """The recipes that default to the packaged MiniLM plan and add up on it (meta device: config only)."""
    recipe = surgeon.load_recipe(f"recipes:{name}")
    assert os.path.samefile(recipe.default_model_dir(), minilm_dir)
    meta, _ = surgeon.build_meta_model(minilm_dir)
    report = surgeon.patch(meta, recipe).report(seq_len=512).to_dict()
    assert report["total_params"] == 22_713_216
    assert_report_adds_up(report, meta)


def test_longformer_recipe_end_to_end_on_minilm(tmp_path, minilm_dir):
    """The README's Longformer job: apply by name, then verify at the full 4,096 tokens."""
    runner = CliRunner()
    out = str(tmp_path / "longformer")
    result = runner.invoke(cli, ["apply", "recipes:longformer-4096", "-o", out])
    assert result.exit_code == 0, result.output
    assert "1,376,256" in result.output  # (4096 - 512) x 384 new position rows, added and trainable
    result = runner.invoke(cli, ["verify", out, "--seq-len", "4096"])
    assert result.exit_code == 0, result.output
    assert "forward output (1, 4096, 384) finite" in result.output
