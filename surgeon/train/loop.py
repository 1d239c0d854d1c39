"""`surgeon.train`: train the trainable tensors of a patched model, through accelerate.

One process by default; under `accelerate launch --multi_gpu --num_processes N` (CPU: gloo)
the same call runs DDP. Every random choice — batch order, masking, dropout — is a function
of (seed, step, rank) (`torch.manual_seed` is reset at every step), so a run resumed from a
checkpoint follows exactly the path of an uninterrupted one, and a checkpoint needs no RNG
snapshot beyond the seed and step it records.

Checkpoints live in `<out>.checkpoints/step-NNNNNNNN/` (written atomically; the older one is
removed only after the newer is in place): `trainable.safetensors` (every trained tensor,
scaffold head included), `optimizer.pt`, `scheduler.pt`, `state.json`, and `diff/` — a
complete surgeon diff, usable on its own. Ctrl-C / SIGTERM stop the run at the next step
boundary (all ranks together), keep the last checkpoint, and raise `TrainingInterrupted`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import SurgeonError
from ..fsutil import atomic_dir, check_output
from .data import StepBatches, fingerprint, load_tokenizer, pack, read_text
from .objectives import OBJECTIVES, ClmObjective, DistillObjective, MlmObjective

STATE = "state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
MIXED_PRECISION = ("no", "bf16")
# a resumed run must agree with its checkpoint on these (steps may grow: the schedule follows)
SAME_ON_RESUME = ("objective", "seq_len", "batch_size", "world", "lr", "seed", "data_sha256", "final", "final_weight",
                  "attn_weight", "layerwise")


class TrainingInterrupted(SurgeonError):
    """Ctrl-C / SIGTERM: the run stopped at a step boundary; the last checkpoint is intact."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


@dataclass
class TrainResult:
    out_dir: str
    steps: int
    start_step: int
    losses: list[float] = field(default_factory=list)  # per step run in this call (rank-averaged)
    stopped_at: int | None = None  # the step where time_limit ended the run early
    trainable: int = 0  # trained tensor elements, scaffold head excluded
    model: object = None  # the trained patched model (unwrapped), hooks removed


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            # RoBERTa-style learned positions start after the padding index
            if "roberta" in str(getattr(config, "model_type", "")) or config.model_type in ("camembert",):
                value -= (getattr(config, "pad_token_id", 1) or 0) + 1
            return value
    return None


def _schedule(steps: int, warmup: int, clock=None):
    # linear warm-up, then cosine decay to 10 % (Loshchilov & Hutter 2017, no restarts).
    # With a time limit, `clock()` (fraction of the time used) advances the decay too, so a
    # run cut short by time still ends at the low learning rate.
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        if clock is not None:
            progress = max(progress, clock())
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**63 - 1)


def _checkpoints(directory: str) -> list[tuple[int, str]]:
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith("step-") and name[5:].isdigit() and os.path.isfile(os.path.join(path, STATE)):
            found.append((int(name[5:]), path))
    return sorted(found)


class _StopFlag:
    """SIGINT/SIGTERM set a flag checked at step boundaries; a second signal stops at once."""

    def __init__(self):
        self.signal_number = 0

    def handler(self, number, frame):
        if self.signal_number:
            raise KeyboardInterrupt
        self.signal_number = number

    @contextmanager
    def installed(self):
        previous = {}
        try:
            for number in (signal.SIGINT, signal.SIGTERM):
                previous[number] = signal.signal(number, self.handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for number, old in previous.items():
                signal.signal(number, old)


def build_objective(objective: str, model, tokenizer, base_dir: str, *, final: str, final_weight: float,
                    attn_weight: float = 1.0, layerwise: bool = False, allow_pickle: bool = False):  # fmt: skip
    if objective == "clm":
        return ClmObjective(model, tokenizer)
    if objective == "mlm":
        return MlmObjective(model, tokenizer)
    from ..checkpoint import load_model

    teacher, _ = load_model(base_dir, allow_pickle=allow_pickle)
    teacher.requires_grad_(False).eval()
    return DistillObjective(model, teacher, final=final, final_weight=final_weight, attn_weight=attn_weight,
                            layerwise=layerwise)


def train(
    diff_dir: str,
    data_files: list[str],
    *,
    out_dir: str,
    objective: str = "distill",
    steps: int = 100,
    seq_len: int = 128,
    batch_size: int = 8,
    lr: float = 1e-3,
    save_every: int | None = None,
    resume: bool = False,
    base_dir: str | None = None,
    warmup: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    final: str = "hidden",
    final_weight: float = 1.0,
    attn_weight: float = 1.0,
    dropout: bool | None = None,
    checkpoint_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    callback=None,
    allow_pickle: bool = False,
    trust_base: bool = False,
    time_limit: float | None = None,
    mixed_precision: str = "no",
    layerwise: bool = False,
) -> TrainResult:
    """Train the diff in `diff_dir` on `data_files`; write the trained diff to `out_dir`.

    objective: distill (teacher = the unpatched base, dense attention), mlm or clm.
    batch_size is per process. dropout: None = on for mlm/clm, off for distill (calibration
    matches the teacher's eval-mode outputs). `callback(step, loss)` runs after every step.
    time_limit (seconds of this call's loop): stop at the first step boundary past it and write
    the diff as if the run had ended there; the learning-rate decay then follows whichever of
    steps or time is further along (so such runs are not bit-reproducible on resume).
    mixed_precision: "no" or "bf16" — forward passes (student and distillation teacher) under
    `torch.autocast` in bf16; weights, gradients and optimizer state stay fp32. On CPUs
    with AVX512-BF16 or AMX this makes a step about 1.5× faster.
    layerwise (distill): feed each patched attention module the teacher's input and match its
    output there — layers calibrate independently; final/attn_weight do not apply.
    trust_base: load the diff onto a base whose content differs from the one it was made on
    (`surgeon.load`); the trained diff is then bound to this base.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedDataParallelKwargs

    from ..diff import load, read_manifest, save_diff

    if objective not in OBJECTIVES:
        raise SurgeonError(f"train: unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    for name, value, low in (("steps", steps, 1), ("seq-len", seq_len, 2), ("batch-size", batch_size, 1)):
        if not isinstance(value, int) or value < low:
            raise SurgeonError(f"train: {name} must be an integer ≥ {low}, got {value!r}")
    if not lr > 0:
        raise SurgeonError(f"train: lr must be positive, got {lr}")
    if mixed_precision not in MIXED_PRECISION:
        raise SurgeonError(f"train: mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {mixed_precision!r}")
    if save_every is not None and save_every < 1:
        raise SurgeonError(f"train: save-every must be ≥ 1, got {save_every}")
    if isinstance(data_files, (str, os.PathLike)):
        data_files = [data_files]
    data_files = [os.fspath(f) for f in data_files]
    if not data_files:
        raise SurgeonError("train: no data files given (--data FILE)")
    for path in data_files:
        read_text(path)  # empty / non-UTF-8 files fail here, before any model is loaded

    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    manifest = read_manifest(diff_dir)
    base_dir = base_dir or manifest["base"]["path"]
    check_output(out_dir, [diff_dir, base_dir], overwrite=overwrite)
    ckpt_root = checkpoint_dir or os.path.abspath(out_dir).rstrip(os.sep) + ".checkpoints"
    existing = _checkpoints(ckpt_root)
    if resume and not existing:
        raise SurgeonError(f"train: --resume: no checkpoint in {ckpt_root}; run without --resume to start")
    if not resume and existing:
        raise SurgeonError(
            f"train: {ckpt_root} holds checkpoints of an earlier run (last: step {existing[-1][0]}); "
            "pass --resume to continue it, or delete it to start over"
        )

    # refuses a diff from another base (trust_base: checks only the base's tensor listing, warns)
    model = load(base_dir, diff_dir, allow_pickle=allow_pickle, trust_base=trust_base)
    if getattr(model.config, "is_encoder_decoder", False):
        raise SurgeonError(f"train: {type(model).__name__} is encoder-decoder; train supports encoder-only and decoder-only models")
    limit = _max_positions(model.config)
    if limit is not None and seq_len > limit:
        raise SurgeonError(
            f"train: seq-len {seq_len} exceeds the model's {limit} positions; lower --seq-len or "
            "extend the positions first (do: extend_positions)"
        )
    tokenizer = load_tokenizer(base_dir)
    if objective == "distill":
        teacher_limit = _max_positions(_base_config(base_dir))
        if teacher_limit is not None and seq_len > teacher_limit:
            raise SurgeonError(
                f"train: distill: seq-len {seq_len} exceeds the teacher's (the base's) {teacher_limit} positions"
            )
    sequences = pack(tokenizer, data_files, seq_len)
    torch.manual_seed(seed)  # a scaffold head's random init is part of the run's identity
    task = build_objective(objective, model, tokenizer, base_dir, final=final, final_weight=final_weight,
                           attn_weight=attn_weight, layerwise=layerwise, allow_pickle=allow_pickle)  # fmt: skip
    names = [n for n, p in task.named_parameters() if p.requires_grad]
    params = [p for _, p in task.named_parameters() if p.requires_grad]
    student_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if student_trainable == 0:
        raise SurgeonError(
            f"train: nothing to train: the recipe of {diff_dir} leaves every parameter frozen "
            "(add e.g. lora, bitfit or unfreeze, or an action that adds parameters)"
        )
    use_dropout = objective != "distill" if dropout is None else dropout
    task.train(use_dropout)

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = min(100, max(1, steps // 10)) if warmup is None else max(1, warmup)
    began = [None]  # set when the loop starts; the time-based part of the schedule reads it
    clock = None
    if time_limit:
        clock = lambda: 0.0 if began[0] is None else (time.monotonic() - began[0]) / time_limit  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(steps, warmup, clock))
    batches = StepBatches(sequences, batch_size, world=world, rank=rank, seed=seed)
    config = {
        "objective": objective, "seq_len": seq_len, "batch_size": batch_size, "world": world, "lr": lr,
        "seed": seed, "data_sha256": fingerprint(data_files), "final": final if objective == "distill" else None,
        "final_weight": final_weight if objective == "distill" else None,
        "attn_weight": attn_weight if objective == "distill" else None, "steps": steps,
        "layerwise": layerwise if objective == "distill" else None,
        "diff_dir": os.path.abspath(diff_dir), "base_dir": os.path.abspath(base_dir),
    }  # fmt: skip

    start = 0
    if resume:
        start = _restore(existing[-1][1], task, names, optimizer, scheduler, config)
        if start > steps:
            raise SurgeonError(f"train: the checkpoint is at step {start}, past --steps {steps}")

    device = state.device
    find_unused = world > 1 and _unused(task, batches.batch(0), names, device)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(find_unused))],
    )
    if objective == "distill":
        task.teacher[0].to(accelerator.device)
    wrapped, optimizer = accelerator.prepare(task, optimizer)
    # autocast here rather than Accelerator(mixed_precision=...): accelerate's process-wide state
    # fixes the precision at the first Accelerator, so a second train() call could not change it
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16")

    result = TrainResult(os.path.abspath(out_dir), steps, start)
    flag = _StopFlag()
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"surgeon train ({objective})", unit="step", dynamic_ncols=True)
    try:
        began[0] = time.monotonic()
        with flag.installed():
            for step in range(start, steps):
                out_of_time = time_limit is not None and time.monotonic() - began[0] > time_limit
                stop, out_of_time = _stopping(flag, accelerator, out_of_time)
                if stop:
                    raise _interrupted(flag, step, ckpt_root, save_every)
                if out_of_time:
                    result.stopped_at = step
                    break
                torch.manual_seed(_step_seed(seed, step, rank))
                generator = torch.Generator().manual_seed(_step_seed(seed + 1, step, rank))
                with autocast:  # teacher and student alike
                    inputs = task.inputs(batches.batch(step).to(accelerator.device), generator)
                    loss = wrapped(**inputs)
                accelerator.backward(loss)
                if max_grad_norm:
                    accelerator.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                value = accelerator.reduce(loss.detach().float(), "mean").item() if world > 1 else loss.item()
                result.losses.append(value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4g}")
                if callback is not None:
                    callback(step + 1, value)
                done = step + 1
                if save_every and done % save_every == 0 and done < steps:
                    _save_checkpoint(accelerator, ckpt_root, done, task, names, optimizer, scheduler, config,
                                     base_dir, diff_dir)  # fmt: skip
    except KeyboardInterrupt:
        raise _interrupted(flag, None, ckpt_root, save_every) from None
    finally:
        if bar is not None:
            bar.close()
        if isinstance(task, DistillObjective):
            task.close()

    accelerator.wait_for_everyone()
    if main:
        save_diff(model, out_dir, base_dir=base_dir, overwrite=overwrite)
        shutil.rmtree(ckpt_root, ignore_errors=True)
    accelerator.wait_for_everyone()
    model.eval()
    result.model = model
    result.trainable = student_trainable
    return result


def _base_config(base_dir: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base_dir, local_files_only=True)


def _stopping(flag: _StopFlag, accelerator, out_of_time: bool) -> tuple[bool, bool]:
    """(interrupted, out of time), agreed by every rank: a lone rank leaving would hang the
    others' all-reduce."""
    if accelerator.num_processes == 1:
        return bool(flag.signal_number), out_of_time
    mine = torch.tensor([float(flag.signal_number), float(out_of_time)], device=accelerator.device)
    agreed = accelerator.reduce(mine, "max").tolist()
    if agreed[0] and not flag.signal_number:
        flag.signal_number = int(agreed[0])
    return bool(agreed[0]), bool(agreed[1])


def _interrupted(flag: _StopFlag, step, ckpt_root: str, save_every) -> TrainingInterrupted:
    number = flag.signal_number or signal.SIGINT
    what = signal.Signals(number).name
    where = f" before step {step + 1}" if step is not None else ""
    last = _checkpoints(ckpt_root)
    if last:
        tail = f"the last checkpoint (step {last[-1][0]}) is intact in {last[-1][1]}; rerun with --resume to continue"
    elif save_every:
        tail = f"no checkpoint was written yet (the first comes at step {save_every}); nothing to resume"
    else:
        tail = "no checkpoints were requested (--save-every); nothing to resume"
    return TrainingInterrupted(f"train: interrupted by {what}{where}; {tail}", number)


def _unused(task, batch, names, device) -> bool:
    """One probe forward/backward: does any trained tensor get no gradient? (DDP needs to know)."""
    task.to(device)
    if isinstance(task, DistillObjective):
        task.teacher[0].to(device)
    generator = torch.Generator().manual_seed(0)
    loss = task(**task.inputs(batch.to(device), generator))
    loss.backward()
    params = dict(task.named_parameters())
    unused = [n for n in names if params[n].grad is None]
    for n in names:
        params[n].grad = None
    return bool(unused)


def _save_checkpoint(accelerator, root, step, task, names, optimizer, scheduler, config, base_dir, diff_dir):
    from safetensors.torch import save_file

    from ..diff import save_diff

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        params = dict(accelerator.unwrap_model(task).named_parameters())
        target = os.path.join(root, f"step-{step:08d}")
        with atomic_dir(target, [base_dir, diff_dir]) as tmp:
            save_file({n: params[n].detach().cpu().contiguous() for n in names}, os.path.join(tmp, TRAINABLE))
            torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER))
            torch.save(scheduler.state_dict(), os.path.join(tmp, SCHEDULER))
            save_diff(task.student, os.path.join(tmp, "diff"), base_dir=base_dir)
            with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as handle:
                json.dump({**config, "step": step, "names": names}, handle, indent=1)
        for old_step, path in _checkpoints(root):
            if old_step != step:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()


def _restore(path, task, names, optimizer, scheduler, config) -> int:
    from safetensors.torch import load_file

    with open(os.path.join(path, STATE), encoding="utf-8") as handle:
        saved = json.load(handle)
    for key in SAME_ON_RESUME:
        if saved.get(key) != config[key]:
            what = "the data files' content" if key == "data_sha256" else key
            raise SurgeonError(
                f"train: --resume: {what} differs from the checkpoint in {path} "
                f"({saved.get(key)!r} there, {config[key]!r} now); resume with the same settings"
            )
    if saved.get("names") != names:
        raise SurgeonError(f"train: --resume: the checkpoint in {path} trains other tensors than this run")
    tensors = load_file(os.path.join(path, TRAINABLE))
    params = dict(task.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].copy_(tensors[name])
    optimizer.load_state_dict(torch.load(os.path.join(path, OPTIMIZER), weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, SCHEDULER), weights_only=True))
    return int(saved["step"])
