"""Can a converted MiniLM fit a handful of windows at all? A diagnostic beside fidelity.py.

    flock /tmp/surgeon-cpu.lock python benchmarks/fidelity_capacity.py     # ~6 min
    python benchmarks/fidelity_capacity.py --steps 2 --windows 2           # smoke run

fidelity.py trains on one text and measures on another, and its sliding ±32 + [CLS] case stalls
near 0.96. This script asks the other question: trained *on the evaluation windows themselves*
(`--windows` of them, fidelity.py's evaluation text; deliberately not held out), how close does
the same pattern get to the dense model? If it fits them, the pattern can represent each window
and what the 10-minute budget lacks is generalisation over the text; if it cannot, the pattern
itself is the limit. Same loss as fidelity.py's sliding case (1 − cosine of the mean-pooled final
states), AdamW, bf16 autocast, batch = all windows, for two trainable sets: LoRA r=8 on q, k, v
(fidelity.py's) and every weight. Writes benchmarks/results/fidelity_capacity.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from benchlib import LORA_QKV, RESULTS, SEQ, embeddings, eval_docstrings, fidelity, minilm_dir, write_json

SLIDING = [{"do": "sliding_window", "select": {"role": "attn"}, "with": {"window": 64, "global_tokens": [0]}}]
SETS = [  # name, extra rules, base, learning rate
    ("LoRA r=8 on q, k, v", LORA_QKV, "frozen", 6e-3),
    ("every weight", [], "trainable", 1e-4),
]


def fit(base: str, windows: torch.Tensor, reference: torch.Tensor, rules, base_mode: str, lr: float, steps: int) -> dict:
    import surgeon

    torch.manual_seed(0)
    model, _ = surgeon.load_model(base)
    surgeon.patch(model, {"surgeon": 1, "base": base_mode, "rules": SLIDING + rules})
    params = [p for p in model.parameters() if p.requires_grad]
    before = fidelity(model, windows, reference)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    curve, started = [], time.monotonic()
    for step in range(steps):
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pooled = model(input_ids=windows).last_hidden_state.float().mean(dim=1)  # (N, hidden)
        loss = 1 - torch.nn.functional.cosine_similarity(pooled, reference, dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 25 == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "fidelity": fidelity(model, windows, reference)})
            print(f"  step {step + 1}: {curve[-1]['fidelity']:.4f}", flush=True)
    return {"trainable_params": sum(p.numel() for p in params), "lr": lr, "before": before,
            "after": curve[-1]["fidelity"] if curve else before, "curve": curve,
            "seconds": round(time.monotonic() - started, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS / "fidelity_capacity.json"))
    args = parser.parse_args()

    import transformers

    import surgeon
    from surgeon.train.data import load_tokenizer, pack

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(2)
    base = minilm_dir()
    with tempfile.TemporaryDirectory(prefix="surgeon-capacity-") as work:
        text = os.path.join(work, "eval.txt")
        with open(text, "w", encoding="utf-8") as handle:
            handle.write("\n\n".join(eval_docstrings()))
        windows = pack(load_tokenizer(base), [text], SEQ)
    windows = windows[torch.linspace(0, len(windows) - 1, args.windows).long()]
    dense, _ = surgeon.load_model(base)
    reference = embeddings(dense, windows)
    rows = []
    for name, rules, base_mode, lr in SETS:
        print(f"sliding ±32 + global [CLS], {name}:", flush=True)
        rows.append({"trained": name, **fit(base, windows, reference, rules, base_mode, lr, args.steps)})
    result = {
        "model": "all-MiniLM-L6-v2, every layer sliding ±32 + global [CLS]",
        "windows": f"{args.windows} windows of {SEQ} from fidelity.py's evaluation text, trained on (not held out)",
        "metric": "mean cosine of mean-pooled, L2-normalised embeddings vs the dense model, on those windows",
        "steps": args.steps, "batch": args.windows, "mixed_precision": "bf16", "rows": rows,
    }  # fmt: skip
    print(f"\n{'trained':22s} {'params':>10s} {'before':>7s} {'after':>7s} {'seconds':>8s}")
    for row in rows:
        print(f"{row['trained']:22s} {row['trainable_params']:10,d} {row['before']:7.4f} {row['after']:7.4f} {row['seconds']:8.0f}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
