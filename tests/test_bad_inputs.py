"""Every bad input is one line, exit 2, no traceback: a regression test for each escape found
(issue 19 §3) — YAML bombs, tags, control characters and nesting in recipes; malformed
config.json for report / --dry-run / roles; wrong JSON types in manifests; a shard storing what
its index does not list; an adapter_config.json whose values PEFT's truthiness would misread."""

from __future__ import annotations

import json
import os

import pytest
import transformers
from click.testing import CliRunner
from conftest import tiny_model

import surgeon
from surgeon.checkpoint import INDEX, inspect_checkpoint, read_config
from surgeon.cli import cli
from surgeon.errors import CheckpointError, RecipeError, SurgeonError

GOOD_RULES = "rules:\n  - do: bitfit\n    select: {role: model}\n"


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_refused(result, *fragments: str, lines: int = 1) -> None:
    """Exit 2, exactly `lines` error lines, each `surgeon: error: …`, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, repr(result.exception))
    errors = result.stderr.splitlines()
    errors = [line for line in errors if not line.startswith("surgeon: warning:")]
    assert len(errors) == lines and all(line.startswith("surgeon: error: ") for line in errors), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("bad-inputs") / "bert")
    tiny_model("bert").save_pretrained(directory)
    return directory


def write(tmp_path, text: str, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- recipes -----------------------------------------------------------------------------
def alias_bomb(levels: int) -> str:
    """The 'billion laughs': each level repeats the one before nine times (413 bytes at 9 levels
    took 71 s and 2.5 GB before aliases were refused; one level more exhausted memory)."""
    lines = ["surgeon: 1", 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n" + GOOD_RULES


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        (alias_bomb(10), 2, "anchors and aliases"),
        ("surgeon: 1\nloop: &x [*x]\n" + GOOD_RULES, 2, "anchors and aliases"),
        ("surgeon: 1\nrules:\n  - &rule {do: bitfit, select: {role: model}}\n  - *rule\n", 3, "anchors and aliases"),
        ("surgeon: !!float abc\n" + GOOD_RULES, 1, "YAML tags (tag:yaml.org,2002:float)"),
        ("surgeon: 1\nblob: !!binary aGVsbG8=\n" + GOOD_RULES, 2, "YAML tags"),
        ("surgeon: 1\nx: !!python/object/apply:os.system [echo hi]\n" + GOOD_RULES, 2, "YAML tags"),
        ("surgeon: 1\nx: !custom 3\n" + GOOD_RULES, 2, "YAML tags (!custom)"),
        ("surgeon: 1\ndescription: 'a\x01b'\n" + GOOD_RULES, 2, "control character #x01"),
        ("surgeon: 1\n" + GOOD_RULES + "# \x1b[31m red\n", 5, "control character #x1b"),
        ("surgeon: 1\nx: " + "[" * 5000 + "]" * 5000 + "\n" + GOOD_RULES, 2, "nested deeper than 32 levels"),
        ("surgeon: 1\nx: " + "{a: " * 40 + "1" + "}" * 40 + "\n" + GOOD_RULES, 2, "nested deeper than 32 levels"),
        ("surgeon: 1\n" + GOOD_RULES + "    with: {r: " + "9" * 5000 + "}\n", 5, "Exceeds the limit"),
    ],
    ids=["alias-bomb", "self-alias", "alias-rule", "tag-float", "tag-binary", "tag-python", "tag-local", "ctrl-value",
         "ctrl-comment", "deep-flow-list", "deep-mapping", "int-digits"],
)  # fmt: skip
def test_bad_recipe_yaml_is_one_located_line(text, line, fragment, tmp_path, bert_dir):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as refused:
        surgeon.load_recipe(path)
    assert refused.value.problems[0].startswith(f"{path}:{line}:"), refused.value.problems
    assert fragment in str(refused.value)
    assert_refused(invoke("apply", path, bert_dir, "--dry-run"), fragment)


def test_recipe_size_is_bounded(tmp_path):
    path = write(tmp_path, "surgeon: 1\n" + "# padding\n" * 120_000 + GOOD_RULES)
    with pytest.raises(SurgeonError, match="more than 1048576 characters"):
        surgeon.load_recipe(path)
    with pytest.raises(SurgeonError, match="more than 1048576 characters"):
        surgeon.load_recipe("/dev/zero")  # endless input is read up to the bound, not to memory's end


# ---- config.json: report, apply --dry-run, roles, apply ----------------------------------------
def bert_config(**changes) -> dict:
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                     vocab_size=96, max_position_embeddings=64).to_dict()  # fmt: skip
    config["architectures"] = ["BertModel"]
    config.update(changes)
    return config


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"hidden_size": -32}, "negative dimension"),
        ({"vocab_size": -1}, "negative dimension"),
        ({"num_attention_heads": 5}, "not a multiple of the number of attention heads"),
        ({"num_attention_heads": 0}, "cannot build BertModel"),
        ({"architectures": ["BertConfig"]}, "'BertConfig' is not a transformers model class"),
        ({"architectures": ["pipeline"]}, "'pipeline' is not a transformers model class"),
        ({"architectures": "BertModel"}, "architectures must be a list of class names"),
        ({"model_type": 5}, "model_type must be a string"),
        ({"model_type": "no-such-type"}, "does not recognize this architecture"),
        ({"vocab_size": "96"}, "vocab_size"),
        ({"layer_norm_eps": None}, "layer_norm_eps"),
        ({"hidden_act": "no-such-activation"}, "cannot build BertModel"),
        ({"intermediate_size": 2**70}, "cannot build BertModel"),
        ({"num_hidden_layers": 10**5}, "num_hidden_layers: 100000 layers is more than surgeon builds (at most 1024)"),
        ({"max_position_embeddings": 10**10}, "positions is more than surgeon builds"),
        ({"text_config": {"num_layers": 5000}}, "text_config.num_layers"),
    ],
)  # fmt: skip
def test_malformed_config_is_one_line_for_every_command_that_reads_it(changes, fragment, tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(bert_config(**changes)))
    recipe = write(tmp_path, "surgeon: 1\n" + GOOD_RULES)
    for args in (["report", str(model_dir)], ["apply", recipe, str(model_dir), "--dry-run"], ["roles", str(model_dir)]):
        assert_refused(invoke(*args), "config.json", fragment)


def test_inspection_commands_allocate_no_buffers(bert_dir):
    # report / --dry-run / roles build buffers (position ids, some models' n×n masks) on the meta device
    model, _ = surgeon.build_meta_model(bert_dir, real_buffers=False)
    assert all(buffer.is_meta for buffer in model.buffers())
    model, _ = surgeon.build_meta_model(bert_dir)
    assert not all(buffer.is_meta for buffer in model.buffers())  # export's default: real buffers


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"model_type": ' + "1" * 5000 + "}", "[1, 2]", "\xff"])
def test_config_json_that_is_not_a_config(text, tmp_path):
    (tmp_path / "config.json").write_bytes(text.encode("latin-1") if text == "\xff" else text.encode())
    with pytest.raises(CheckpointError, match="config.json"):
        read_config(str(tmp_path))
    assert_refused(invoke("report", str(tmp_path)), "config.json")


# ---- manifest.json ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bitfit_diff(bert_dir, tmp_path_factory):
    model, _ = surgeon.load_model(bert_dir)
    surgeon.patch(model, {"surgeon": 1, "rules": [{"do": "bitfit", "select": {"role": "model"}}]})
    out = str(tmp_path_factory.mktemp("bad-inputs") / "diff")
    surgeon.save_diff(model, out, base_dir=bert_dir)
    return out


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda m: ["not", "an", "object"], "not a surgeon diff manifest"),
        (lambda m: {**m, "base": []}, "base: Input should be a valid dictionary"),
        (lambda m: {**m, "base": {**m["base"], "tensors": ["x"]}}, "base.tensors: Input should be a valid dictionary"),
        (lambda m: {**m, "base": {**m["base"], "path": 7}}, "base.path: Input should be a valid string"),
        (lambda m: {**m, "tensors": {"pooler.dense.bias": {**m["tensors"]["pooler.dense.bias"], "shape": "32"}}},
         "tensors.pooler.dense.bias.shape: Input should be a valid list"),
        (lambda m: {**m, "rules": {"do": "bitfit"}}, "rules: Input should be a valid list"),
        (lambda m: {**m, "rules": [{"do": "bitfit", "with": 3}]}, "rules[0].with: Input should be a valid dictionary"),
        (lambda m: {**m, "format_version": "2"}, "format_version: Input should be a valid integer"),
        (lambda m: {**m, "diff_header_sha256": "00"}, "diff_header_sha256: String should match pattern"),
        (lambda m: {k: v for k, v in m.items() if k != "tensors"}, "tensors: required field is missing"),
    ],
)  # fmt: skip
def test_manifest_with_wrong_json_types_is_one_line(edit, fragment, bitfit_diff, bert_dir):
    path = os.path.join(bitfit_diff, "manifest.json")
    pristine = open(path).read()
    try:
        with open(path, "w") as handle:
            json.dump(edit(json.loads(pristine)), handle)
        with pytest.raises(CheckpointError, match="manifest.json"):
            surgeon.diff.read_manifest(bitfit_diff)
        assert_refused(invoke("verify", bitfit_diff, "--base", bert_dir), "manifest.json", fragment)
    finally:
        with open(path, "w") as handle:
            handle.write(pristine)
    assert invoke("verify", bitfit_diff, "--base", bert_dir).exit_code == 0


# ---- shard index --------------------------------------------------------------------------------
def test_a_shard_storing_a_tensor_its_index_does_not_place_there_is_refused(tmp_path):
    base = str(tmp_path / "base")
    tiny_model("llama").save_pretrained(base, max_shard_size="20KB")
    index_path = os.path.join(base, INDEX)
    index = json.load(open(index_path))
    shards = sorted(index["weight_map"].values())
    shard = max(shards, key=shards.count)  # a shard the index still names once this entry is gone
    name = min(k for k, v in index["weight_map"].items() if v == shard)
    moved = dict(index, weight_map={k: v for k, v in index["weight_map"].items() if k != name})
    json.dump(moved, open(index_path, "w"))  # export once failed on this with a KeyError
    with pytest.raises(CheckpointError, match=rf"shard {shard} stores tensor {name}, but the index does not list it"):
        inspect_checkpoint(base)
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    json.dump(dict(index, weight_map={**index["weight_map"], name: other}), open(index_path, "w"))
    with pytest.raises(CheckpointError, match=rf"stores tensor {name}, but the index lists it in {other}"):
        inspect_checkpoint(base)
    recipe = write(tmp_path, "surgeon: 1\n" + GOOD_RULES)
    assert_refused(invoke("apply", recipe, base, "-o", str(tmp_path / "out")), "the index lists it in")


# ---- adapter_config.json ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft_dir(bert_dir, tmp_path_factory):
    from surgeon.peft_io import export_peft

    model, _ = surgeon.load_model(bert_dir)
    surgeon.patch(model, {"surgeon": 1, "rules": [{"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 2}}]})
    root = tmp_path_factory.mktemp("bad-inputs-peft")
    surgeon.save_diff(model, str(root / "diff"), base_dir=bert_dir)
    export_peft(str(root / "diff"), str(root / "peft"))
    return str(root / "peft")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"use_rslora": "no"}, "use_rslora: Input should be a valid boolean (got 'no')"),
        ({"lora_alpha": "16"}, "lora_alpha: Input should be a valid number (got '16')"),
        ({"lora_alpha": float("inf")}, "lora_alpha: Input should be a finite number"),
        ({"lora_alpha": -4}, "lora_alpha: Input should be greater than 0"),
        ({"alpha_pattern": {"query(": 4}}, "alpha_pattern: key 'query(' is not a regular expression"),
        ({"alpha_pattern": {"query": "4"}}, "alpha_pattern.query: Input should be a valid number"),
        ({"rank_pattern": [2]}, "rank_pattern: Input should be a valid dictionary"),
        ({"lora_dropout": 1.5}, "lora_dropout: Input should be less than 1"),
    ],
)  # fmt: skip
def test_adapter_config_values_are_typed(changes, fragment, peft_dir, bert_dir, tmp_path):
    path = os.path.join(peft_dir, "adapter_config.json")
    pristine = open(path).read()
    try:
        with open(path, "w") as handle:
            json.dump({**json.loads(pristine), **changes}, handle)  # json writes inf as Infinity, as Python reads it
        out = str(tmp_path / "imported")
        assert_refused(invoke("import-peft", peft_dir, "-o", out, "--base", bert_dir), "adapter_config.json", fragment)
        assert not os.path.exists(out)
    finally:
        with open(path, "w") as handle:
            handle.write(pristine)
