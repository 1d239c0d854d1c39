"""Attention speed and memory: efficient variants vs dense SDPA, measured in the same run.

    flock /tmp/surgeon-cpu.lock python benchmarks/attention.py            # full run (~5 min)
    python benchmarks/attention.py --sizes 1024 4096 --no-model          # quicker

Attention core: batch 1, 12 heads, head dim 64, fp32, CPU, `torch.set_num_threads(2)`,
n = 1024, 4096, 16384. Each variant is timed against dense `F.scaled_dot_product_attention`
(causal variants against causal SDPA) in the same process: after one warm-up each, `--repeat`
rounds each run every baseline and variant once, in turn, and each keeps its best time — so a
drift of the host's speed hits a variant and its baseline alike. Beside each speedup is its
FLOP-ratio limit: dense (query, key) score pairs divided by the variant's — the speedup a kernel
with the same efficiency per score as dense would get.

Peak memory: each (variant, n) runs once in a fresh subprocess; we report the rise of the
process's peak RSS over its RSS after the inputs were allocated (Linux: `VmHWM` after resetting
it with /proc/self/clear_refs; elsewhere `ru_maxrss`, which can under-report). That includes
the output tensor (n·768·4 bytes) and allocator slack; it is
what the OS had to give, not a per-tensor account.

Whole model: a BERT-base-width encoder (hidden 768, 12 heads, 2 layers, random init,
max_position_embeddings 4096) at n = 4096, dense SDPA vs `sliding_window` window 512 (±256)
applied with surgeon.patch. Also timed: the same model with attention replaced by a no-op, which
is what the rest of the model (embeddings, projections, FFNs, norms) costs — no attention variant
changes it. From it, the speedup a windowed kernel exactly as fast per score as dense SDPA would
give, and the speedup of free attention: the measured ceilings of the whole-model target.
The three models are timed in interleaved rounds (`--model-repeat`, best of each), because this
host's speed drifts over seconds and sequential timing once put the whole drift on one model.
Two more whole-model rows (JSON "model_more"), the same way: window 256 (±128) at n = 4096, and
±256 at 2n = 8192, where attention is a larger share of the dense model's FLOPs.

Training step: forward plus backward (gradients to q, k, v of a fixed random weighting of the
output) at `--train-n` (4096), each variant against dense SDPA's step (causal SDPA's for causal
variants), best of `--repeat` interleaved rounds after one warm-up.

Short inputs: the sliding-window kernel's two routes (its blocked band plan, one masked fused
call) and its automatic choice, forward and training step, beside dense SDPA, at the shapes in
`SHORT_CASES` (a sentence encoder's 8 × 256 batch; one 1024-token sequence).

The compressed variants (Linformer, latent, LSH) come from `attention_variants_compressed.py`'s
`VARIANTS`; the harness itself (inputs, baselines, rounds, memory subprocess, whole-model and
route timing) is benchlib.py's. Each variant is a dict:
    {"name": str, "causal": bool,
     "run": callable(q, k, v) -> out,       # q, k, v: (1, 12, n, 64) fp32; out like q
     "pairs": callable(n) -> int}           # (query, key) score pairs the method computes
Results go to benchmarks/results/attention.json and a log-log plot attention.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from attention_variants_compressed import VARIANTS as COMPRESSED_VARIANTS
from benchlib import (
    HEAD_DIM, HEADS, RESULTS, THREADS, bench_core, bench_model, dense_variants, inputs, interleaved_best,
    memory_child, table, time_routes, write_json,
)  # fmt: skip

from surgeon.attention.kernels.blockwise import blockwise_attention
from surgeon.attention.kernels.sliding import sliding_window_attention


def _causal_pairs_window(n: int, w: int) -> int:
    """Σ_p min(p + 1, w): keys seen by causal queries with a look-back of w."""
    w = min(w, n)
    return w * (w + 1) // 2 + (n - w) * w


def local_variants() -> list[dict]:
    return [
        {
            "name": "sliding ±256",
            "causal": False,
            "run": lambda q, k, v: sliding_window_attention(q, k, v, window=512, causal=False),
            "pairs": lambda n: sum(min(n, p + 257) - max(0, p - 256) for p in range(n)),
        },
        {
            "name": "sliding ±256 + global [0]",
            "causal": False,
            "run": lambda q, k, v: sliding_window_attention(
                q, k, v, window=512, causal=False, global_mask=_global0(q)
            ),
            "pairs": lambda n: sum(min(n, p + 257) - max(0, p - 256) for p in range(n)) + 2 * n,
        },
        {
            "name": "sliding ±256 dilation [1,1,2,2]",
            "causal": False,
            "run": lambda q, k, v: sliding_window_attention(q, k, v, window=512, causal=False, dilation=[1, 1, 2, 2]),
            "pairs": lambda n: n * min(n, 513),
        },
        {
            "name": "sliding causal 512",
            "causal": True,
            "run": lambda q, k, v: sliding_window_attention(q, k, v, window=512, causal=True),
            "pairs": lambda n: _causal_pairs_window(n, 512),
        },
        {
            "name": "blockwise 16 blocks",
            "causal": False,
            "run": lambda q, k, v: blockwise_attention(q, k, v, block_size=q.shape[2] // 16, causal=False),
            "pairs": lambda n: n * (n // 16),
        },
        {
            "name": "blockwise 16 blocks, 2 perms",
            "causal": False,
            "run": lambda q, k, v: blockwise_attention(
                q, k, v, block_size=q.shape[2] // 16, causal=False, permutations=2
            ),
            "pairs": lambda n: n * (n // 16),
        },
    ]


def _global0(q):
    g = torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool)
    g[:, 0] = True
    return g


def all_variants() -> list[dict]:
    return local_variants() + list(COMPRESSED_VARIANTS)


TRAINED = ["sliding ±256", "sliding ±256 + global [0]", "sliding causal 512", "blockwise 16 blocks",
           "linformer k=256", "latent m=256", "linformer k=256 + band ±8"]


def bench_training(n: int, repeat: int) -> list[dict]:
    """One training step of the attention core: forward, then backward of a fixed random
    weighting of the output, gradients to q, k, v. Against dense SDPA's (causal SDPA's) step."""
    variants = {v["name"]: v for v in all_variants()}
    dense = dense_variants()
    g = torch.Generator().manual_seed(1)
    q, k, v = (t.requires_grad_(True) for t in inputs(n))
    weight = torch.randn(1, HEADS, n, HEAD_DIM, generator=g)

    def step(run):
        def go():
            out = run(q, k, v)
            torch.autograd.grad((out * weight).sum(), (q, k, v))

        return go

    fns = {d["name"]: step(d["run"]) for d in dense.values()}
    fns.update({name: step(variants[name]["run"]) for name in TRAINED if name in variants})
    best = interleaved_best(fns, repeat, grad=True)
    dense_t = {causal: best[d["name"]] for causal, d in dense.items()}
    rows = [{"variant": d["name"], "causal": causal, "n": n, "seconds": dense_t[causal], "speedup": 1.0}
            for causal, d in dense.items()]  # fmt: skip
    for name in TRAINED:
        if name in variants:
            t, causal = best[name], variants[name]["causal"]
            rows.append({"variant": name, "causal": causal, "n": n, "seconds": t, "speedup": dense_t[causal] / t})
    return rows


# Short inputs: sliding_window_attention may take one masked call instead of the band's blocked
# calls (kernels/route.py chooses, kernels/sliding_masked.py computes). (batch, n, heads, head dim, window, global [0])
SHORT_CASES = [(8, 256, 12, 32, 64, True), (8, 256, 12, 32, 64, False), (1, 1024, 12, 64, 128, True),
               (1, 1024, 12, 64, 512, False)]  # fmt: skip


def bench_short(repeat: int) -> list[dict]:
    """Both routes, the automatic choice and dense SDPA at the SHORT_CASES shapes."""
    return [time_routes(*case, repeat, dense=True) for case in SHORT_CASES]


def short_table(rows) -> str:
    lines = ["\nshort inputs (seconds; auto = the route sliding_window_attention picks):",
             f"{'shape':34s} {'route':>7s} {'pass':>8s} {'dense':>8s} {'blocked':>8s} {'masked':>8s} {'auto':>8s}"
             f" {'auto vs blocked':>15s}"]  # fmt: skip
    for r in rows:
        shape = (f"{r['batch']}×{r['n']}, {r['heads']}×{r['head_dim']}, ±{r['window'] // 2}"
                 + (" + global" if r["global"] else ""))  # fmt: skip
        for kind in ("forward", "training"):
            t = r[kind]
            lines.append(f"{shape:34s} {r['auto_route']:>7s} {kind:>8s} {t['dense SDPA']:8.4f} {t['blocked']:8.4f} "
                         f"{t['masked']:8.4f} {t['auto']:8.4f} {t['blocked'] / t['auto']:14.2f}x")  # fmt: skip
            shape = ""
    return "\n".join(lines)


def training_table(rows) -> str:
    lines = [f"\ntraining step (forward + backward to q, k, v), n={rows[0]['n']}:",
             f"{'variant':34s} {'time s':>9s} {'speedup':>8s}"]  # fmt: skip
    lines += [f"{r['variant']:34s} {r['seconds']:9.4f} {r['speedup']:7.2f}x" for r in rows]
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in dict.fromkeys(r["variant"] for r in rows):
        pts = [(r["n"], r["seconds"]) for r in rows if r["variant"] == name]
        if name.startswith("dense"):
            ax.plot(*zip(*pts), "k--" if "causal" in name else "k-", label=name, linewidth=2)
        else:
            ax.plot(*zip(*pts), "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length n")
    ax.set_ylabel("seconds per call (B=1, 12 heads, d=64, fp32, 2 threads)")
    ax.set_title("Attention time vs n (CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant subprocesses")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model forward")
    parser.add_argument("--model-repeat", type=int, default=7, help="interleaved rounds of the whole-model timing")
    parser.add_argument("--model-n", type=int, default=4096, help="sequence length of the whole-model forward")
    parser.add_argument("--train-n", type=int, default=4096, help="sequence length of the training-step rows")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    parser.add_argument("--no-short", action="store_true", help="skip the short-input rows")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        memory_child(all_variants(), args._memory[0], int(args._memory[1]))
        return
    torch.set_num_threads(THREADS)
    rows = bench_core(all_variants(), args.sizes, args.repeat, None if args.no_memory else __file__)
    model = None if args.no_model else bench_model(args.model_n, args.model_repeat)
    # beyond the row: a narrower window at the same length, and the same window on an
    # input twice as long, where attention is a larger share of the model's FLOPs
    model_more = [] if args.no_model else [
        bench_model(args.model_n, args.model_repeat, window=256),
        bench_model(2 * args.model_n, args.model_repeat, window=512),
    ]  # fmt: skip
    training = None if args.no_train else bench_training(args.train_n, args.repeat)
    short = None if args.no_short else bench_short(max(args.repeat, 5))
    print(table(rows, [model, *model_more] if model else []) + (training_table(training) if training else "") + (short_table(short) if short else ""))
    out = Path(args.out)
    meta = {"torch": torch.__version__, "threads": THREADS, "heads": HEADS, "head_dim": HEAD_DIM,
            "dtype": "float32", "batch": 1, "timing": f"best of {args.repeat} interleaved rounds after one warm-up",
            "model_timing": f"best of {args.model_repeat} interleaved rounds (dense, patched, no-op attention)",
            "memory": "peak RSS rise (VmHWM after clear_refs, else ru_maxrss) of one call in a fresh subprocess"}  # fmt: skip
    result = {"meta": meta, "core": rows, "model": model, "model_more": model_more, "training": training,
              "short": short}  # fmt: skip
    write_json(out / "attention.json", result, indent=2)
    plot(rows, out / "attention.png")


if __name__ == "__main__":
    main()
