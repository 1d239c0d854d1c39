"""Is the fused SDPA kernel the bottleneck of the sliding window? A hand-written band kernel
against it, and what the whole-model target would need (issue 5 §6).

    flock /tmp/surgeon-cpu.lock python benchmarks/band_kernel_floor.py      # ~2 min (C++ build ~30 s)
    python benchmarks/band_kernel_floor.py --quick                           # smoke run

The whole-model target (BERT-base width, n = 4096, ±256 windows, ≥ 1.7× faster) sits at the
model's FLOP limit (1.70×), so it needs a window kernel about as fast per score as dense SDPA,
which runs near this CPU's GEMM peak. `sliding_window_attention` feeds key strips of 32-query
blocks to PyTorch's fused CPU flash kernel. This script asks whether a kernel of our own could do
better on the same band: `csrc/band_tiles.cpp` (compiled here with torch.utils.cpp_extension)
computes each (block, head) tile with two MKL sgemm calls (the BLAS PyTorch's CPU build links)
and an exact softmax over the band only — no online rescaling, no mask tensor, no padding tile.
Its "GEMMs only" mode skips the softmax: the floor of any kernel built on these GEMMs with this
tiling. Rows (one attention layer, 12 heads, head dim 64, fp32, 2 threads, best of `--repeat`
interleaved rounds; edge blocks always go through band_plan's fused calls):

- fused: band_plan + run_band, what surgeon runs;
- tiles: the hand-written kernel on the interior blocks;
- tiles, GEMMs only: the same without the softmax (not attention: a bound).

Beside them: dense SDPA, a large GEMM's rate (this CPU's practical fp32 peak), and, from the
whole model (dense, patched, no-op attention; benchlib.py's `bench_model`), the per-layer window
time that 1.7× allows. Writes benchmarks/results/band_kernel_floor.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import HEAD_DIM, HEADS, RESULTS, THREADS, bench_model, interleaved_best, write_json

from surgeon.attention.kernels.band import band_plan, run_band, window_bounds

ROOT = Path(__file__).resolve().parent
TARGET = 1.7


def build_extension():
    """Compile csrc/band_tiles.cpp in a private build directory, removed afterwards (the loaded
    module stays mapped). torch's shared cache (~/.cache/torch_extensions) is not used: a build
    killed there leaves torch's lock file behind, and every later build waits on it forever.
    -march=native: the build is for this machine only; -ffast-math lets gcc vectorise the
    softmax reductions."""
    import shutil
    import tempfile

    from torch.utils.cpp_extension import load

    source = ROOT / "csrc" / "band_tiles.cpp"
    build = tempfile.mkdtemp(prefix="surgeon-band-tiles-")
    try:
        return load("surgeon_band_tiles", [str(source)], extra_cflags=["-O3", "-march=native", "-ffast-math"],
                    build_directory=build)  # fmt: skip
    except (RuntimeError, OSError, ImportError) as exc:  # no compiler or ninja, or a failed build
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        sys.exit(f"band_kernel_floor: cannot build {source.relative_to(ROOT)}: {first}")
    finally:
        shutil.rmtree(build, ignore_errors=True)


def gemm_rate(repeat: int) -> float:
    """FLOP/s of a BERT-base FFN GEMM (4096 × 768 · 768 × 3072): the practical peak here."""
    a, w = torch.randn(4096, 768), torch.randn(768, 3072)
    best = interleaved_best({"gemm": lambda: a @ w}, repeat)["gemm"]
    return 2 * 4096 * 768 * 3072 / best


def bench_blocks(ext, n: int, window: int, block: int, repeat: int) -> dict:
    lo, hi = window_bounds(window, causal=False)
    # (H, n, D) views of (n, H, D) buffers: the layout q, k, v have inside a transformers model
    q, k, v = (torch.randn(n, HEADS, HEAD_DIM).transpose(0, 1) for _ in range(3))
    scale = HEAD_DIM**-0.5
    pieces = band_plan(n, n, None, lo=lo, hi=hi, q0=0, block_size=block, device="cpu")
    interior = [p for p in pieces if p.blocks > 1]
    edges = [p for p in pieces if p.blocks == 1]
    out = torch.empty(n, HEADS, HEAD_DIM).transpose(0, 1)

    def fused():
        run_band(q, k, v, pieces, scale=scale, out=out)

    def tiles(mode: int):
        def run():
            run_band(q, k, v, edges, scale=scale, out=out)
            for p in interior:
                ext.band_interior(q, k, v, out, p.r0, p.blocks, p.step, p.start, p.length, hi - lo, scale, mode)

        return run

    with torch.no_grad():
        fused()
        reference = out.clone()
        tiles(0)()
        max_diff = float((out - reference).abs().max())
        times = interleaved_best({"fused": fused, "tiles": tiles(0), "tiles, GEMMs only": tiles(1)}, repeat)
    useful = sum(min(n - 1, i + hi) - max(0, i + lo) + 1 for i in range(n)) * HEADS  # band scores
    computed = sum(p.scores for p in pieces) * HEADS
    return {"block": block, "strip": interior[0].length if interior else None, "n": n, "window": window,
            "useful_scores": useful, "computed_scores": computed, "max_abs_diff_vs_fused": max_diff,
            "seconds": times}  # fmt: skip


def table(result: dict) -> str:
    gemm, dense = result["gemm_flops"], result["dense"]
    per_score = 4 * HEAD_DIM  # multiply-adds of QKᵀ and PV, ×2
    lines = [
        f"one layer, n={dense['n']}, window ±{result['rows'][0]['window'] // 2}, {HEADS} heads × {HEAD_DIM}, fp32, {THREADS} threads",
        f"large GEMM: {gemm / 1e9:.0f} GFLOP/s; dense SDPA {dense['seconds'] * 1e3:.1f} ms = "
        f"{dense['scores'] * per_score / dense['seconds'] / 1e9:.0f} GFLOP/s ({dense['scores'] * per_score / dense['seconds'] / gemm:.0%} of the GEMM rate)",
        f"{'block':>5s} {'strip':>5s} {'kernel':18s} {'ms':>7s} {'GFLOP/s useful':>15s} {'of GEMM rate':>12s}"
        f" {'max |tiles - fused|':>20s}",
    ]  # fmt: skip
    for row in result["rows"]:
        for name, t in row["seconds"].items():
            rate = row["useful_scores"] * per_score / t
            diff = f"{row['max_abs_diff_vs_fused']:20.1e}" if name == "tiles" else ""
            lines.append(f"{row['block']:5d} {row['strip']:5d} {name:18s} {t * 1e3:7.1f} {rate / 1e9:15.0f} {rate / gemm:12.0%}{diff}")
    model = result.get("model")
    if model:
        lines.append(
            f"whole model (2 layers): dense {model['dense_seconds']:.3f} s, patched {model['patched_seconds']:.3f} s "
            f"({model['speedup']:.2f}x), no-op attention {model['rest_seconds']:.3f} s; "
            f"{TARGET}x allows {result['allowed_ms_per_layer']:.1f} ms of window attention per layer"
        )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--blocks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model timing")
    parser.add_argument("--quick", action="store_true", help="smoke run: n=1024, one round, no model")
    parser.add_argument("--out", default=str(RESULTS / "band_kernel_floor.json"))
    args = parser.parse_args()
    if args.quick:
        args.n, args.repeat, args.no_model = 1024, 1, True
    torch.set_num_threads(THREADS)
    ext = build_extension()
    rows = [bench_blocks(ext, args.n, args.window, c, args.repeat) for c in args.blocks]
    q, k, v = (torch.randn(1, HEADS, args.n, HEAD_DIM) for _ in range(3))
    with torch.no_grad():
        dense_t = interleaved_best({"dense": lambda: F.scaled_dot_product_attention(q, k, v)}, args.repeat)["dense"]
    result = {
        "meta": {"torch": torch.__version__, "threads": THREADS, "heads": HEADS, "head_dim": HEAD_DIM,
                 "timing": f"best of {args.repeat} interleaved rounds after one warm-up"},
        "gemm_flops": gemm_rate(args.repeat),
        "dense": {"n": args.n, "seconds": dense_t, "scores": args.n * args.n * HEADS},
        "rows": rows,
    }  # fmt: skip
    if not args.no_model:
        model = bench_model(args.n, args.repeat)
        result["model"] = model
        result["allowed_ms_per_layer"] = (model["dense_seconds"] / TARGET - model["rest_seconds"]) / 2 * 1e3
    print(table(result))
    write_json(args.out, result, indent=2)


if __name__ == "__main__":
    main()
