"""The CLI end to end: the main job, and every bad input gives one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

RECIPE = textwrap.dedent("""
    surgeon: 1
    rules:
      - do: bitfit
        select: {role: model}
      - do: unfreeze
        select: {role: layer, layers: "-1:"}
""").lstrip()


def run(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "surgeon", *args], capture_output=True, text=True, cwd=cwd, env=env)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    errors = [l for l in result.stderr.splitlines() if l.startswith("surgeon: error:")]
    assert len(errors) >= 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return str(path)


def test_apply_report_verify(recipe, tiny_model_dir, tmp_path):
    base = tiny_model_dir("bert")
    out = tmp_path / "out"
    result = run("apply", recipe, base, "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"total_params", "trainable_params", "added_params", "rules"} <= set(report)
    assert [r["action"] for r in report["rules"]] == ["bitfit", "unfreeze"]
    assert {"action", "matched_modules", "trainable_params", "added_params"} <= set(report["rules"][0])
    assert sorted(os.listdir(out)) == ["diff.safetensors", "manifest.json", "recipe.yaml"]
    result = run("verify", str(out))
    assert result.returncode == 0 and result.stdout.startswith("ok:"), result.stderr
    result = run("report", base, "--recipe", recipe)
    assert result.returncode == 0 and "bitfit" in result.stdout and "trainable" in result.stdout


def test_dry_run_writes_nothing(recipe, tiny_model_dir, tmp_path):
    base = tiny_model_dir("gpt2")
    result = run("apply", recipe, base, "-o", str(tmp_path / "out"), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "rule 1" in result.stdout and "transformer.h.2" in result.stdout
    assert not (tmp_path / "out").exists()


def test_quickstart_recipe_uses_packaged_model(tmp_path, minilm_dir):
    out = tmp_path / "quick"
    result = run("apply", "recipes:minilm-bitfit", "-o", str(out), cwd=str(tmp_path))  # the README's command
    assert result.returncode == 0, result.stderr
    assert "22,713,216" in result.stdout and "3,566,592" in result.stdout
    assert run("verify", str(out)).returncode == 0


BAD_RECIPES = {
    "malformed": ("surgeon: 1\nrules: [\n", "malformed YAML"),
    "unknown action": ("surgeon: 1\nrules:\n  - do: bitfti\n    select: {role: attn}\n", "did you mean 'bitfit'"),
    "unknown key": ("surgeon: 1\nrulez: []\n", "unknown key 'rulez'"),
    "bad slice": ("surgeon: 1\nrules:\n  - do: freeze\n    select: {layers: 'a:b'}\n", "bad layer slice"),
    "empty selector": ("surgeon: 1\nrules:\n  - do: freeze\n    select: {role: xattn}\n", "matched no module"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipes(case, tiny_model_dir, tmp_path):
    text, fragment = BAD_RECIPES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    result = run("apply", str(path), tiny_model_dir("bert"), "-o", str(out))
    assert_one_line_error(result, fragment, "bad.yaml")
    assert not out.exists()


def test_bad_model_dirs(recipe, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("apply", recipe, str(empty), "-o", str(out)), "no config.json")
    base = tiny_model_dir("bert")
    assert_one_line_error(run("apply", recipe, base, "-o", base), "inside the input")
    assert_one_line_error(run("apply", recipe, base, "-o", os.path.join(base, "x")), "inside the input")
    weights = os.path.join(base, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[:-100])
    assert_one_line_error(run("apply", recipe, base, "-o", str(out)), "corrupt or truncated")
    assert not out.exists()


def test_pickle_only(recipe, tmp_path):
    import torch
    from conftest import tiny_model

    base = tmp_path / "pickled"
    base.mkdir()
    model = tiny_model("bert")
    model.config.save_pretrained(base)
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    out = tmp_path / "out"
    assert_one_line_error(run("apply", recipe, str(base), "-o", str(out)), "--allow-pickle")
    assert not out.exists()
    assert run("apply", recipe, str(base), "-o", str(out), "--allow-pickle").returncode == 0


def test_diff_on_a_different_base(recipe, tiny_model_dir, tmp_path):
    base = tiny_model_dir("bert")
    out = tmp_path / "out"
    assert run("apply", recipe, base, "-o", str(out)).returncode == 0
    other = tmp_path / "gpt2"
    from conftest import tiny_model

    tiny_model("gpt2").save_pretrained(other)
    assert_one_line_error(run("verify", str(out), "--base", str(other)), "made on another base")


def test_missing_output_and_model():
    assert_one_line_error(run("apply", "recipes/minilm-bitfit.yaml", "--json"), "needs -o/--out")


USAGE_ERRORS = {
    "missing argument": (["roles"], "surgeon roles: Missing argument 'MODEL_DIR'"),
    "bad option value": (["report", "x", "--seq-len", "0"], "Invalid value for '--seq-len'"),
    "unknown option": (["report", "--jsn"], "Did you mean '--json'?"),
    "unknown command": (["aplly"], "No such command 'aplly'"),
    "missing option": (["export", "d"], "surgeon export: Missing option '-o' / '--out'"),
    "bad choice": (["train", "d", "--data", "x", "-o", "y", "--objective", "foo"], "'foo' is not one of"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_click_usage_errors_are_one_line(case):
    args, fragment = USAGE_ERRORS[case]
    result = run(*args)
    assert_one_line_error(result, fragment)
    assert result.stderr.count("\n") == 1 and result.stdout == "", result.stderr  # no Usage: block


def test_report_without_arguments_says_what_is_missing():
    result = run("report")
    assert_one_line_error(result, "report needs MODEL_DIR")
    assert "recipe names no" not in result.stderr


def test_no_transformers_loading_bar(recipe, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = run("apply", recipe, tiny_model_dir("bert"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "Loading weights" not in result.stderr and "%|" not in result.stderr, result.stderr
    result = run("verify", str(out))
    assert result.returncode == 0 and "Loading weights" not in result.stderr, result.stderr


def test_verify_seq_len(tmp_path, tiny_model_dir):
    base = tiny_model_dir("bert")  # 64 positions
    long = tmp_path / "long.yaml"
    long.write_text("surgeon: 1\nrules:\n  - do: extend_positions\n    select: {role: embed}\n    with: {length: 256}\n"
                    "  - do: sliding_window\n    select: {role: attn}\n    with: {window: 16, global_tokens: [0]}\n")  # fmt: skip
    out = tmp_path / "out"
    assert run("apply", str(long), base, "-o", str(out)).returncode == 0
    result = run("verify", str(out), "--seq-len", "256")
    assert result.returncode == 0 and "forward output (1, 256, 32) finite" in result.stdout, result.stderr
    assert_one_line_error(run("verify", str(out), "--seq-len", "257"), "exceeds the 256 positions")
