"""Linformer, latent and LSH entries for benchmarks/attention.py (issue 4 §4).

benchmarks/attention.py appends `VARIANTS` to its own; see its docstring for the entry format.
Run alone, this script times these variants only (plus dense, same run) with benchlib.py's
harness. "pairs" counts the (query, key) score pairs a method computes, with
projection / summary work converted at the same cost per pair (one pair = a D-long dot product
plus a D-long weighted sum):
- Linformer: n·k scores, plus E·K and F·V = another 2·n·k·D multiply-adds → 2·n·k.
- latent (default slot keys = the latents): Z·Kᵀ and A·V → n·m; tokens × slots → n·m; 2·n·m in
  all. With summary_keys="attended" Z·Kᵀ runs twice (two fused calls share no work) for A·K too
  → 3·n·m.
- "+ band ±8": local_window 16 adds n·17 pairs (the exact short-range window).
- LSH: n_hashes · n · 2·bucket_size (hashing is ~5 % more, not counted).
Learned tensors (E, F, latents) are random, built once per n and cached, so their
construction is not timed; the memory subprocess does build them (16 MB for E, F at 16k).
Targets at n = 16384 vs dense SDPA: Linformer k=256 ≥ 28×, latent m=256 ≥ 25×, LSH 4 hashes
bucket 64 ≥ 4× with peak ≤ 500 MB; Linformer at n = 1024 not slower than dense.
"""

from __future__ import annotations

import argparse

import torch
from benchlib import HEAD_DIM, HEADS, RESULTS, THREADS, bench_core, memory_child, table, write_json

from surgeon.attention.kernels.latent import latent_attention
from surgeon.attention.kernels.linformer import linformer_attention, random_projection
from surgeon.attention.kernels.lsh import lsh_attention

_CACHE: dict = {}


def _cached(key, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _linformer(k: int, local_window: int = 0):
    def run(q, key, v):
        n = key.shape[2]
        e, f = _cached(("linformer", k, n), lambda: (random_projection(k, n), random_projection(k, n)))
        return linformer_attention(q, key, v, e, f, key_padding_mask=None, scaling=q.shape[-1] ** -0.5,
                                   local_window=local_window)  # fmt: skip

    return run


def _latent(m: int, summary_keys: str = "latent", local_window: int = 0):
    def run(q, key, v):
        z = _cached(("latent", m, key.shape[1], key.shape[3]),
                    lambda: torch.randn(key.shape[1], m, key.shape[3]))  # fmt: skip
        return latent_attention(q, key, v, z, key_padding_mask=None, scaling=q.shape[-1] ** -0.5,
                                summary_keys=summary_keys, local_window=local_window)  # fmt: skip

    return run


def _lsh(n_hashes: int, bucket_size: int):
    def run(q, key, v):
        return lsh_attention(q, key, v, n_hashes=n_hashes, bucket_size=bucket_size, seed=0,
                             key_padding_mask=None, scaling=q.shape[-1] ** -0.5)  # fmt: skip

    return run


VARIANTS = [
    {"name": "linformer k=256", "causal": False, "run": _linformer(256),
     "pairs": lambda n: 2 * n * min(n, 256)},
    {"name": "latent m=256", "causal": False, "run": _latent(256), "pairs": lambda n: 2 * n * 256},
    {"name": "latent m=256, keys=attended", "causal": False, "run": _latent(256, "attended"),
     "pairs": lambda n: 3 * n * 256},
    # plus an exact ±8 band (local_window 16): 17 more keys per query
    {"name": "linformer k=256 + band ±8", "causal": False, "run": _linformer(256, 16),
     "pairs": lambda n: 2 * n * min(n, 256) + n * min(n, 17)},
    {"name": "latent m=256 + band ±8", "causal": False, "run": _latent(256, local_window=16),
     "pairs": lambda n: 2 * n * 256 + n * min(n, 17)},
    {"name": "lsh 4 hashes, bucket 64", "causal": False, "run": _lsh(4, 64),
     "pairs": lambda n: 4 * n * min(n, 128)},
    {"name": "lsh 8 hashes, bucket 64", "causal": False, "run": _lsh(8, 64),
     "pairs": lambda n: 8 * n * min(n, 128)},
]  # fmt: skip


def main() -> None:
    """Time these variants only (plus dense, same run):

        flock /tmp/surgeon-cpu.lock python benchmarks/attention_variants_compressed.py

    Writes benchmarks/results/attention_compressed.json."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "attention_compressed.json"), help="JSON path")
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        memory_child(VARIANTS, args._memory[0], int(args._memory[1]))
        return
    torch.set_num_threads(THREADS)
    rows = bench_core(VARIANTS, args.sizes, args.repeat, None if args.no_memory else __file__)
    rows = [r for r in rows if not r["causal"]]
    print(table(rows, None))
    meta = {"torch": torch.__version__, "threads": THREADS, "heads": HEADS, "head_dim": HEAD_DIM,
            "dtype": "float32", "batch": 1, "timing": f"best of {args.repeat} interleaved rounds after one warm-up",
            "memory": "peak RSS rise of one call, fresh subprocess (benchlib.memory_child)"}  # fmt: skip
    write_json(args.out, {"meta": meta, "core": rows}, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
