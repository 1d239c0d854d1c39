"""A training run as one validated config: `TrainConfig` (pydantic), loadable from YAML.

Every knob is a field with its default, its bounds and its trade-off (the descriptions are the
reference; `surgeon train --help` and docs/training.md show them). Three consumers read the
fields rather than lists kept by hand:
- the CLI (`surgeon/cli_train.py`) builds one option per field;
- `--config train.yaml` is validated against the same model, errors carry `file:line`;
- `--resume` compares exactly the fields marked `resume="same"` (see `resume_identity`).

No torch import here: `surgeon --help` and a config check stay fast.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..errors import RecipeError
from ..yamlfile import line_of, load_yaml, read_yaml_text, validation_problems

OBJECTIVES = ("distill", "mlm", "clm")
FINALS = ("hidden", "pooled", "logits", "none")
DISTILL_ONLY = ("final", "final_weight", "attn_weight", "layerwise")
PATH_FIELDS = ("diff_dir", "out_dir", "base_dir", "checkpoint_dir")
DEFAULT_MAX_DATA_MB = 32.0
SEED_LIMIT = 2**32 - 1  # torch.Generator seeds are 64-bit; the batch order multiplies the seed by ~2^20


def _field(
    default: Any = ..., description: str = "", *, resume: str = "free", flags: tuple[str, ...] = (), **bounds
) -> Any:
    """A config field. resume: "same" = a resumed run must use the value the checkpoint was
    written with (it changes the path of the run); "free" = may change between runs.
    flags: the CLI spelling when it is not `--field-name`."""
    return Field(
        default, description=description, json_schema_extra={"resume": resume, "flags": list(flags)}, **bounds
    )


class TrainConfig(BaseModel):
    """Everything one `surgeon train` run needs; see docs/training.md for the reference.

    `make_config(dict)` / `load_train_config(file, overrides)` validate into one located line per
    problem (a RecipeError); `TrainConfig(...)` itself raises pydantic's ValidationError."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # ---- what to train, on what, where the result goes ----------------------------------------
    diff_dir: str = _field(
        description="The surgeon diff to train (what `surgeon apply` wrote); its manifest names the base.",
        flags=("DIFF_DIR",),
    )
    data: list[str] = _field(
        description="UTF-8 text files, tokenized with the base's tokenizer and packed into seq_len sequences "
        "(each file is one document). All of it is tokenized up front and held in memory.",
        min_length=1,
    )
    out_dir: str = _field(
        description="Where the trained diff is written (atomically).", flags=("-o", "--out")
    )
    base_dir: str | None = _field(
        None,
        "The base checkpoint; default: the one in the diff's manifest (a diff made on another base is "
        "refused).",
        flags=("--base",),
    )
    # ---- the objective --------------------------------------------------------------------
    objective: Literal["auto", "distill", "mlm", "clm"] = _field(
        "auto",
        "distill: match the unpatched base (the teacher) — only meaningful when the diff changes attention; "
        "mlm: masked-LM (bidirectional models); clm: next token (causal models). auto: distill when some "
        "attention module is replaced by an efficient variant, else mlm or clm by the model's kind.",
        resume="same",
    )
    final: Literal["hidden", "pooled", "logits", "none"] = _field(
        "hidden",
        "distill: the final-output term — relative MSE of the last hidden states (hidden), 1 - cosine of "
        "their mean pool (pooled: right for sentence-embedding models), KL of the logits (logits, needs an "
        "LM head), "
        "or none (attention terms only).",
        resume="same",
    )
    final_weight: float = _field(1.0, "distill: weight of the final-output term.", resume="same", ge=0)
    attn_weight: float = _field(
        1.0,
        "distill: weight of the per-layer attention-output terms; 0 matches the final output only "
        "(fewer constraints, but the layers may drift apart).",
        resume="same",
        ge=0,
    )
    layerwise: bool = _field(
        False,
        "distill: feed each patched attention module the teacher's input and match its output there; "
        "layers calibrate independently (a good first stage; final/attn_weight then do not apply).",
        resume="same",
    )
    # ---- the optimisation -----------------------------------------------------------------
    steps: int = _field(
        100,
        "Optimizer steps in total. May grow on --resume (the cosine schedule stretches to the new end).",
        ge=1,
    )
    seq_len: int = _field(
        128,
        "Tokens per packed sequence. Longer sequences exercise long-range attention but cost "
        "memory and time (dense attention grows with its square).",
        resume="same",
        ge=2,
    )
    batch_size: int = _field(
        8,
        "Sequences per step, per process (the global batch is batch_size x processes). Larger batches give "
        "smoother gradients at proportionally more memory.",
        resume="same",
        ge=1,
    )
    lr: float = _field(
        1e-3,
        "Peak AdamW learning rate (linear warm-up, cosine decay to 10 %). LoRA and BitFit tolerate "
        "1e-3..1e-2; full finetuning wants ~1e-5..1e-4.",
        resume="same",
        gt=0,
    )
    warmup: int | None = _field(
        None,
        "Warm-up steps; default: steps/10, at most 100. Longer warm-up is safer for large lr.",
        resume="same",
        ge=0,
    )
    weight_decay: float = _field(
        0.0,
        "AdamW decoupled weight decay (Loshchilov & Hutter 2019). Pulls trained tensors towards 0 — "
        "for LoRA that is towards the base model; 0 leaves them free.",
        resume="same",
        ge=0,
    )
    max_grad_norm: float | None = _field(
        1.0,
        "Clip the global gradient norm to this (0 or null: no clipping). Guards against a bad batch; "
        "a clipped step is smaller than lr says.",
        resume="same",
        ge=0,
    )
    seed: int = _field(
        0,
        "Seeds batch order, masking, dropout and a scaffold head's init: the whole run is a function of it.",
        resume="same",
        ge=0,
        le=SEED_LIMIT,
    )
    dropout: bool | None = _field(
        None,
        "Dropout during training; default: on for mlm/clm (regularises), off for distill (the teacher's "
        "targets are eval-mode outputs, so the student should match them in eval mode).",
        resume="same",
    )
    mixed_precision: Literal["auto", "no", "bf16"] = _field(
        "auto",
        "bf16: forward passes (student and teacher) under bf16 autocast; weights, gradients and "
        "optimizer stay fp32. About 1.5x faster where the device computes bf16 natively (AVX512-BF16/AMX "
        "CPUs, recent GPUs) but ~5x SLOWER where it is emulated (AVX2 CPUs). auto: bf16 only where native; "
        "no: fp32.",
        resume="same",
    )
    gradient_checkpointing: bool = _field(
        False,
        "Recompute each layer's activations in the backward pass instead of keeping them "
        "(transformers' activation checkpointing): activation memory drops from all layers to ~one, "
        "a step costs ~one more forward (~30 % slower). Gradients are unchanged.",
    )
    strategy: Literal["ddp", "fsdp"] = _field(
        "ddp",
        "How several processes share the work: ddp copies the whole model into every process and "
        "averages gradients (one process: plain training); fsdp (2+ processes, safetensors base) shards "
        "every tensor, frozen and trained, across the processes with PyTorch's FSDP2, so each holds "
        "about 1/N of the model, at the cost of gathering each layer's weights for its forward and "
        "backward (more communication per step than ddp).",
        resume="same",
    )
    # ---- checkpoints, stopping, limits ------------------------------------------------------
    save_every: int | None = _field(
        None,
        "Write a resumable checkpoint every K steps to checkpoint_dir (only the newest is kept). "
        "Costs a write of the trained tensors, optimizer state and a diff each time.",
        ge=1,
    )
    resume: bool = _field(
        False, "Continue from the newest checkpoint (bit-exactly: same result as an uninterrupted run)."
    )
    checkpoint_dir: str | None = _field(
        None,
        "Where checkpoints go; default: OUT.checkpoints beside out_dir. Removed when the run succeeds "
        "(only if it holds nothing but surgeon's step checkpoints).",
    )
    time_limit: float | None = _field(
        None,
        "Stop at the first step boundary after this many seconds of training and write the diff; "
        "the learning-rate decay then follows the clock, so such a run is not bit-reproducible.",
        ge=0,
    )
    max_data_mb: float = _field(
        DEFAULT_MAX_DATA_MB,
        "Refuse more than this many MiB of text in total (a bounded read: /dev/zero or a huge file fails "
        "cleanly). Each file is tokenized in one call, which needs ~200 bytes of memory per byte of text "
        "while it runs (16 MiB in one file: 3.2 GB, 110 s with MiniLM's tokenizer); the tokens kept cost "
        "~2.5 bytes per byte. Raise it with memory to match, or split big corpora into several files.",
        gt=0,
        le=1 << 20,  # 1 TiB
    )
    # ---- how the run behaves, not what it computes ----------------------------------------------
    overwrite: bool = _field(
        False,
        "Replace out_dir if it is surgeon's own output (atomically); anything else is refused.",
        flags=("--force",),
    )
    progress: bool = _field(True, "Show a progress bar with the loss.")
    allow_pickle: bool = _field(
        False, "Allow a base with pickle .bin weights (loaded with weights_only=True)."
    )
    trust_base: bool = _field(
        False,
        "Do not check that the base's content is the one the diff was made on (only its tensor names, "
        "dtypes and shapes); a warning says so.",
    )

    _source: str | None = PrivateAttr(None)  # the YAML file it was read from: an input like the data

    @property
    def source(self) -> str | None:
        return self._source

    @pydantic.field_validator("data", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, value):
        if isinstance(value, (str, os.PathLike)):
            return [os.fspath(value)]
        if isinstance(value, tuple):
            return list(value)
        return (
            [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
            if isinstance(value, list)
            else value
        )

    @pydantic.field_validator(*PATH_FIELDS, mode="before")
    @classmethod
    def _path_like(cls, value):
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @pydantic.field_validator("data", *PATH_FIELDS)
    @classmethod
    def _not_empty(cls, value):
        for path in value if isinstance(value, list) else [value]:
            if path is not None and not path.strip():
                raise ValueError("an empty path")
        return value

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.objective in ("mlm", "clm"):
            given = self.distill_settings_given()
            if given:
                raise ValueError(
                    f"{', '.join(given)} only apply to objective distill (objective is {self.objective})"
                )
        if (
            self.objective == "distill"
            and self.final == "none"
            and not self.layerwise
            and self.attn_weight == 0
        ):
            raise ValueError(
                "distill with final: none and attn_weight: 0 compares nothing (its loss is always 0)"
            )
        return self

    # ---- derived -------------------------------------------------------------------------
    def distill_settings_given(self) -> list[str]:
        """The distill-only fields set to something other than their default."""
        fields = type(self).model_fields
        return [name for name in DISTILL_ONLY if getattr(self, name) != fields[name].default]

    def checkpoint_root(self) -> str:
        return self.checkpoint_dir or os.path.abspath(self.out_dir).rstrip(os.sep) + ".checkpoints"

    def clip_norm(self) -> float | None:
        return self.max_grad_norm or None

    def warmup_steps(self) -> int:
        return min(100, max(1, self.steps // 10)) if self.warmup is None else max(1, self.warmup)

    def resume_identity(self, objective: str, precision: str) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint: every field marked
        resume="same", with the objective and precision as resolved (auto → what it chose), and
        the distill-only fields only when distilling."""
        identity = {}
        for name, info in type(self).model_fields.items():
            if info.json_schema_extra["resume"] != "same":
                continue
            if name in DISTILL_ONLY and objective != "distill":
                continue
            identity[name] = getattr(self, name)
        identity["objective"], identity["mixed_precision"] = objective, precision
        return identity


def field_help(name: str) -> str:
    info = TrainConfig.model_fields[name]
    return info.description or ""


def field_flags(name: str) -> tuple[str, ...]:
    """The CLI spelling of a field: its `flags`, or `--field-name`."""
    flags = TrainConfig.model_fields[name].json_schema_extra["flags"]
    return tuple(flags) or ("--" + name.replace("_", "-"),)


def resume_fields() -> list[str]:
    return [n for n, f in TrainConfig.model_fields.items() if f.json_schema_extra["resume"] == "same"]


def make_config(values: dict[str, Any], *, where=None) -> TrainConfig:
    """Validate `values` into a TrainConfig; every problem becomes one located line of a
    RecipeError. `where(field)` names where a value came from (default: "train")."""
    try:
        return TrainConfig.model_validate(values)
    except pydantic.ValidationError as exc:
        raise config_error(exc, values, where) from None


def config_error(exc: pydantic.ValidationError, values: dict[str, Any], where=None) -> RecipeError:
    def place(path) -> str:
        return where(path[0] if path else None) if where else "train"

    problems = validation_problems(exc, (), values, place, lambda path: list(TrainConfig.model_fields))
    return RecipeError([_mention_flags(p) for p in problems])


def _mention_flags(problem: str) -> str:
    # "…: data: List should have at least 1 item" reads better with the CLI spelling beside the key
    problem = problem.replace(": <top>: ", ": ", 1)  # a check across fields has no single key
    for name in TrainConfig.model_fields:
        marker = f": {name}: "
        if marker in problem:
            return problem.replace(marker, f": {name} ({field_flags(name)[-1]}): ", 1)
    return problem


def load_train_config(
    path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """A TrainConfig from a YAML file, with `overrides` (e.g. the command line's options) replacing
    the file's values key by key. Relative paths in the file are relative to the file's directory;
    errors name `file:line` for the file's values and the option for the overrides."""
    overrides = dict(overrides or {})
    if path is None:
        return make_config(overrides, where=lambda name: "train")
    path = os.fspath(path)
    text = read_yaml_text(path, "training config", limit=1 << 20)
    data, lines = load_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            [f"{path}:1: a training config is a mapping of settings (got {type(data).__name__})"]
        )
    directory = os.path.dirname(os.path.abspath(path))
    data = _relative_to(data, directory)

    def where(name) -> str:
        if name in overrides:
            return "command line"
        line = line_of(lines, (name,)) if name in data else None
        return f"{path}:{line}" if line else path

    config = make_config({**data, **overrides}, where=where)
    config._source = os.path.abspath(path)
    return config


def _relative_to(data: dict, directory: str) -> dict:
    """Paths in a config file are relative to the file, as a recipe's `model:` is."""

    def resolve(value):
        return (
            os.path.join(directory, value)
            if isinstance(value, str) and value and not os.path.isabs(value)
            else value
        )

    out = dict(data)
    for name in PATH_FIELDS:
        if name in out:
            out[name] = resolve(out[name])
    if isinstance(out.get("data"), list):
        out["data"] = [resolve(v) for v in out["data"]]
    elif isinstance(out.get("data"), str):
        out["data"] = [resolve(out["data"])]
    return out


def to_yaml(config: TrainConfig) -> str:
    """The config as commented YAML that `load_train_config` reads back: every field, each under
    its description, paths made absolute (a template for `--config`)."""
    import textwrap

    import yaml

    data = config.model_dump()
    for name in PATH_FIELDS:
        if data[name] is not None:
            data[name] = os.path.abspath(data[name])
    data["data"] = [os.path.abspath(p) for p in data["data"]]
    parts = []
    for name, value in data.items():
        comment = textwrap.wrap(field_help(name), 100, initial_indent="# ", subsequent_indent="# ")
        parts.append(
            "\n".join(comment) + "\n" + yaml.safe_dump({name: value}, default_flow_style=False, width=10_000)
        )
    return "\n".join(parts)


__all__ = [
    "FINALS",
    "OBJECTIVES",
    "TrainConfig",
    "field_flags",
    "load_train_config",
    "make_config",
    "resume_fields",
    "to_yaml",
]
