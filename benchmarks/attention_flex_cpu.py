"""The flex route on the CPU: FlexAttention (compiled for the CPU by Inductor) against the sdpa routes
surgeon takes there, and dense SDPA, forward only, in the same run.

    python benchmarks/attention_flex_cpu.py                  # n = 1024 and 4096 (~5–10 min, compiling)
    python benchmarks/attention_flex_cpu.py --sizes 512 --repeat 1

Batch 1, 12 heads, head dim 64, fp32, `torch.set_num_threads(2)`, under torch.no_grad(): torch 2.13's
flex_attention has no backward on the CPU, so there is no training row (kernels/flex.py). Each
pattern of flex_variants.PATTERNS is called once on flex first — that call compiles (its time is
reported apart as `first flex s`) — then dense SDPA, the pattern on sdpa (route.choose_route's
pick: the blocked band plan or one masked call) and on flex run in `--repeat` interleaved rounds,
best of each (benchlib.interleaved_best). `flex / sdpa` > 1 means flex is slower. The load average
is recorded beside the numbers: this host is shared. Results: benchmarks/results/attention_flex_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import HEAD_DIM, HEADS, RESULTS, THREADS, inputs, interleaved_best, write_json
from flex_variants import PATTERNS


def bench(sizes, repeat: int) -> list[dict]:
    rows = []
    for n in sizes:
        q, k, v = inputs(n)
        for pattern in PATTERNS:
            run = pattern["run"]
            t0 = time.perf_counter()
            with torch.no_grad():
                run(q, k, v, "flex")
            first = time.perf_counter() - t0
            dense = {
                "name": "dense",
                "fn": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=pattern["causal"])),
            }
            best = interleaved_best(
                {
                    "dense": dense["fn"],
                    "sdpa": lambda: run(q, k, v, "sdpa"),
                    "flex": lambda: run(q, k, v, "flex"),
                },
                repeat,
            )
            rows.append(
                {
                    "pattern": pattern["name"],
                    "n": n,
                    "first_flex_seconds": first,
                    **{f"{k}_seconds": t for k, t in best.items()},
                    "flex_over_sdpa": best["flex"] / best["sdpa"],
                    "loadavg": os.getloadavg()[0],
                }
            )
            print(f"  {pattern['name']} n={n} done", flush=True)
    return rows


def table(rows) -> str:
    lines = [
        f"{'pattern':32s} {'n':>5s} {'dense s':>8s} {'sdpa s':>8s} {'flex s':>8s} {'flex/sdpa':>9s}"
        f" {'first flex s':>12s} {'load':>5s}"
    ]
    lines += [
        f"{r['pattern']:32s} {r['n']:5d} {r['dense_seconds']:8.4f} {r['sdpa_seconds']:8.4f} {r['flex_seconds']:8.4f}"
        f" {r['flex_over_sdpa']:8.2f}x {r['first_flex_seconds']:12.1f} {r['loadavg']:5.1f}"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "attention_flex_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    rows = bench(args.sizes, args.repeat)
    print(table(rows))
    meta = {
        "torch": torch.__version__,
        "threads": THREADS,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "dtype": "float32",
        "batch": 1,
        "pass": "forward under no_grad (no flex backward on CPU in this torch)",
        "timing": f"best of {args.repeat} interleaved rounds after the compiling first call",
    }
    write_json(Path(args.out), {"meta": meta, "rows": rows}, indent=2)


if __name__ == "__main__":
    main()
