"""What binding a diff to its exact base costs: hashing every base tensor, first time and cached.

    flock /tmp/surgeon-cpu.lock python benchmarks/base_digest.py [--size-mb 1024] [--workdir DIR]

Builds a sharded Llama-style checkpoint of about --size-mb (fp32, random init, from a config; 250 MB
shards) and a LoRA diff on it in a temp dir, then times, in this one process:
- the baselines: reading the shards' bytes (the I/O floor) and `surgeon.load_model` (what loading
  the base costs anyway);
- hashing every tensor with sha256 (what surgeon records) and with blake2b (the alternative), on
  all threads and on one, from the page cache;
- sha256 after evicting the files from the page cache (posix_fadvise DONTNEED; where the
  filesystem ignores it, this equals the warm number);
- `surgeon.base_digests` with an empty cache (first load) and with its cache (every later load);
- `surgeon.load(base, diff)` end to end: first load, cached, and with trust_base (no content check).
Prints each time and its ratio to the baselines; writes benchmarks/results/base_digest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
RESULTS = os.path.join(HERE, "results", "base_digest.json")
MB = 2**20
# hidden 1024: ~12.85M parameters per layer, 65.5M in the two untied embeddings, so 15 layers
# ≈ 1.03 GB in fp32; below 256 MB (smoke runs) a narrower model, so the size still follows --size-mb
SHAPES = {
    "wide": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
    "narrow": dict(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=4, vocab_size=2000),
}  # fmt: skip


def _params(shape: dict) -> tuple[int, int]:
    """(parameters per layer, in the two untied embeddings) of a Llama of this shape."""
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    return 4 * h * h + 3 * h * f + 2 * h, 2 * v * h


def build(work: str, size_mb: int, shard: str) -> tuple[str, str]:
    import torch
    import transformers

    import surgeon

    shape = SHAPES["wide" if size_mb >= 256 else "narrow"]
    per_layer, embeddings = _params(shape)
    layers = max(1, round((size_mb * MB / 4 - embeddings) / per_layer))
    config = transformers.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=2048, tie_word_embeddings=False,
                                      **shape)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    base = os.path.join(work, "base")
    model.save_pretrained(base, max_shard_size=shard)
    del model
    model, _ = surgeon.load_model(base)
    surgeon.patch(model, {"surgeon": 1, "rules": [{"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 8}}]})
    diff = os.path.join(work, "diff")
    surgeon.save_diff(model, diff, base_dir=base)
    return base, diff


def timed(call, repeat: int, before=None) -> dict:
    seconds = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return {"min_s": min(seconds), "median_s": statistics.median(seconds), "runs": seconds}


def read_all(paths: list[str]) -> None:
    buffer = memoryview(bytearray(8 * MB))
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def evict(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="checkpoint size to build (fp32 bytes)")
    parser.add_argument("--shard", default="250MB", help="max_shard_size for save_pretrained")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", help="where to build (default: a temp dir, removed afterwards)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()

    import surgeon
    from surgeon import base_digests as bd
    from surgeon.checkpoint import inspect_checkpoint
    from surgeon.digest import Span, digest_spans, workers
    from surgeon.fsutil import atomic_write_text
    from surgeon.safetensors_header import read_layout

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    work = args.workdir or tempfile.mkdtemp(prefix="surgeon-digest-bench-")
    os.makedirs(work, exist_ok=True)
    caches = os.path.join(work, "caches")
    try:
        os.environ[bd.CACHE_ENV] = os.path.join(caches, "build")
        base, diff = build(work, args.size_mb, args.shard)
        info = inspect_checkpoint(base)
        paths = [os.path.join(base, f) for f in info.files]
        total = sum(os.path.getsize(p) for p in paths)
        spans = [Span((p, n), p, b, e) for p in paths for n, (b, e) in read_layout(p).spans.items()]
        print(f"checkpoint: {total / MB:.0f} MiB in {len(paths)} shards, {len(info.tensors)} tensors; "
              f"{workers()} hashing threads; {args.repeat} runs each (min shown)", flush=True)  # fmt: skip

        fresh = iter(range(10**6))

        def empty_cache() -> None:
            os.environ[bd.CACHE_ENV] = os.path.join(caches, f"empty-{next(fresh)}")

        rows: dict[str, dict] = {}
        rows["read (I/O floor)"] = timed(lambda: read_all(paths), args.repeat)
        rows["load_model (baseline)"] = timed(lambda: surgeon.load_model(base), args.repeat)
        for name in ("sha256", "blake2b"):
            rows[f"{name}, {workers()} threads"] = timed(lambda n=name: digest_spans(spans, algorithm=n), args.repeat)
            rows[f"{name}, 1 thread"] = timed(lambda n=name: digest_spans(spans, algorithm=n, threads=1), args.repeat)
        rows["sha256, evicted from page cache"] = timed(lambda: digest_spans(spans), args.repeat, before=lambda: evict(paths))
        rows["base_digests, empty cache"] = timed(lambda: bd.base_digests(info), args.repeat, before=empty_cache)
        rows["base_digests, cached"] = timed(lambda: bd.base_digests(info), args.repeat)
        rows["surgeon.load, first (empty cache)"] = timed(lambda: surgeon.load(base, diff), args.repeat, before=empty_cache)
        rows["surgeon.load, cached"] = timed(lambda: surgeon.load(base, diff), args.repeat)
        rows["surgeon.load, trust_base"] = timed(lambda: surgeon.load(base, diff, trust_base=True), args.repeat)

        floor, load = rows["read (I/O floor)"]["min_s"], rows["load_model (baseline)"]["min_s"]
        print(f"{'':36s} {'seconds':>8s} {'GiB/s':>7s} {'/read':>6s} {'/load_model':>11s}")
        for label, row in rows.items():
            row["gib_per_s"] = total / 2**30 / row["min_s"]
            row["vs_read"], row["vs_load_model"] = row["min_s"] / floor, row["min_s"] / load
            print(f"{label:36s} {row['min_s']:8.3f} {row['gib_per_s']:7.2f} {row['vs_read']:6.2f} {row['vs_load_model']:11.2f}")
        sha = rows[f"sha256, {workers()} threads"]["min_s"]
        blake = rows[f"blake2b, {workers()} threads"]["min_s"]
        print(f"blake2b / sha256: {blake / sha:.2f}x the time")
        result = {
            "bytes": total, "shards": len(paths), "tensors": len(info.tensors), "threads": workers(),
            "repeat": args.repeat, "blake2b_over_sha256": blake / sha, "rows": rows,
        }  # fmt: skip
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
