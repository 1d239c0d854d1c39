"""Local attention on a GPU: surgeon's flex route and its sdpa routes against dense SDPA, in the
same run — forward at n up to 32k in bf16 and fp32, and a training step.

    python benchmarks/attention_cuda.py                               # n = 4096 … 32768, bf16 and fp32
    python benchmarks/attention_cuda.py --sizes 1024 --dtypes bf16 --repeat 2 --train-n 1024

Refuses in one line, exit 2, where CUDA is absent. Batch 1, 12 heads, head dim 64. Baseline:
dense `F.scaled_dot_product_attention` restricted to the flash kernel in bf16 (the fastest dense
kernel there) and to the memory-efficient kernel in fp32 (flash takes no fp32); causal patterns
against causal dense. Each pattern of flex_variants.PATTERNS runs on "flex" (kernels/flex.py:
a block-mask predicate, compiled by torch.compile) and on "sdpa" (route.py's blocked or masked
route, which on CUDA computes each piece's scores explicitly: primitives.attend has no fused
GPU path with a log-sum-exp) — the sdpa rows are what CUDA ran before the flex route existed.
After one warm-up call each (the flex one compiles), `--repeat` interleaved rounds run every
function once, in turn, each timed between `torch.cuda.synchronize()`s, best of each
(benchlib.interleaved_best). Peak memory: `torch.cuda.max_memory_allocated` over one call, above
what was allocated before it. Training step: forward, then backward of a fixed random weighting of
the output to q, k, v, at `--train-n`, bf16. Results: benchmarks/results/attention_cuda.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import HEAD_DIM, HEADS, RESULTS, interleaved_best, write_json
from flex_variants import PATTERNS
from torch.nn.attention import SDPBackend, sdpa_kernel

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def refuse_without_cuda() -> None:
    if not torch.cuda.is_available():
        print(
            f"attention_cuda.py: error: CUDA is not available (torch {torch.__version__}); "
            "this benchmark times GPU kernels only — benchmarks/attention_flex_cpu.py times flex on the CPU",
            file=sys.stderr,
        )
        raise SystemExit(2)


def cuda_inputs(n: int, dtype, grad: bool = False, seed: int = 0):  # q, k, v: (1, HEADS, n, HEAD_DIM)
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(1, HEADS, n, HEAD_DIM, generator=g).to("cuda", dtype).requires_grad_(grad)
        for _ in range(3)
    )


def dense(q, k, v, causal: bool):
    backend = SDPBackend.FLASH_ATTENTION if q.dtype != torch.float32 else SDPBackend.EFFICIENT_ATTENTION
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def synced(fn):
    def go():
        fn()
        torch.cuda.synchronize()

    return go


def peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def bench_forward(sizes, dtypes, repeat: int) -> list[dict]:
    rows = []
    for dtype_name in dtypes:
        for n in sizes:
            q, k, v = cuda_inputs(n, DTYPES[dtype_name])
            fns = {f"dense{' causal' if c else ''}": (lambda c=c: dense(q, k, v, c)) for c in (False, True)}
            for p in PATTERNS:
                for kernel in ("flex", "sdpa"):
                    fns[f"{p['name']} [{kernel}]"] = lambda p=p, kernel=kernel: p["run"](q, k, v, kernel)
            with torch.no_grad():
                best = interleaved_best({name: synced(fn) for name, fn in fns.items()}, repeat)
                memory = {name: peak_bytes(fn) for name, fn in fns.items()}
            for p in PATTERNS:
                base = best["dense causal" if p["causal"] else "dense"]
                for kernel in ("flex", "sdpa"):
                    name = f"{p['name']} [{kernel}]"
                    rows.append(
                        {
                            "pattern": p["name"],
                            "kernel": kernel,
                            "dtype": dtype_name,
                            "n": n,
                            "seconds": best[name],
                            "dense_seconds": base,
                            "speedup": base / best[name],
                            "peak_bytes": memory[name],
                        }
                    )
            for c in (False, True):
                name = f"dense{' causal' if c else ''}"
                rows.append(
                    {
                        "pattern": name,
                        "kernel": "sdpa",
                        "dtype": dtype_name,
                        "n": n,
                        "seconds": best[name],
                        "dense_seconds": best[name],
                        "speedup": 1.0,
                        "peak_bytes": memory[name],
                    }
                )
            print(f"  {dtype_name} n={n} done", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    return rows


def bench_training(n: int, repeat: int) -> list[dict]:
    q, k, v = cuda_inputs(n, torch.bfloat16, grad=True)
    weight = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to("cuda", torch.bfloat16)

    def step(run):
        return synced(lambda: torch.autograd.grad((run() * weight).sum(), (q, k, v)))

    fns = {f"dense{' causal' if c else ''}": step(lambda c=c: dense(q, k, v, c)) for c in (False, True)}
    for p in PATTERNS:
        for kernel in ("flex", "sdpa"):
            fns[f"{p['name']} [{kernel}]"] = step(lambda p=p, kernel=kernel: p["run"](q, k, v, kernel))
    best = interleaved_best(fns, repeat, grad=True)
    rows = []
    for p in PATTERNS:
        base = best["dense causal" if p["causal"] else "dense"]
        for kernel in ("flex", "sdpa"):
            t = best[f"{p['name']} [{kernel}]"]
            rows.append(
                {
                    "pattern": p["name"],
                    "kernel": kernel,
                    "dtype": "bf16",
                    "n": n,
                    "seconds": t,
                    "dense_seconds": base,
                    "speedup": base / t,
                }
            )
    return rows


def table(rows, title: str) -> str:
    lines = [
        title,
        f"{'pattern':34s} {'kernel':>6s} {'dtype':>5s} {'n':>6s} {'time ms':>9s} {'vs dense':>9s} {'peak MiB':>9s}",
    ]
    for r in rows:
        mem = f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "-"
        lines.append(
            f"{r['pattern']:34s} {r['kernel']:>6s} {r['dtype']:>5s} {r['n']:6d} {r['seconds'] * 1e3:9.2f}"
            f" {r['speedup']:8.2f}x {mem:>9s}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--train-n", type=int, default=16384, help="sequence length of the training-step rows"
    )
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "attention_cuda.json"))
    args = parser.parse_args()
    refuse_without_cuda()
    forward = bench_forward(args.sizes, args.dtypes, args.repeat)
    training = None if args.no_train else bench_training(args.train_n, args.repeat)
    print(table(forward, "forward (no_grad):"))
    if training:
        print(table(training, f"\ntraining step (forward + backward to q, k, v), bf16, n={args.train_n}:"))
    meta = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "batch": 1,
        "timing": f"best of {args.repeat} interleaved rounds after one warm-up, cuda-synchronized",
        "dense": "SDPA flash (bf16) / memory-efficient (fp32)",
    }
    write_json(Path(args.out), {"meta": meta, "forward": forward, "training": training}, indent=2)


if __name__ == "__main__":
    main()
