"""`surgeon train --strategy fsdp`: FSDP2 over gloo, two CPU processes (torchrun --standalone).

The two-process runs shard a tiny Llama per layer; a single process with twice the batch sees
the same sequences per step (`StepBatches`), and CLM's loss is a mean over equally many tokens
per rank, so the trained tensors must agree to float rounding."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from trainkit import BITFIT_ATTN, data_file, make_base, make_diff, one_thread, step_dirs  # noqa: F401

import surgeon
from surgeon.errors import SurgeonError
from surgeon.train import TrainingInterrupted, train_diff

HERE = os.path.dirname(os.path.abspath(__file__))
LORA = [{"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 4}}]
RUN = dict(objective="clm", seq_len=32, lr=1e-2, dropout=False, progress=False)


def torchrun(spec: dict, tmp_path, name: str, processes: int = 2) -> subprocess.CompletedProcess:
    record = tmp_path / f"record-{name}"
    record.mkdir()
    spec = {**spec, "record": str(record)}
    path = tmp_path / f"spec-{name}.json"
    path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           os.path.join(HERE, "fsdp_worker.py"), str(path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE)])}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def records(tmp_path, name: str) -> list[dict]:
    folder = tmp_path / f"record-{name}"
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in range(len(os.listdir(folder)))]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    base = make_base(root / "base", "llama")
    diff = make_diff(base, str(root / "diff"), LORA)
    return base, diff, data_file(root)


def _close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_process_fsdp_equals_one_process_and_shards_the_base(llama, tmp_path):
    base, diff, data = llama
    out = str(tmp_path / "fsdp")
    done = torchrun({"options": {"diff_dir": diff, "data": [data], "out_dir": out, "strategy": "fsdp", "steps": 4,
                                 "batch_size": 2, **RUN}}, tmp_path, "fsdp")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = records(tmp_path, "fsdp")
    assert [r["world"] for r in ranks] == [2, 2]
    # every rank holds its half of every parameter (frozen and trained); rows split as torch.chunk
    assert ranks[0]["numel"] == ranks[1]["numel"]
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] == ranks[0]["numel"]
    assert ranks[0]["local_numel"] <= 0.55 * ranks[0]["numel"]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # averaged over the ranks

    single = train_diff(diff, [data], out_dir=str(tmp_path / "single"), steps=4, batch_size=4, **RUN)
    for a, b in zip(ranks[0]["losses"], single.losses):
        assert abs(a - b) <= 1e-5 * abs(b)
    _close(
        load_file(os.path.join(out, "diff.safetensors")), load_file(str(tmp_path / "single/diff.safetensors"))
    )
    surgeon.load(base, out)  # a complete diff, bound to its base


def test_fsdp_checkpoint_and_resume_follow_the_uninterrupted_run(llama, tmp_path):
    base, diff, data = llama
    options = {"diff_dir": diff, "data": [data], "strategy": "fsdp", "steps": 5, "batch_size": 2, "save_every": 2,
               **RUN}  # fmt: skip
    out = str(tmp_path / "out")
    stopped = torchrun({"options": {**options, "out_dir": out}, "stop_at": 3}, tmp_path, "stopped")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert [r.get("stopped") for r in records(tmp_path, "stopped")] == ["stopped at step 3"] * 2
    assert not os.path.exists(out)
    (step_dir,) = step_dirs(out + ".checkpoints")
    checkpoint = os.path.join(out + ".checkpoints", step_dir)
    surgeon.load(base, os.path.join(checkpoint, "diff"))  # the step's diff is complete on its own

    # the checkpoint of a 2-process fsdp run is refused by a 1-process ddp resume, naming both
    with pytest.raises(
        SurgeonError, match=r"strategy \(--strategy\): 'fsdp' there, 'ddp' now.*world size\): 2 there, 1 now"
    ):
        train_diff(**{**options, "strategy": "ddp", "out_dir": out, "resume": True})  # fmt: skip
    assert not os.path.exists(out) and step_dirs(out + ".checkpoints") == [step_dir]

    resumed = torchrun({"options": {**options, "out_dir": out, "resume": True}}, tmp_path, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(records(tmp_path, "resumed")[0]["losses"]) == 3  # steps 3..5
    assert not os.path.exists(out + ".checkpoints")
    # the trained tensors and the AdamW moments came back: the same result as one uninterrupted process
    whole = train_diff(diff, [data], out_dir=str(tmp_path / "whole"), steps=5, batch_size=4, **RUN)
    assert whole.steps == 5
    _close(
        load_file(os.path.join(out, "diff.safetensors")), load_file(str(tmp_path / "whole/diff.safetensors"))
    )


def _stop_at(step_to_stop: int):
    def callback(step, loss):
        if step == step_to_stop:
            raise KeyboardInterrupt

    return callback


def test_fsdp_resume_of_a_ddp_checkpoint_is_one_line(llama, tmp_path):
    _, diff, data = llama
    out = str(tmp_path / "out")
    with pytest.raises(TrainingInterrupted):
        train_diff(
            diff, [data], out_dir=out, steps=5, batch_size=2, save_every=2, callback=_stop_at(3), **RUN
        )
    (step_dir,) = step_dirs(out + ".checkpoints")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "surgeon",
           "train", diff, "--data", data, "-o", out, "--strategy", "fsdp", "--objective", "clm", "--steps", "5",
           "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2", "--no-dropout", "--save-every", "2", "--resume",
           "--no-progress"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("surgeon: error:")]
    assert len(errors) == 2  # one line from each rank
    assert "strategy (--strategy): 'ddp' there, 'fsdp' now" in errors[0]
    assert "world size): 1 there, 2 now" in errors[0]
    assert "surgeon/train/" not in done.stderr  # no traceback of ours (torchrun prints its own)
    assert not os.path.exists(out) and step_dirs(out + ".checkpoints") == [step_dir]


def test_fsdp_in_one_process_is_one_line_and_writes_nothing(llama, tmp_path):
    _, diff, data = llama
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "surgeon", "train", diff, "--data", data, "-o", str(out), "--strategy", "fsdp"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "surgeon: error: train: --strategy fsdp shards the model across processes, and this run is one process; "
        "launch 2 or more (torchrun --nproc-per-node N, or accelerate launch --num_processes N), or use "
        "--strategy ddp"
    ]
    assert not out.exists() and not os.path.exists(str(out) + ".checkpoints")


def test_fsdp_headless_bert_mlm_keeps_tied_embeddings_in_one_unit(tmp_path):
    # BERT lists BertEmbeddings as a unit, but the MLM scaffold's decoder is tied to its word
    # embeddings: that unit stays with the root. The pooler's bias is trainable and unused by MLM.
    base = make_base(tmp_path / "base", "bert-headless")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT_ATTN + [{"do": "bitfit", "select": {"role": "head"}}])
    out = str(tmp_path / "out")
    options = {"diff_dir": diff, "data": [data_file(tmp_path)], "out_dir": out, "strategy": "fsdp", "steps": 3,
               "objective": "mlm", "seq_len": 32, "batch_size": 2, "lr": 1e-2, "progress": False}  # fmt: skip
    done = torchrun({"options": options}, tmp_path, "bert")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = records(tmp_path, "bert")
    assert ranks[0]["losses"] == ranks[1]["losses"]
    trained, initial = (
        load_file(os.path.join(out, "diff.safetensors")),
        load_file(os.path.join(diff, "diff.safetensors")),
    )
    assert trained.keys() == initial.keys()
    assert torch.equal(trained["pooler.dense.bias"], initial["pooler.dense.bias"])  # no gradient: untouched
    assert all(not torch.equal(trained[n], initial[n]) for n in trained if not n.startswith("pooler."))
    surgeon.load(base, out)


@pytest.mark.slow
def test_fsdp_rank_loads_about_half_of_what_a_ddp_rank_loads(tmp_path):
    # benchmarks/fsdp_memory.py on its ~310 MiB Llama: peak RSS of Trainer.setup per rank
    out = tmp_path / "memory.json"
    script = os.path.join(os.path.dirname(HERE), "benchmarks", "fsdp_memory.py")
    done = subprocess.run([sys.executable, script, "--steps", "1", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["base_mib"] > 250
    assert 0.35 < result["setup_mib_ratio"] < 0.65, result
    assert result["train_mib_ratio"] < 0.9, result
