"""`Trainer`: train the trainable tensors of a patched model, as a `TrainConfig` says, through accelerate.

    trainer = Trainer(config)
    trainer.setup()            # check paths and data, load model and objective, restore on resume
    result = trainer.train()   # the loop; writes the trained diff to config.out_dir

One process by default; under `accelerate launch --multi_gpu --num_processes N` or `torchrun`
(CPU: gloo) the same call runs DDP, or with `strategy="fsdp"` FSDP2 (`sharding.py`: the model
is built on the meta device and each rank reads only its shard of every tensor). Every random
choice — batch order, masking, dropout — is a function of (seed, step, rank)
(`torch.manual_seed` is reset at every step), so a run resumed from a checkpoint follows
exactly the path of an uninterrupted one, and a checkpoint needs no RNG snapshot beyond the
seed and step it records. Checkpoints: see `checkpoints.py`. Ctrl-C /
SIGTERM stop the run at the next step boundary (all ranks together), keep the last checkpoint,
and raise `TrainingInterrupted`.

A run that cannot learn is refused, not reported as success: a loss of exactly 0 at the first
step (distill: the student equals the teacher) or a non-finite loss at any step stops it before
the optimizer moves, and non-finite trained tensors are never saved.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from transformers import AutoConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from ..diff import load, read_manifest, save_diff
from ..engine import surgery_of
from ..errors import SurgeonError
from ..fsutil import check_paths
from ..precision import describe_cpu, native_bf16
from .checkpoints import CheckpointDir, non_finite
from .config import TrainConfig, field_flags, make_config
from .data import MiB, StepBatches, fingerprint, load_tokenizer, pack, read_corpus
from .meta_load import load_meta, load_meta_base
from .objectives import SAME_AS_TEACHER, DistillObjective, build_objective, choose_objective
from .sharding import (
    device_mesh,
    gather,
    materialize,
    non_finite_anywhere,
    return_freed_memory,
    set_full,
    shard,
)
from .stopping import StopFlag


@dataclass
class TrainResult:
    out_dir: str
    steps: int
    start_step: int
    losses: list[float] = field(default_factory=list)  # per step run in this call (rank-averaged)
    stopped_at: int | None = None  # the step where time_limit ended the run early
    trainable: int = 0  # trained tensor elements, scaffold head excluded
    model: object = None  # the trained patched model (unwrapped), hooks removed
    objective: str = ""  # as run (objective auto resolved)
    objective_reason: str = ""  # why auto chose it; empty when given explicitly
    mixed_precision: str = ""  # as run: "no" (fp32) or "bf16"
    # things the user should know (e.g. a checkpoint directory left in place)
    notes: list[str] = field(default_factory=list)


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


def resolve_precision(requested: str, device_type: str) -> tuple[str, str | None]:
    """(precision to run, warning or None). auto: bf16 only where the device computes it natively."""
    native = native_bf16(device_type)
    if requested == "auto":
        return ("bf16" if native else "no"), None
    if requested == "bf16" and not native:
        where = (
            f"this CPU ({describe_cpu()}) has no native bf16"
            if device_type == "cpu"
            else f"{device_type} has no native bf16"
        )
        return "bf16", (
            f"train: --mixed-precision bf16: {where}, so autocast emulates it (~5x slower than fp32 "
            "on AVX2 CPUs); --mixed-precision auto picks fp32 here"
        )
    return requested, None


def check_run_paths(config: TrainConfig, base_dir: str) -> list[str]:
    """Every input (diff, base, data files, config file) against every path the run writes or
    deletes — out_dir (which --force replaces) and the checkpoint directory (removed at the end)
    — through `fsutil.check_paths`; and the two outputs against each other. Returns the inputs."""
    inputs = [config.diff_dir, base_dir, *config.data] + ([config.source] if config.source else [])
    root = config.checkpoint_root()
    out, checkpoints = os.path.realpath(config.out_dir), os.path.realpath(root)
    if os.path.commonpath([out, checkpoints]) in (out, checkpoints):
        raise SurgeonError(
            f"train: the checkpoint directory {root} and the output {config.out_dir} lie inside one another "
            "(replacing the output would delete the checkpoints, or the reverse); choose another "
            "--checkpoint-dir"
        )
    check_paths(inputs=inputs, outputs=[config.out_dir], deletes=[root], overwrite=config.overwrite)
    CheckpointDir(root).check_usable()
    return inputs


class Trainer:
    """One training run of `config`; `callback(step, loss)` runs after every step."""

    def __init__(self, config: TrainConfig, *, callback=None):
        self.config = config
        self.callback = callback
        self._ready = False

    # ---- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Check everything that can be checked before training, load the model and objective,
        build the optimizer and schedule, and restore the newest checkpoint on resume."""
        c = self.config
        documents = read_corpus(c.data, int(c.max_data_mb * MiB))  # before any model is loaded
        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.main = self.state.is_main_process
        self.sharded = c.strategy == "fsdp"
        if self.sharded and self.world < 2:
            raise SurgeonError(
                "train: --strategy fsdp shards the model across processes, and this run is one process; "
                "launch 2 or more (torchrun --nproc-per-node N, or accelerate launch --num_processes N), "
                "or use --strategy ddp"
            )
        manifest = read_manifest(c.diff_dir)
        self.base_dir = c.base_dir or manifest["base"]["path"]
        self.inputs = check_run_paths(c, self.base_dir)
        self.checkpoints = CheckpointDir(c.checkpoint_root())
        existing = self.checkpoints.steps()
        if c.resume and not existing:
            raise SurgeonError(
                f"train: --resume: no checkpoint in {self.checkpoints.root}; run without --resume to start"
            )
        if not c.resume and existing:
            raise SurgeonError(
                f"train: {self.checkpoints.root} holds checkpoints of an earlier run "
                f"(last: step {existing[-1][0]}); "
                "pass --resume to continue it, or delete it to start over"
            )

        # refuses a diff made on another base
        if self.sharded:  # weights stay unread until each rank reads its shard
            model, sources = load_meta(self.base_dir, c.diff_dir, allow_pickle=c.allow_pickle,
                                       trust_base=c.trust_base)  # fmt: skip
        else:
            model = load(self.base_dir, c.diff_dir, allow_pickle=c.allow_pickle, trust_base=c.trust_base)
        if getattr(model.config, "is_encoder_decoder", False):
            raise SurgeonError(
                f"train: {type(model).__name__} is encoder-decoder; train supports encoder-only and "
                "decoder-only models"
            )
        self._check_positions(model)
        tokenizer = load_tokenizer(self.base_dir)
        self.objective, self.objective_reason = self._objective(model)
        device_type = self.state.device.type
        self.precision, warning = resolve_precision(c.mixed_precision, device_type)
        if warning and self.main:
            warnings.warn(warning, UserWarning, stacklevel=1)
        sequences = pack(tokenizer, documents, c.seq_len)
        if c.batch_size * self.world > len(sequences):
            raise SurgeonError(
                f"train: the data make {len(sequences)} sequences of seq-len {c.seq_len}, fewer than one "
                f"step takes (batch-size {c.batch_size} x {self.world} processes); add data or lower "
                "--batch-size or --seq-len"
            )
        torch.manual_seed(c.seed)  # a scaffold head's random init is part of the run's identity
        teacher = teacher_sources = None
        if self.sharded and self.objective == "distill":
            teacher, teacher_sources = load_meta_base(self.base_dir, allow_pickle=c.allow_pickle)
        self.task = build_objective(
            self.objective,
            model,
            tokenizer,
            self.base_dir,
            final=c.final,
            final_weight=c.final_weight,
            attn_weight=c.attn_weight,
            layerwise=c.layerwise,
            allow_pickle=c.allow_pickle,
            teacher=teacher,
        )
        self.model = model
        self.names = [n for n, p in self.task.named_parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if self.trainable == 0:
            raise SurgeonError(
                f"train: nothing to train: the recipe of {c.diff_dir} leaves every parameter frozen "
                "(add e.g. lora, bitfit or unfreeze, or an action that adds parameters)"
            )
        use_dropout = self.objective != "distill" if c.dropout is None else c.dropout
        self.task.train(use_dropout)
        if c.gradient_checkpointing:
            self._checkpoint_activations(model, use_dropout)
        if self.sharded:
            self._shard(sources, teacher, teacher_sources)
        # after sharding: fully_shard replaces every parameter by its sharded DTensor
        self.params = [p for _, p in self.task.named_parameters() if p.requires_grad]

        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=c.weight_decay)
        self._began = None  # set when the loop starts; the time-based part of the schedule reads it
        clock = None
        if c.time_limit:
            clock = lambda: 0.0 if self._began is None else (time.monotonic() - self._began) / c.time_limit  # noqa: E731
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(c.steps, c.warmup_steps(), clock)
        )
        self.batches = StepBatches(sequences, c.batch_size, world=self.world, rank=self.rank, seed=c.seed)
        self.identity = {
            **c.resume_identity(self.objective, self.precision),
            "world": self.world,
            "data_sha256": fingerprint(documents),
        }

        self.start = 0
        if c.resume:
            self.start = self.restore(existing[-1][1])
            if self.start > c.steps:
                raise SurgeonError(f"train: the checkpoint is at step {self.start}, past --steps {c.steps}")

        device = self.state.device
        find_unused = self.world > 1 and not self.sharded and self._unused(self.batches.batch(0), device)
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(find_unused))],
        )
        if self.sharded:  # already sharded on its device; accelerate's prepare would wrap it in DDP
            self.wrapped = self.task
        else:
            if isinstance(self.task, DistillObjective):
                self.task.teacher[0].to(self.accelerator.device)
            self.wrapped, self.optimizer = self.accelerator.prepare(self.task, self.optimizer)
        # autocast here rather than Accelerator(mixed_precision=...): accelerate's process-wide state
        # fixes the precision at the first Accelerator, so a second run in one process could not change it
        self.autocast = torch.autocast(
            self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
        )
        self._ready = True

    def _shard(self, sources: dict, teacher, teacher_sources: dict | None) -> None:
        """FSDP2: shard the objective (student, scaffold head) and the teacher, then read each
        rank's rows of every stored tensor (`sharding.py`)."""
        device = self.state.device
        if device.type == "cpu":
            return_freed_memory()
        mesh = device_mesh(device, self.world)
        by_name = _named_sources(self.task, sources)
        shard(self.task, [self.model], mesh)
        materialize(self.task, by_name, device, self.rank, self.world)
        if teacher is not None:
            by_name = _named_sources(teacher, teacher_sources)
            shard(teacher, [teacher], mesh)
            materialize(teacher, by_name, device, self.rank, self.world)

    def _check_positions(self, model) -> None:
        c = self.config
        limit = _max_positions(model.config)
        if limit is not None and c.seq_len > limit:
            raise SurgeonError(
                f"train: seq-len {c.seq_len} exceeds the model's {limit} positions; lower --seq-len or "
                "extend the positions first (do: extend_positions)"
            )

    def _objective(self, model) -> tuple[str, str]:
        c = self.config
        if c.objective != "auto":
            chosen, reason = c.objective, ""
        else:
            chosen, reason = choose_objective(model)
            given = c.distill_settings_given()
            if chosen != "distill" and given:
                raise SurgeonError(
                    f"train: objective auto chose {chosen} ({reason}), but {', '.join(given)} only apply "
                    "to distill; pass --objective explicitly"
                )
        if chosen == "distill":
            teacher_limit = _max_positions(AutoConfig.from_pretrained(self.base_dir, local_files_only=True))
            if teacher_limit is not None and c.seq_len > teacher_limit:
                raise SurgeonError(
                    f"train: distill: seq-len {c.seq_len} exceeds the teacher's (the base's) "
                    f"{teacher_limit} positions"
                )
        return chosen, reason

    def _checkpoint_activations(self, model, use_dropout: bool) -> None:
        """transformers' activation checkpointing on the patched model. It acts only on layers in
        training mode; without dropout (distill) the layers themselves are put in training mode
        while every module inside them stays in eval mode, so nothing else changes."""
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise SurgeonError(
                f"train: --gradient-checkpointing: {type(model).__name__} does not support activation "
                "checkpointing in transformers"
            )
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable({"use_reentrant": False})
        if not use_dropout:
            for module in model.modules():
                if isinstance(module, GradientCheckpointingLayer):
                    module.training = True  # the switch transformers reads; its children stay in eval

    def _release_activation_checkpointing(self, model) -> None:
        disable = (
            getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        )
        disable()
        if hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()  # the hook enable() added on the input embeddings

    def _unused(self, batch, device) -> bool:
        """One probe forward/backward: does any trained tensor get no gradient? (DDP needs to know)."""
        task = self.task
        task.to(device)
        if isinstance(task, DistillObjective):
            task.teacher[0].to(device)
        generator = torch.Generator().manual_seed(0)
        loss = task(**task.inputs(batch.to(device), generator))
        loss.backward()
        params = dict(task.named_parameters())
        unused = [n for n in self.names if params[n].grad is None]
        for n in self.names:
            params[n].grad = None
        return bool(unused)

    # ---- one step ---------------------------------------------------------------------------------
    def backward(self, step: int) -> float:
        """Forward and backward of global step `step`; the gradients are left in the parameters.
        Returns the (rank-averaged) loss; refuses a non-finite one, and a zero one at the first
        step of this run."""
        torch.manual_seed(_step_seed(self.config.seed, step, self.rank))
        generator = torch.Generator().manual_seed(_step_seed(self.config.seed + 1, step, self.rank))
        with self.autocast:  # teacher and student alike
            inputs = self.task.inputs(self.batches.batch(step).to(self.accelerator.device), generator)
            loss = self.wrapped(**inputs)
        detached = loss.detach().float()
        value = self.accelerator.reduce(detached, "mean").item() if self.world > 1 else detached.item()
        self._check_loss(value, step)
        self.accelerator.backward(loss)
        return value

    def _check_loss(self, value: float, step: int) -> None:
        c = self.config
        if not math.isfinite(value):
            if step == 0:
                raise SurgeonError(
                    f"train: the loss is {value} at the first step, before any update: the patched model's "
                    "outputs are not finite on this data (check the diff's tensors and the recipe's scales, "
                    "e.g. a LoRA alpha/r too large)"
                )
            raise SurgeonError(
                f"train: the loss became {value} at step {step + 1}: the run diverged (lr {c.lr:g}); "
                "nothing was saved past the last checkpoint; lower --lr (or lengthen --warmup)"
            )
        if step != self.start:
            return
        if self.objective == "distill" and value <= SAME_AS_TEACHER:
            raise SurgeonError(
                f"train: distill: the student equals the teacher on the first batch (loss {value:.3g}): no "
                "patched module differs from the base (LoRA starts with B = 0, BitFit and unfrozen tensors "
                "at "
                "the base's values), so distillation has nothing to learn; use --objective mlm or clm "
                "(auto picks one), or change the attention (e.g. sliding_window) before distilling"
            )
        if value == 0.0:
            raise SurgeonError(
                f"train: the {self.objective} loss is exactly 0 at the first step: there is no gradient, "
                "so training would change nothing; check the data and the objective"
            )

    def optimizer_step(self) -> None:
        clip = self.config.clip_norm()
        if clip and self.sharded:  # the norm over every rank's shards (DTensor gradients)
            torch.nn.utils.clip_grad_norm_(self.params, clip)
        elif clip:
            self.accelerator.clip_grad_norm_(self.params, clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ---- the loop -----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run steps start..steps, checkpointing every save_every; write the trained diff."""
        if not self._ready:
            self.setup()
        c = self.config
        result = TrainResult(
            os.path.abspath(c.out_dir),
            c.steps,
            self.start,
            objective=self.objective,
            objective_reason=self.objective_reason,
            mixed_precision=self.precision,
        )
        flag = StopFlag()
        bar = None
        if c.progress and self.main:
            from tqdm.auto import tqdm

            precision = "bf16" if self.precision == "bf16" else "fp32"
            bar = tqdm(
                total=c.steps,
                initial=self.start,
                desc=f"surgeon train ({self.objective}, {precision})",
                unit="step",
                dynamic_ncols=True,
            )
        done = self.start
        try:
            self._began = time.monotonic()
            with flag.installed():
                for step in range(self.start, c.steps):
                    out_of_time = c.time_limit is not None and time.monotonic() - self._began > c.time_limit
                    stop, out_of_time = flag.agreed(self.accelerator, out_of_time)
                    if stop:
                        raise flag.error(step, self._last_checkpoint(), c.save_every)
                    if out_of_time:
                        result.stopped_at = step
                        break
                    value = self.backward(step)
                    self.optimizer_step()
                    result.losses.append(value)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{value:.4g}")
                    if self.callback is not None:
                        self.callback(step + 1, value)
                    done = step + 1
                    if c.save_every and done % c.save_every == 0 and done < c.steps:
                        self.save_checkpoint(done)
        except KeyboardInterrupt:
            raise flag.error(None, self._last_checkpoint(), c.save_every) from None
        finally:
            if bar is not None:
                bar.close()
            self._close()

        self._refuse_non_finite(done)
        self.accelerator.wait_for_everyone()
        gathered = self._gathered_diff()  # every rank takes part; rank 0 keeps the tensors
        if self.main:
            save_diff(self.model, c.out_dir, base_dir=self.base_dir, overwrite=c.overwrite, tensors=gathered)
            note = self.checkpoints.remove()
            if note:
                result.notes.append(note)
        self.accelerator.wait_for_everyone()
        self.model.eval()
        result.model = self.model
        result.trainable = self.trainable
        return result

    def _gathered_diff(self) -> dict[str, torch.Tensor] | None:
        """The diff's tensors gathered whole on rank 0 (sharded runs), else None (read from the model)."""
        if not self.sharded:
            return None
        state = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        return gather(state, surgery_names(self.model), self.main)

    def _close(self) -> None:
        if isinstance(self.task, DistillObjective):
            self.task.close()
        if self.config.gradient_checkpointing:
            self._release_activation_checkpointing(self.model)

    def _last_checkpoint(self) -> tuple[int, str] | None:
        steps = self.checkpoints.steps()
        return steps[-1] if steps else None

    # ---- checkpoints -------------------------------------------------------------------------------
    def _refuse_non_finite(self, step: int) -> None:
        # every rank checks (their tensors are equal under DDP; FSDP: all ranks' shards), so all stop together
        params = dict(self.accelerator.unwrap_model(self.task).named_parameters())
        if self.sharded:
            bad = non_finite_anywhere(params, self.names)
        else:
            bad = non_finite({n: params[n].detach() for n in self.names})
        if bad:
            bad = (bad[0].removeprefix("student."), bad[1])  # as the patched model names it
            last = self._last_checkpoint()
            kept = f"the last checkpoint (step {last[0]}) is intact" if last else "nothing was written"
            raise SurgeonError(
                f"train: refusing to save step {step}: the trained tensor {bad[0]} holds {bad[1]} values — "
                "the "
                f"run diverged (lr {self.config.lr:g}); {kept}; lower --lr"
            )

    def save_checkpoint(self, step: int) -> str | None:
        """Write a resumable checkpoint of `step` (rank 0 writes; every rank waits). Returns its path
        on rank 0."""
        self._refuse_non_finite(step)
        self.accelerator.wait_for_everyone()
        path = None
        params = dict(self.accelerator.unwrap_model(self.task).named_parameters())
        if self.sharded:  # gathered whole on rank 0, so a checkpoint reads as a ddp one does
            trained = gather(params, self.names, self.main)
            optimizer_state = get_optimizer_state_dict(self.task, self.optimizer, options=_FULL_ON_RANK0)
            diff = self._gathered_diff()
        else:
            trained = {n: params[n] for n in self.names}
            optimizer_state, diff = self.optimizer.state_dict(), None
        if self.main:
            state = {"names": self.names, "identity": self.identity, "config": self.config.model_dump()}
            path = self.checkpoints.write(
                step,
                trained,
                optimizer_state,
                self.scheduler.state_dict(),
                state,
                lambda where: save_diff(self.task.student, where, base_dir=self.base_dir, tensors=diff),
                self.inputs,
            )
        self.accelerator.wait_for_everyone()
        return path

    def restore(self, path: str) -> int:
        """Load the checkpoint in `path` into the model, optimizer and schedule; return its step.
        Refuses a checkpoint written with other settings, naming every one that differs."""
        saved, tensors, optimizer_state, scheduler_state = self.checkpoints.read(path)
        differences = describe_differences(saved.get("identity", {}), self.identity)
        if differences:
            raise SurgeonError(
                f"train: --resume: the checkpoint in {path} was written with other settings — "
                f"{'; '.join(differences)}; resume with the checkpoint's settings, or start a new run "
                "elsewhere"
            )
        if saved.get("names") != self.names:
            raise SurgeonError(
                f"train: --resume: the checkpoint in {path} trains other tensors than this run"
            )
        params = dict(self.task.named_parameters())
        if self.sharded:  # each rank takes its rows of the full tensors the checkpoint holds
            set_full(params, {n: tensors[n] for n in self.names}, self.rank, self.world)
            set_optimizer_state_dict(
                self.task, self.optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
            )
        else:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(tensors[name])
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(scheduler_state)
        return int(saved["step"])


# the optimizer state of a sharded run, whole, on rank 0's CPU (the other ranks get nothing)
_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _named_sources(root, sources: dict) -> dict:
    """Name in `root` -> where it is stored, for `sources` keyed by tensor id (`meta_load`)."""
    tensors = [*root.named_parameters(), *root.named_buffers()]
    return {name: sources[id(t)] for name, t in tensors if id(t) in sources}


def surgery_names(model) -> list[str]:
    return surgery_of(model).ledger.diff_names()


def describe_differences(saved: dict, now: dict) -> list[str]:
    """'field (--flag): X there, Y now' for every key whose value differs."""
    out = []
    for key in list(now) + [k for k in saved if k not in now]:
        there, here = saved.get(key), now.get(key)
        if there == here:
            continue
        if key == "data_sha256":
            out.append("the data files' content differs")
        elif key == "world":
            out.append(f"the number of processes (world size): {there} there, {here} now")
        elif key in TrainConfig.model_fields:
            out.append(f"{key} ({field_flags(key)[-1]}): {there!r} there, {here!r} now")
        else:
            out.append(f"{key}: {there!r} there, {here!r} now")
    return out


def train_diff(
    diff_dir: str | None = None, data=None, *, callback=None, config: TrainConfig | None = None, **options
) -> TrainResult:
    """Train the diff in `diff_dir` on the text files `data`; write the trained diff to `out_dir`.

        surgeon.train_diff("runs/lora", ["corpus.txt"], out_dir="runs/trained", objective="mlm", steps=200)

    Keyword options are `TrainConfig`'s fields (see docs/training.md); or pass `config=` a
    TrainConfig (then diff_dir, data and options must be omitted). `callback(step, loss)` runs
    after every step. Returns a `TrainResult` (losses, the trained model, what ran).
    """
    if config is None:
        values = {**options}
        if diff_dir is not None:
            values["diff_dir"] = diff_dir
        if data is not None:
            values["data"] = data
        config = make_config(values)
    elif diff_dir is not None or data is not None or options:
        raise SurgeonError("train_diff: pass either config= or the settings, not both")
    return Trainer(config, callback=callback).train()
