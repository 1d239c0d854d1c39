"""Training a patched encoder as a text classifier, the same way for every method it is compared on.

Used by finetune_methods.py. The model is a `…ForSequenceClassification` checkpoint whose
classifier reads the mean of the final hidden states over the real tokens (the
sentence-transformers pooling), not BERT's pooler. One run: a fresh copy of the base, the
method's surgeon recipe, AdamW (weight decay 0), linear warm-up over the first 10 % of the steps
then linear decay to 0, gradient norm clipped at 1, seeded batches padded to their longest
snippet. Measured per run: median step time, peak training memory (see `reset_peak`), the size
of the surgeon diff, and (once per method) that the diff reloaded onto the base gives the same
logits.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch


# ---- batches ------------------------------------------------------------------------------------
def collate(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest: (B, n) input ids and (B, n) attention mask."""
    n = max(len(x) for x in ids)
    batch = torch.full((len(ids), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.long)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    return batch, mask


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of indices: seeded permutations of 0..n-1, one after another."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n, generator=gen).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


# ---- the classifier -----------------------------------------------------------------------------
def logits_of(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The classifier on the mean of the final hidden states over real tokens: (B, labels)."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, n, H)
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, n, 1)
    pooled = (hidden * weights).sum(1) / weights.sum(1)  # (B, H)
    return model.classifier(model.dropout(pooled))


@torch.no_grad()
def accuracy(model, data: dict, pad_id: int, batch_size: int = 128) -> float:
    """Fraction right on data = {"ids": token lists, "labels": (N,)}; batches sorted by length."""
    model.eval()
    order = sorted(range(len(data["ids"])), key=lambda i: len(data["ids"][i]))
    right = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = collate([data["ids"][i] for i in chunk], pad_id)
        right += (logits_of(model, ids, mask).argmax(-1) == data["labels"][chunk]).sum().item()
    return right / len(order)


# ---- memory -------------------------------------------------------------------------------------
def rss_mb(field: str = "VmRSS") -> float:
    """A line of /proc/self/status in MB: VmRSS now, VmHWM the peak since the last reset."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> float:
    """Hand free heap back to the OS (malloc_trim), reset the peak-RSS mark (Linux:
    /proc/self/clear_refs ← 5) and return the RSS now (MB), so that VmHWM afterwards is this
    run's own peak even after earlier runs in the same process."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return rss_mb()


# ---- runs ---------------------------------------------------------------------------------------
@dataclass
class Bench:
    """What every run shares: the loaded base (copied per run), its directory, the data, the setup."""

    pristine: object
    base_dir: str
    data: dict  # "train" / "val" / "test" -> {"ids": [...], "labels": tensor}
    pad_id: int
    steps: int
    batch_size: int


def schedule(steps: int):
    """Learning-rate factor per step: linear warm-up over 10 % of the steps, then linear to 0."""
    warmup = max(1, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def train_run(recipe: dict, lr: float, seed: int, bench: Bench, *, check_reload: bool):
    """Patch a fresh copy of the base with `recipe`, train it; return (measurements, model)."""
    import surgeon

    torch.manual_seed(seed)  # LoRA's A, the adapters' weights (drawn when applied) and the head: per seed
    model = copy.deepcopy(bench.pristine)
    surgery = surgeon.patch(model, recipe)
    model.classifier.reset_parameters()  # a trained tensor (in the diff): the base stays as saved
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(bench.steps))
    train = bench.data["train"]
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    before = reset_peak()
    times, losses = [], []
    for indices in batch_order(len(train["ids"]), bench.batch_size, bench.steps, seed):
        ids, mask = collate([train["ids"][i] for i in indices], bench.pad_id)
        start = time.perf_counter()
        loss = loss_fn(logits_of(model, ids, mask), train["labels"][indices])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    peak = rss_mb("VmHWM")
    del optimizer, scheduler  # their state is part of neither the evaluation nor the diff
    tenth = max(1, len(losses) // 10)
    result = {
        "lr": lr,
        "seed": seed,
        "step_time_s": statistics.median(times[1:] or times),  # the first step warms up
        "train_peak_mb": peak - before,
        "loss_first_tenth": statistics.mean(losses[:tenth]),
        "loss_last_tenth": statistics.mean(losses[-tenth:]),
        "trainable_params": sum(p.numel() for p in params),
        "base_params": surgery.ledger.base_total,
    }
    with tempfile.TemporaryDirectory(prefix="surgeon-bench-diff-") as work:
        diff = os.path.join(work, "diff")
        surgeon.save_diff(model, diff, base_dir=bench.base_dir)
        result["diff_bytes"] = os.path.getsize(os.path.join(diff, "diff.safetensors"))
        if check_reload:
            result["reload_max_abs_diff"] = reload_gap(model, diff, bench)
    return result, model


@torch.no_grad()
def reload_gap(model, diff: str, bench: Bench) -> float:
    """max |logits of the trained model − logits of its diff loaded onto the base| on 32 test snippets."""
    import surgeon

    reloaded = surgeon.load(bench.base_dir, diff)
    model.eval()
    ids, mask = collate(bench.data["test"]["ids"][:32], bench.pad_id)
    return (logits_of(model, ids, mask) - logits_of(reloaded, ids, mask)).abs().max().item()


def tune_and_repeat(recipe: dict, grid: list[float], seeds: int, bench: Bench, log) -> tuple[list, list]:
    """Seed 0 at every rate of the grid, judged on the validation split (ties: the smaller rate);
    the chosen rate's model is scored on the test split, then seeds 1.. run at that rate."""
    grid_runs, best, best_model = [], None, None
    for i, lr in enumerate(sorted(grid)):
        result, model = train_run(recipe, lr, 0, bench, check_reload=i == 0)
        result["val_accuracy"] = accuracy(model, bench.data["val"], bench.pad_id)
        grid_runs.append(result)
        if best is None or result["val_accuracy"] > best["val_accuracy"]:
            best, best_model = result, model
        val, step = 100 * result["val_accuracy"], result["step_time_s"]
        log(f"lr {lr:.0e} seed 0: val {val:.2f} ({step:.3f} s/step)")
    best["chosen"] = True
    best["test_accuracy"] = accuracy(best_model, bench.data["test"], bench.pad_id)
    log(f"lr {best['lr']:.0e} chosen; seed 0: test {100 * best['test_accuracy']:.2f}")
    del best_model
    seed_runs = []
    for seed in range(1, seeds):
        result, model = train_run(recipe, best["lr"], seed, bench, check_reload=False)
        result["test_accuracy"] = accuracy(model, bench.data["test"], bench.pad_id)
        seed_runs.append(result)
        log(f"lr {best['lr']:.0e} seed {seed}: test {100 * result['test_accuracy']:.2f}")
    return grid_runs, seed_runs
