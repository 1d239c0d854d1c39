"""Training as a config: TrainConfig's fields drive the YAML file, the CLI's options, the resume
check and the docs; `surgeon train --config` with CLI overrides; one exit code per signal."""

from __future__ import annotations

import os
import re
import signal

import click
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from surgeon.cli import cli
from surgeon.cli_common import friendly
from surgeon.errors import RecipeError, SurgeonError
from surgeon.train import TrainConfig, load_train_config
from surgeon.train.config import field_flags, resume_fields, to_yaml
from trainkit import one_thread  # noqa: F401  (autouse: tiny models run faster on one thread)
from trainkit import BITFIT_ATTN, data_file, make_base, make_diff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--objective", "mlm", "--seq-len", "32", "--batch-size", "2", "--no-progress"]


# ---- the config file ---------------------------------------------------------------------------
def test_yaml_config_loads_with_paths_relative_to_it(tmp_path):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "train.yaml"
    path.write_text("diff_dir: ../d\ndata: [a.txt, /abs/b.txt]\nout_dir: out\nsteps: 50\nlr: 2e-3\n")
    config = load_train_config(str(path))
    assert config.diff_dir == str(tmp_path / "conf" / "../d") and config.out_dir == str(
        tmp_path / "conf" / "out"
    )
    assert config.data == [str(tmp_path / "conf" / "a.txt"), "/abs/b.txt"]
    assert config.steps == 50 and config.lr == 2e-3 and config.source == str(path)
    # the command line wins, key by key; its paths stay relative to the working directory
    config = load_train_config(str(path), {"steps": 7, "data": ["c.txt"]})
    assert config.steps == 7 and config.data == ["c.txt"] and config.lr == 2e-3


def test_yaml_config_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        "diff_dir: d\ndata: [a.txt]\nout_dir: o\nsteps: 0\nseq_lenn: 64\nlr: '1e-3'\nobjective: dstill\n"
    )
    with pytest.raises(RecipeError) as caught:
        load_train_config(str(path))
    problems = caught.value.problems
    assert f"{path}:4: steps (--steps): Input should be greater than or equal to 1 (got 0)" in problems
    assert any(
        p.startswith(f"{path}:5: seq_lenn: unknown key 'seq_lenn' (did you mean 'seq_len'?)")
        for p in problems
    )
    assert any(p.startswith(f"{path}:6: lr (--lr): Input should be a valid number") for p in problems)
    assert any(
        p.startswith(f"{path}:7: objective (--objective): Input should be 'auto', 'distill'")
        for p in problems
    )
    with pytest.raises(
        RecipeError, match=r"command line: batch_size \(--batch-size\): Input should be greater"
    ):
        load_train_config(
            str(path), {"steps": 3, "batch_size": 0, "lr": 1e-3, "objective": "mlm", "seq_len": 9}
        )
    path.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="a training config is a mapping"):
        load_train_config(str(path))
    path.write_text("steps: [1\n")
    with pytest.raises(RecipeError, match=r"train.yaml:\d+:\d+: malformed YAML"):
        load_train_config(str(path))
    with pytest.raises(SurgeonError, match="training config file not found"):
        load_train_config(str(tmp_path / "missing.yaml"))


def test_print_config_round_trips(tmp_path):
    out = CliRunner().invoke(
        cli,
        [
            "train",
            "d",
            "--data",
            "a.txt",
            "b.txt",
            "-o",
            "o",
            "--steps",
            "9",
            "--lr",
            "0.02",
            "--no-progress",
            "--print-config",
        ],
    )
    assert out.exit_code == 0, out.output
    path = tmp_path / "t.yaml"
    path.write_text(out.output)
    config = load_train_config(str(path))
    assert config.steps == 9 and config.lr == 0.02 and config.progress is False
    assert config.data == [os.path.abspath("a.txt"), os.path.abspath("b.txt")]
    assert to_yaml(config) == out.output


# ---- one source of truth: the fields ----------------------------------------------------------------
def test_every_field_has_a_description_an_option_and_docs():
    help_text = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200).output
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as handle:
        docs = handle.read()
    for name, info in TrainConfig.model_fields.items():
        assert info.description and len(info.description) > 20, name
        flag = field_flags(name)[-1]
        assert flag in help_text, (name, flag)
        assert re.search(rf"`{name}`", docs), f"docs/training.md does not document {name}"


def test_resume_compares_exactly_the_fields_marked_same():
    assert set(resume_fields()) == {
        "objective",
        "final",
        "final_weight",
        "attn_weight",
        "layerwise",
        "seq_len",
        "batch_size",
        "lr",
        "warmup",
        "weight_decay",
        "max_grad_norm",
        "seed",
        "dropout",
        "mixed_precision",
        "strategy",
    }
    config = TrainConfig(diff_dir="d", data=["a"], out_dir="o", objective="auto", steps=5)
    identity = config.resume_identity("mlm", "no")
    assert identity["objective"] == "mlm" and identity["mixed_precision"] == "no"  # as resolved
    assert "final" not in identity and "steps" not in identity  # distill-only; may grow


def test_the_package_is_not_callable_the_function_is_named():
    import surgeon.train

    assert not callable(surgeon.train)
    assert surgeon.train_diff is surgeon.train.train_diff and surgeon.TrainConfig is TrainConfig


# ---- the command line ------------------------------------------------------------------------------
def test_cli_data_takes_several_paths_after_one_flag_and_repeats(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    a, b, c = (data_file(tmp_path, name=f"{n}.txt") for n in "abc")
    out = str(tmp_path / "o")
    result = CliRunner().invoke(
        cli, ["train", diff, "--data", a, b, "--steps", "2", "--data", c, "-o", out, *TINY, "--print-config"]
    )
    assert result.exit_code == 0, result.output
    assert load_train_config(_write(tmp_path, result.output)).data == [a, b, c]
    result = CliRunner().invoke(cli, ["train", diff, "--data", a, b, "--steps", "2", "-o", out, *TINY])
    assert result.exit_code == 0, result.output
    assert "trained" in result.output and os.path.isfile(os.path.join(out, "diff.safetensors"))


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "printed.yaml"
    path.write_text(text)
    return str(path)


def test_cli_runs_a_config_file_with_overrides(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    data_file(tmp_path, name="corpus.txt")
    config = tmp_path / "train.yaml"
    config.write_text(
        f"diff_dir: {os.path.basename(diff)}\ndata: [corpus.txt]\nout_dir: trained\nobjective: mlm\n"
        "steps: 50\nseq_len: 32\nbatch_size: 2\nprogress: false\n"
    )
    result = CliRunner().invoke(cli, ["train", "--config", str(config), "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "steps 1–2 (mlm)" in result.output
    assert load_file(os.path.join(tmp_path, "trained", "diff.safetensors"))
    # the config file is an input like the data: --force into its directory is refused
    result = CliRunner().invoke(
        cli, ["train", "--config", str(config), "--steps", "2", "-o", str(tmp_path), "--force"]
    )
    assert result.exit_code == 2 and "contains the input" in result.output and config.exists()


def test_cli_errors_are_one_located_line(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--data", "a.txt", "-o", "o", "--steps", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line]
    assert "surgeon: error: train: diff_dir (DIFF_DIR): required key is missing" in lines
    assert (
        "surgeon: error: train: steps (--steps): Input should be greater than or equal to 1 (got 0)" in lines
    )


def test_cli_reports_the_objective_auto_chose(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    result = CliRunner().invoke(
        cli,
        [
            "train",
            diff,
            "--data",
            data_file(tmp_path),
            "--steps",
            "1",
            "-o",
            str(tmp_path / "o"),
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "surgeon: train: objective mlm (auto: the diff replaces no attention" in result.output


# ---- signals: one exit code for every command ---------------------------------------------------------
@pytest.mark.parametrize("how,code,name", [("keyboard", 130, "SIGINT"), ("sigterm", 143, "SIGTERM")])
def test_interrupted_commands_exit_128_plus_the_signal(how, code, name):
    @click.command()
    @friendly
    def slow():
        if how == "keyboard":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # friendly turns it into a clean stop

    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(slow, [])
    assert result.exit_code == code
    assert f"surgeon: error: interrupted by {name}; nothing was written" in result.output
    assert signal.getsignal(signal.SIGTERM) is before  # restored
