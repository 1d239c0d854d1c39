"""One model-path resolver for recipes, the CLI and the Python API; `package:` never runs code."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import output_of, tiny_inputs, tiny_model

import surgeon
from surgeon.cli import cli
from surgeon.errors import SurgeonError
from surgeon.modelpath import resolve_model_path

TRAP = "raise SystemExit('package code ran: a model path must not import it')\n"


@pytest.fixture
def packaged_model(tmp_path, monkeypatch):
    """An importable package whose code must never run, holding a tiny BERT in pkg/sub/model and
    pkg/model; returns the package name."""
    name = f"surgeon_test_pkg_{os.getpid()}"
    root = tmp_path / "site" / name
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text(TRAP)
    (root / "sub" / "__init__.py").write_text(TRAP)
    tiny_model("bert").save_pretrained(root / "model")
    tiny_model("bert").save_pretrained(root / "sub" / "model")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    yield name
    assert name not in sys.modules and f"{name}.sub" not in sys.modules


def test_plain_paths_pass_through():
    assert resolve_model_path("a/b") == "a/b"
    assert resolve_model_path("a/b", relative_to="/r") == os.path.join("/r", "a/b")
    assert resolve_model_path("/abs", relative_to="/r") == "/abs"


def test_package_forms_resolve_without_importing(packaged_model, tmp_path):
    site = tmp_path / "site" / packaged_model
    assert resolve_model_path(f"package:{packaged_model}/model") == str(site / "model")
    assert resolve_model_path(f"package:{packaged_model}.sub/model") == str(site / "sub" / "model")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("package:no_such_package_xyz/model", "package 'no_such_package_xyz' is not installed"),
        ("package:/model", "expected 'package:<python package>/<subdir>'"),
        ("package:os.path/x", "'os' is a module, not a package directory"),
        ("package:bad-name/x", "expected 'package:"),
    ],
)  # fmt: skip
def test_package_form_errors(spec, message):
    with pytest.raises(SurgeonError, match=message):
        resolve_model_path(spec)


def test_python_api_and_recipes_accept_package_form(packaged_model, tmp_path):
    model, _ = surgeon.load_model(f"package:{packaged_model}.sub/model")
    inputs = tiny_inputs("bert")
    torch.testing.assert_close(output_of(model, inputs), output_of(tiny_model("bert"), inputs))
    meta, _ = surgeon.build_meta_model(f"package:{packaged_model}/model")
    assert all(p.is_meta for p in meta.parameters())
    recipe = surgeon.load_recipe({"surgeon": 1, "model": f"package:{packaged_model}/model",
                                  "rules": [{"do": "bitfit", "select": {"role": "model"}}]})  # fmt: skip
    assert recipe.default_model_dir() == str(tmp_path / "site" / packaged_model / "model")
    surgeon.patch(model, recipe)
    surgeon.save_diff(model, str(tmp_path / "diff"), base_dir=f"package:{packaged_model}.sub/model")
    loaded = surgeon.load(f"package:{packaged_model}.sub/model", str(tmp_path / "diff"))
    torch.testing.assert_close(output_of(loaded, inputs), output_of(model, inputs))


def test_cli_accepts_package_form_even_in_dry_run(packaged_model, tmp_path):
    runner = CliRunner()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"surgeon: 1\nmodel: package:{packaged_model}.sub/model\n"
                      "rules:\n  - do: bitfit\n    select: {role: model}\n")  # fmt: skip
    result = runner.invoke(cli, ["apply", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["roles", f"package:{packaged_model}/model"])
    assert result.exit_code == 0 and "encoder.layer" in result.output, result.output
    result = runner.invoke(cli, ["report", "package:no_such_package_xyz/m"])
    assert result.exit_code == 2 and "package 'no_such_package_xyz' is not installed" in result.output
