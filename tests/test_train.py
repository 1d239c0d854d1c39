"""`surgeon train`: objectives, resume, interruption, DDP, and training under plain HF/accelerate.

Tiny random models with tiny real tokenizers (character vocab for BERT, byte-level BPE for GPT-2
and Llama), trained on a short text repeated, so every run takes seconds on 2 cores.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file

import surgeon
from surgeon.cli import cli
from surgeon.errors import SurgeonError
from surgeon.train import TrainingInterrupted, train_diff
from trainkit import one_thread  # noqa: F401  (autouse: tiny models run faster on one thread)
from trainkit import BITFIT_ATTN, FAST, TEXT, data_file, make_base, make_diff, step_dirs


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _mean(values):
    return sum(values) / len(values)


# ---- objectives ---------------------------------------------------------------------------
@pytest.mark.parametrize("family,objective", [("bert", "mlm"), ("gpt2", "clm"), ("llama", "clm")])
def test_loss_goes_down_on_repeated_text(tmp_path, family, objective):
    base = make_base(tmp_path / "base", family)
    diff = make_diff(base, str(tmp_path / "d"), [{"do": "unfreeze", "select": {"role": "layer"}}], base_mode="trainable")
    result = train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / "out"), objective=objective,
                   steps=40, lr=1e-2, **FAST)  # fmt: skip
    assert len(result.losses) == 40
    assert _mean(result.losses[-5:]) < 0.8 * _mean(result.losses[:5]), result.losses
    surgeon.load(base, str(tmp_path / "out"))  # the output is a valid diff of the same base


def test_only_trainable_tensors_change(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    before = _params(surgeon.load(base, diff))
    # the public API, from the top-level package
    result = surgeon.train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / "out"), objective="mlm", steps=5,
                   lr=1e-2, **FAST)  # fmt: skip
    after = _params(result.model)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all(".attention.self." in n and n.endswith("bias") for n in trainable)
    for name in before:
        if name in trainable:
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name
    stored = load_file(os.path.join(tmp_path / "out", "diff.safetensors"))
    assert set(stored) == trainable
    for name, tensor in stored.items():
        assert torch.equal(tensor, after[name])


def test_mlm_on_headless_model_uses_scaffold_head_not_saved(tmp_path):
    base = make_base(tmp_path / "base", "bert-headless")
    diff = make_diff(base, str(tmp_path / "d"), [{"do": "unfreeze", "select": {"role": "layer"}}])
    result = train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / "out"), objective="mlm", steps=30,
                   lr=3e-3, **FAST)  # fmt: skip
    assert _mean(result.losses[-5:]) < _mean(result.losses[:5])
    stored = load_file(os.path.join(tmp_path / "out", "diff.safetensors"))
    assert stored and all(name.startswith("encoder.layer.") for name in stored)
    assert isinstance(surgeon.load(base, str(tmp_path / "out")), transformers.BertModel)


@pytest.mark.parametrize("final,attn_weight", [("hidden", 1.0), ("pooled", 0.0), ("logits", 0.5)])
def test_distill_pulls_student_back_to_teacher(tmp_path, final, attn_weight):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN, perturb=0.5)
    teacher, _ = surgeon.load_model(base)
    start = surgeon.load(base, diff)
    ids = torch.randint(5, 80, (2, 32), generator=torch.Generator().manual_seed(3))

    def gap(model):
        with torch.no_grad():
            a = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            b = teacher(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        return (a - b).pow(2).mean().item()

    result = train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / "out"), objective="distill", steps=40,
                   lr=2e-2, final=final, attn_weight=attn_weight, **FAST)  # fmt: skip
    assert result.losses[0] > 0
    assert _mean(result.losses[-5:]) < 0.3 * _mean(result.losses[:5]), result.losses
    assert gap(result.model) < 0.3 * gap(start)
    # distillation's hooks are gone: the returned model has only the hooks a fresh one has
    hooks = lambda model: sum(len(m._forward_hooks) for m in model.modules())  # noqa: E731
    assert hooks(result.model) == hooks(start)


def test_layerwise_distill_feeds_teacher_inputs_and_calibrates_each_layer(tmp_path):
    from surgeon.train.objectives import DistillObjective

    base = make_base(tmp_path / "base")
    teacher, _ = surgeon.load_model(base)
    ids = torch.randint(5, 80, (2, 32), generator=torch.Generator().manual_seed(3))

    def layer_outputs(model, layerwise):  # each attention module's output, and the task's loss
        task = DistillObjective(model, teacher, layerwise=layerwise)
        seen = {}
        hooks = [model.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: seen.__setitem__(p, o[0]))
                 for p in task.paths]  # fmt: skip
        with torch.no_grad():
            targets = task.inputs(ids, torch.Generator())
            loss = task(**targets).item()
        for h in hooks:
            h.remove()
        task.close()
        return task.paths, seen, targets, loss

    # only layer 0 differs from the teacher: with the teacher's input forced, layer 1 matches
    # exactly; end to end, layer 1 sees layer 0's error
    lora0 = [{"do": "lora", "select": {"role": "attn.q", "layers": 0}, "with": {"r": 4}}]
    student = surgeon.load(base, make_diff(base, str(tmp_path / "l0"), lora0, perturb=0.5))
    paths, seen, targets, _ = layer_outputs(student, layerwise=True)
    error = lambda i: (seen[paths[i]] - targets[f"attn_{i}"]).abs().max().item()  # noqa: E731
    assert error(0) > 1e-4 and error(1) < 1e-7
    paths, seen, targets, _ = layer_outputs(student, layerwise=False)
    assert error(1) > 1e-5

    rules = [{"do": "sliding_window", "select": {"role": "attn"}, "with": {"window": 4}},
             {"do": "lora", "select": {"role": ["attn.q", "attn.k", "attn.v"]}, "with": {"r": 4}}]  # fmt: skip
    diff = make_diff(base, str(tmp_path / "d"), rules, perturb=0.3)
    start = surgeon.load(base, diff)
    loss0 = layer_outputs(start, layerwise=True)[3]
    result = train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / "out"), objective="distill", steps=40,
                   lr=1e-2, layerwise=True, **FAST)  # fmt: skip
    assert _mean(result.losses[-5:]) < 0.5 * _mean(result.losses[:5]), result.losses
    assert layer_outputs(result.model, layerwise=True)[3] < 0.5 * loss0
    hooks = lambda model: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    assert hooks(result.model) == hooks(start)


def _registered(name: str) -> bool:
    from surgeon import registry

    return name in registry.names()


@pytest.mark.skipif(not _registered("sliding_window"), reason="sliding_window action not registered yet")
def test_distill_compares_only_patched_attention(tmp_path):
    from surgeon.train.objectives import DistillObjective

    base = make_base(tmp_path / "base")
    rules = [{"do": "sliding_window", "select": {"role": "attn", "layers": "1:"}, "with": {"window": 4, "global_tokens": [0]}},
             {"do": "unfreeze", "select": {"role": "attn.q"}}]  # fmt: skip
    diff = make_diff(base, str(tmp_path / "d"), rules)
    model = surgeon.load(base, diff)
    teacher, _ = surgeon.load_model(base)
    task = DistillObjective(model, teacher)
    assert task.paths == ["bert.encoder.layer.1.attention.self"]
    task.close()
    result = train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / "out"), objective="distill", steps=25,
                   lr=1e-2, **FAST)  # fmt: skip
    assert result.losses[0] > 0 and _mean(result.losses[-5:]) < _mean(result.losses[:5])


@pytest.mark.parametrize("variant", [
    {"do": "sliding_window", "with": {"window": 8, "global_tokens": [0]}},
    {"do": "blockwise", "with": {"block_size": 8}},
    {"do": "linformer", "with": {"k": 8, "max_length": 32}},
    {"do": "latent", "with": {"m": 8}},
    {"do": "lsh", "with": {"n_hashes": 2, "bucket_size": 8}},
], ids=lambda v: v["do"])  # fmt: skip
def test_bf16_mixed_precision_distills_every_attention_variant(tmp_path, variant):
    base = make_base(tmp_path / "base")
    rules = [{**variant, "select": {"role": "attn"}}, {"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 4}}]
    diff = make_diff(base, str(tmp_path / "d"), rules, perturb=0.3)  # distillation must undo the perturbation
    start = _params(surgeon.load(base, diff))
    result = train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / "out"), objective="distill", steps=30,
                   lr=1e-2, mixed_precision="bf16", **FAST)  # fmt: skip
    assert all(math.isfinite(x) for x in result.losses)
    assert _mean(result.losses[-5:]) < _mean(result.losses[:5]), result.losses
    trained = dict(result.model.named_parameters())
    changed = [n for n, p in trained.items() if p.requires_grad and not torch.equal(p.detach(), start[n])]
    assert changed and all(trained[n].dtype == torch.float32 for n in changed)  # master weights stay fp32


def test_mixed_precision_is_applied_and_must_be_known(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN, perturb=0.5)
    first = {mode: train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / mode), objective="distill", steps=1,
                         mixed_precision=mode, **FAST).losses[0] for mode in ("no", "bf16")}  # fmt: skip
    assert first["no"] != first["bf16"] and first["bf16"] == pytest.approx(first["no"], rel=0.05)
    with pytest.raises(SurgeonError, match=r"mixed_precision \(--mixed-precision\): Input should be 'auto', 'no' or 'bf16' \(got 'fp8'\)"):
        train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / "o"), mixed_precision="fp8", **FAST)


# ---- checkpoints, resume, interruption ------------------------------------------------------
def _stop_at(step_to_stop: int):
    def callback(step, loss):
        if step == step_to_stop:
            raise KeyboardInterrupt

    return callback


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN + [{"do": "unfreeze", "select": {"role": "attn.v"}}])
    data = [data_file(tmp_path)]
    args = dict(objective="mlm", steps=8, lr=1e-2, save_every=3, **FAST)
    train_diff(diff, data, out_dir=str(tmp_path / "whole"), **args)
    out = str(tmp_path / "parts")
    with pytest.raises(TrainingInterrupted, match="step 6.*--resume"):
        train_diff(diff, data, out_dir=out, callback=_stop_at(7), **args)
    assert not os.path.exists(out)
    assert step_dirs(out + ".checkpoints") == ["step-00000006"]  # older one replaced
    surgeon.load(base, out + ".checkpoints/step-00000006/diff")  # a checkpoint's diff is usable alone
    with pytest.raises(SurgeonError, match="pass --resume"):
        train_diff(diff, data, out_dir=out, **args)
    # every changed setting is named, in one line
    with pytest.raises(SurgeonError) as changed:
        train_diff(diff, data, out_dir=out, resume=True, **{**args, "seq_len": 16, "lr": 2e-2, "seed": 3})
    assert "\n" not in str(changed.value)
    for part in ("seq_len (--seq-len): 32 there, 16 now", "lr (--lr): 0.01 there, 0.02 now", "seed (--seed): 0 there, 3 now"):
        assert part in str(changed.value)
    with pytest.raises(SurgeonError, match="the data files' content differs"):
        train_diff(diff, [data_file(tmp_path, TEXT * 21, "other.txt")], out_dir=out, resume=True, **args)
    result = train_diff(diff, data, out_dir=out, resume=True, **args)
    assert result.start_step == 6 and len(result.losses) == 2
    whole = load_file(os.path.join(tmp_path / "whole", "diff.safetensors"))
    parts = load_file(os.path.join(out, "diff.safetensors"))
    assert whole.keys() == parts.keys()
    for name in whole:
        assert torch.equal(whole[name], parts[name]), name
    assert not os.path.exists(out + ".checkpoints")  # cleaned up after the final write


def test_time_limit_ends_the_run_early_and_still_writes(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    result = train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / "o"), objective="mlm", steps=1000,
                   time_limit=0.0, **FAST)  # fmt: skip
    assert result.stopped_at == 0 and result.losses == []
    stored = load_file(os.path.join(tmp_path / "o", "diff.safetensors"))
    initial = load_file(os.path.join(diff, "diff.safetensors"))
    assert all(torch.equal(stored[n], initial[n]) for n in initial)


def test_interrupt_before_first_checkpoint_says_nothing_to_resume(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    with pytest.raises(TrainingInterrupted, match="no checkpoint was written yet"):
        train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / "o"), objective="mlm", steps=9, save_every=5,
              callback=_stop_at(2), **FAST)  # fmt: skip
    with pytest.raises(SurgeonError, match="no checkpoint in"):
        train_diff(diff, [data_file(tmp_path)], out_dir=str(tmp_path / "o"), objective="mlm", steps=9, resume=True, **FAST)


def test_sigterm_mid_run_then_resume(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    data, out = data_file(tmp_path), str(tmp_path / "out")
    cmd = [sys.executable, "-m", "surgeon", "train", diff, "--data", data, "--objective", "mlm", "--seq-len", "32",
           "--batch-size", "2", "--save-every", "2", "-o", out, "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd + ["--steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    deadline = time.time() + 400  # generous: a loaded or slow CPU; pytest-timeout bounds the test
    while not step_dirs(out + ".checkpoints"):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert not os.path.exists(out)
    (step_dir,) = step_dirs(out + ".checkpoints")
    step = int(step_dir.split("-")[1])
    with open(os.path.join(out + ".checkpoints", step_dir, "state.json")) as handle:
        assert json.load(handle)["step"] == step
    done = subprocess.run(cmd + ["--steps", str(step + 2), "--resume"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert f"steps {step + 1}–{step + 2}" in done.stdout
    surgeon.load(base, out)


# ---- bad input ------------------------------------------------------------------------------
def test_bad_data_files(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    empty = data_file(tmp_path, "  \n", "empty.txt")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    short = data_file(tmp_path, "tiny", "short.txt")
    out = str(tmp_path / "o")
    with pytest.raises(SurgeonError, match="empty.txt is empty"):
        train_diff(diff, [data_file(tmp_path), empty], out_dir=out, **FAST)
    with pytest.raises(SurgeonError, match=r"latin.txt is not UTF-8 text \(byte 0xe9 at offset 3, line 1\)"):
        train_diff(diff, [str(latin)], out_dir=out, **FAST)
    with pytest.raises(SurgeonError, match="fewer than one sequence"):
        train_diff(diff, [short], out_dir=out, **FAST)
    with pytest.raises(SurgeonError, match="missing.txt not found"):
        train_diff(diff, [str(tmp_path / "missing.txt")], out_dir=out, **FAST)
    assert not os.path.exists(out)


def test_bad_settings(tmp_path):
    base = make_base(tmp_path / "base")
    data = [data_file(tmp_path)]
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    out = str(tmp_path / "o")
    with pytest.raises(SurgeonError, match="seq-len 65 exceeds the model's 64 positions"):
        train_diff(diff, data, out_dir=out, seq_len=65, progress=False)
    frozen = make_diff(base, str(tmp_path / "frozen"), [{"do": "freeze", "select": {"role": "attn"}}])
    with pytest.raises(SurgeonError, match="nothing to train"):
        train_diff(frozen, data, out_dir=out, **FAST)
    with pytest.raises(SurgeonError, match="causal"):
        train_diff(diff, data, out_dir=out, objective="clm", **FAST)
    other = make_base(tmp_path / "other", intermediate_size=40)
    with pytest.raises(SurgeonError, match="made on another base"):
        train_diff(diff, data, out_dir=out, base_dir=other, **FAST)
    with pytest.raises(SurgeonError, match="inside the input"):
        train_diff(diff, data, out_dir=os.path.join(diff, "x"), **FAST)
    assert not os.path.exists(out)


def test_cli_errors_are_one_line(tmp_path):
    base = make_base(tmp_path / "base")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN)
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"\xff\xfe text")
    result = CliRunner().invoke(cli, ["train", diff, "--data", str(latin), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().startswith("surgeon: error: train: data file") and "Traceback" not in result.output
    ok = CliRunner().invoke(cli, ["train", diff, "--data", data_file(tmp_path), "--objective", "mlm", "--steps", "2",
                                  "--seq-len", "32", "--batch-size", "2", "-o", str(tmp_path / "o"), "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert "final loss" in ok.output and os.path.isfile(tmp_path / "o" / "diff.safetensors")


# ---- patched models under plain HF Trainer and plain accelerate -------------------------------
def _lora_bitfit(base, tmp_path):
    rules = [{"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 4}}] + BITFIT_ATTN
    return surgeon.load(base, make_diff(base, str(tmp_path / "d"), rules))


def _mlm_rows(base, n=16, seq=32):
    tok = transformers.AutoTokenizer.from_pretrained(base)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (n, seq), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def _check_changed(model, before):
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), before[name]) != param.requires_grad, name


def test_patched_model_trains_under_hf_trainer(tmp_path):
    base = make_base(tmp_path / "base")
    model = _lora_bitfit(base, tmp_path)
    before = _params(model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True)  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=_mlm_rows(base)).train()
    _check_changed(model, before)
    surgeon.save_diff(model, str(tmp_path / "out"), base_dir=base)
    reloaded = surgeon.load(base, str(tmp_path / "out"))
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, dict(model.named_parameters())[name]), name


def test_patched_model_trains_in_plain_accelerate_loop(tmp_path):
    from accelerate import Accelerator

    base = make_base(tmp_path / "base")
    model = _lora_bitfit(base, tmp_path)
    before = _params(model)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    rows = _mlm_rows(base)
    for i in range(3):
        batch = torch.stack([r["input_ids"] for r in rows[i * 4 : i * 4 + 4]])
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    _check_changed(accelerator.unwrap_model(model), before)


# ---- DDP over gloo, two CPU processes --------------------------------------------------------
@contextlib.contextmanager
def ddp_port_lock():
    """debug_launcher always uses port 29500: one DDP test at a time, across xdist workers."""
    with open("/tmp/surgeon-ddp-29500.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ddp_worker(diff, data, out, record):
    from accelerate.state import AcceleratorState, PartialState

    # a forked worker inherits the parent's single-process singletons: start fresh
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    torch.set_num_threads(1)
    import surgeon.train.trainer
    from surgeon.train import train_diff as train_fn

    real_save = surgeon.train.trainer.save_diff

    def spy(*args, **kwargs):
        with open(os.path.join(record, f"writes-{PartialState().process_index}.txt"), "a") as handle:
            handle.write(f"{args[1]}\n")
        return real_save(*args, **kwargs)

    surgeon.train.trainer.save_diff = spy
    result = train_fn(diff, [data], out_dir=out, objective="mlm", steps=4, save_every=2, lr=1e-2,
                      seq_len=32, batch_size=2, progress=False)  # fmt: skip
    rank = PartialState().process_index
    trained = {n: p.detach() for n, p in result.model.named_parameters() if p.requires_grad}
    torch.save(trained, os.path.join(record, f"params-{rank}.pt"))
    with open(os.path.join(record, f"world-{rank}.txt"), "w") as handle:
        handle.write(str(PartialState().num_processes))


@pytest.mark.xdist_group("ddp")
def test_ddp_two_processes_identical_params_and_rank0_writes(tmp_path):
    # headless BERT: MLM trains a scaffold head; the pooler's bias is trainable but unused by
    # MLM, so DDP must run with find_unused_parameters (the probe step detects it)
    base = make_base(tmp_path / "base", "bert-headless")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN + [{"do": "bitfit", "select": {"role": "head"}}])
    record = tmp_path / "record"
    record.mkdir()
    out = str(tmp_path / "out")
    # Fork the two ranks from a fresh interpreter: forking a pytest worker whose OpenMP pool
    # already ran (earlier tests) can deadlock the children in their first parallel op.
    launch = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_train; "
        "from accelerate import debug_launcher; "
        "debug_launcher(test_train._ddp_worker, args=tuple(sys.argv[2:]), num_processes=2)"
    )
    args = [os.path.dirname(os.path.abspath(__file__)), diff, data_file(tmp_path), out, str(record)]
    with ddp_port_lock():
        done = subprocess.run([sys.executable, "-c", launch, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (record / "world-0.txt").read_text() == "2" and (record / "world-1.txt").read_text() == "2"
    p0, p1 = torch.load(record / "params-0.pt"), torch.load(record / "params-1.pt")
    assert p0.keys() == p1.keys() and p0
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    initial = dict(surgeon.load(base, diff).named_parameters())
    assert all(not torch.equal(p0[n], initial[n]) for n in p0 if not n.startswith("pooler."))
    assert torch.equal(p0["pooler.dense.bias"], initial["pooler.dense.bias"])  # unused: untouched
    assert not (record / "writes-1.txt").exists()
    writes = (record / "writes-0.txt").read_text().split()
    assert writes[-1] == out and len(writes) == 2  # one checkpoint (step 2) + the final diff
    stored = load_file(os.path.join(out, "diff.safetensors"))
    for name in p0:
        assert torch.equal(stored[name], p0[name])
