"""Fit and check the sliding-window kernel's route choice (kernels/route.py).

    flock /tmp/surgeon-cpu.lock python benchmarks/sliding_routes.py        # ~4 min
    python benchmarks/sliding_routes.py --quick                             # a few shapes

`sliding_window_attention` computes its band either with the blocked plan (strided key strips,
edge chunks, global parts, one batch element at a time) or with one masked fused call over the
whole batch. `masked_is_cheaper` picks one from a cost model in units of one score's
multiply-adds over the head dimension: a blocked score costs `_BLOCKED_SCORE_COST` masked ones,
every call of the plan `_CALL_COST`, a global token `_GLOBAL_SCORES_PER_QUERY` scores per query
plus two calls. This script times both routes and the automatic choice, forward and training
step (gradients to q, k, v), over a grid of shapes (head dim 32 / 64, batch 1 / 8, n 128…1024,
windows 16…256, with and without a global token), best of `--repeat` interleaved rounds; then
refits the constants by least squares on relative error and reports how much slower the
automatic choice is than the faster route (its regret), against always taking the blocked one.
Writes benchmarks/results/sliding_routes.json.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
from benchlib import RESULTS, time_routes, write_json

from surgeon.attention.kernels import route
from surgeon.attention.kernels.band import band_plan

HEADS = 12


def time_shape(d, b, n, window, has_global, repeat) -> dict:
    """benchlib.time_routes plus what the fit needs: the blocked plan's calls and scores."""
    row = time_routes(b, n, HEADS, d, window, has_global, repeat)
    pieces = band_plan(n, n, None, lo=-(window // 2), hi=window // 2, q0=0, block_size=None, device="cpu")
    return {**row, "calls": len(pieces), "scores": sum(p.scores for p in pieces)}


def fit(rows: list[dict], kind: str) -> dict:
    """Least squares on relative error: blocked ≈ B·(a·scores·H·D + b·calls + glob·(c·n·H·D + e)),
    masked ≈ m·B·n²·H·D + f; constants reported in units of m (one masked score)."""
    blocked = torch.tensor([r[kind]["blocked"] for r in rows], dtype=torch.float64)
    masked = torch.tensor([r[kind]["masked"] for r in rows], dtype=torch.float64)
    xb = torch.tensor([[r["batch"] * r["scores"] * HEADS * r["head_dim"], r["batch"] * r["calls"],
                        r["batch"] * r["global"] * r["n"] * HEADS * r["head_dim"], r["batch"] * r["global"]]
                       for r in rows], dtype=torch.float64)  # fmt: skip
    xm = torch.tensor([[r["batch"] * r["n"] ** 2 * HEADS * r["head_dim"], 1.0] for r in rows], dtype=torch.float64)
    cb = torch.linalg.lstsq(xb / blocked[:, None], torch.ones_like(blocked)).solution
    cm = torch.linalg.lstsq(xm / masked[:, None], torch.ones_like(masked)).solution
    unit = float(cm[0])
    return {"blocked_score_cost": float(cb[0]) / unit, "call_cost": float(cb[1]) / unit,
            "global_scores_per_query": float(cb[2]) / unit, "global_fixed_cost": float(cb[3]) / unit,
            "masked_call_cost": float(cm[1]) / unit, "masked_score_seconds": unit}  # fmt: skip


def regret(rows: list[dict], kind: str, route: str) -> tuple[float, float]:
    r = [row[kind][route] / min(row[kind]["blocked"], row[kind]["masked"]) - 1 for row in rows]
    return sum(r) / len(r), max(r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="four shapes, one round (a smoke run)")
    parser.add_argument("--out", default=str(RESULTS / "sliding_routes.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    grid = [(d, b, n, w, g) for d, b, n, w, g in itertools.product(
        (32, 64), (1, 8), (128, 256, 384, 512, 768, 1024), (16, 64, 128, 256), (False, True)) if w < n]  # fmt: skip
    if args.quick:
        grid, args.repeat = [(32, 8, 256, 64, True), (32, 2, 128, 16, False), (64, 1, 512, 64, True),
                             (64, 1, 1024, 128, False)], 1  # fmt: skip
    rows = []
    for i, shape in enumerate(grid):
        rows.append(time_shape(*shape, args.repeat))
        print(f"  {i + 1}/{len(grid)} {shape}", file=sys.stderr, flush=True)
    in_use = {"blocked_score_cost": route._BLOCKED_SCORE_COST, "call_cost": route._CALL_COST,
              "global_scores_per_query": route._GLOBAL_SCORES_PER_QUERY}  # fmt: skip
    summary = {}
    for kind in ("forward", "training"):
        auto, blocked = regret(rows, kind, "auto"), regret(rows, kind, "blocked")
        summary[kind] = {"fit": fit(rows, kind), "auto_regret_mean": auto[0], "auto_regret_max": auto[1],
                         "always_blocked_regret_mean": blocked[0], "always_blocked_regret_max": blocked[1]}  # fmt: skip
        print(f"{kind}: auto is {auto[0]:.1%} slower than the faster route on average (worst {auto[1]:.0%}); "
              f"always blocked {blocked[0]:.1%} (worst {blocked[1]:.0%})")  # fmt: skip
        print("  refit: " + ", ".join(f"{k} {v:.3g}" for k, v in summary[kind]["fit"].items()))
    print("  in use: " + ", ".join(f"{k} {v:.3g}" for k, v in in_use.items()))
    write_json(args.out, {"shapes": len(rows), "repeat": args.repeat, "heads": HEADS, "in_use": in_use,
                          "summary": summary, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
