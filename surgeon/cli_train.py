"""`surgeon train`: options built from `TrainConfig`'s fields, `--config FILE`, render.

One option per config field (its description is the help, its bounds are checked by the
config), so a new setting is one new field. Runs as one process by default; under
`accelerate launch --multi_gpu --num_processes N …` the same command runs data-parallel
(CPU: gloo). Only rank 0 prints and writes.
"""

from __future__ import annotations

import types
import typing
import warnings

import click

from .cli_common import friendly, quiet_transformers
from .train.config import TrainConfig, field_flags, load_train_config, to_yaml

# fields that are not plain options: DIFF_DIR is the argument, data takes several paths
_ARGUMENT, _GREEDY = "diff_dir", "data"


def _unwrap(annotation):
    """`int | None` -> int; Literal and list stay as they are."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _option(name: str, info) -> click.Option:
    kind = _unwrap(info.annotation)
    flags = list(field_flags(name))
    default = info.default
    shown = (
        ""
        if default is None or info.is_required()
        else f" [default: {str(default).lower() if isinstance(default, bool) else default}]"
    )
    help_text = (info.description or "") + shown
    if kind is bool:
        long = flags[-1]
        return click.Option([f"{long}/--no-{long[2:]}", name], default=None, help=help_text)
    if typing.get_origin(kind) is typing.Literal:
        return click.Option(
            [*flags, name], type=click.Choice(typing.get_args(kind)), default=None, help=help_text
        )
    if typing.get_origin(kind) is list:
        return click.Option([*flags, name], multiple=True, metavar="FILE [FILE …]", help=help_text)
    click_type = {int: int, float: float, str: click.Path()}.get(kind, str)
    return click.Option([*flags, name], type=click_type, default=None, help=help_text)


def _greedy(args: list[str], flag: str) -> list[str]:
    """`--data a.txt b.txt -o OUT` -> `--data a.txt --data b.txt -o OUT`: the paths after one
    `--data`, up to the next option, are all data files (a click option takes one value)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        out.append(arg)
        i += 1
        if arg == flag or arg.startswith(flag + "="):
            if arg == flag and i < len(args):
                out.append(args[i])  # its first value, verbatim (it may start with "-")
                i += 1
            while i < len(args) and not args[i].startswith("-"):
                out.extend([flag, args[i]])
                i += 1
    return out


class _TrainCommand(click.Command):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, _greedy(list(args), "--data"))


def _params() -> list[click.Parameter]:
    params: list[click.Parameter] = [
        click.Argument([_ARGUMENT], required=False, type=click.Path(file_okay=False))
    ]
    params.append(
        click.Option(
            ["--config", "config_file"],
            type=click.Path(dir_okay=False),
            metavar="FILE",
            help="A training config (YAML, keys = the long option names with _: "
            "seq_len: 256). Options given here override its values; --data "
            "replaces its list. Relative paths in it are relative to the file.",
        )
    )
    for name, info in TrainConfig.model_fields.items():
        if name != _ARGUMENT:
            params.append(_option(name, info))
    params.append(
        click.Option(
            ["--print-config"],
            is_flag=True,
            help="Print the resolved config as YAML (a --config template) and exit.",
        )
    )
    return params


def _train(diff_dir, config_file, print_config, **options):
    """Train the trainable tensors of the patched model in DIFF_DIR; write the trained diff to OUT.

    DATA files follow one --data (--data a.txt b.txt) or repeat it. The objective defaults to auto:
    distill where the diff replaces attention, else mlm (bidirectional) or clm (causal).
    Checkpoints (--save-every K) go to OUT.checkpoints/ and that directory is removed when the
    run succeeds (only if it holds nothing but surgeon's step checkpoints). Ctrl-C / SIGTERM stop
    at a step boundary (exit 130 / 143); --resume continues bit-exactly.
    """
    overrides = {name: value for name, value in options.items() if value is not None and value != ()}
    if "data" in overrides:
        overrides["data"] = list(overrides["data"])
    if diff_dir is not None:
        overrides[_ARGUMENT] = diff_dir
    config = load_train_config(config_file, overrides)
    if print_config:
        click.echo(to_yaml(config), nl=False)
        return
    quiet_transformers()
    from .train.trainer import Trainer

    trainer = Trainer(config)
    with _warnings_now():
        trainer.setup()
        if trainer.main and trainer.objective_reason:
            click.echo(
                f"surgeon: train: objective {trainer.objective} (auto: {trainer.objective_reason})", err=True
            )
        result = trainer.train()
    if trainer.main:
        for note in result.notes:
            click.echo(f"surgeon: warning: train: {note}", err=True)
        last = f"{result.losses[-1]:.4g}" if result.losses else "n/a"
        end = result.steps if result.stopped_at is None else result.stopped_at
        click.echo(
            f"trained {result.trainable:,} parameters for steps {result.start_step + 1}–{end} "
            f"({result.objective}); final loss {last}; wrote {result.out_dir}"
        )


class _warnings_now(warnings.catch_warnings):
    """surgeon's warnings during a run print when they happen, not after it (a run takes hours)."""

    def __enter__(self):
        outer = warnings.showwarning
        super().__enter__()

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, UserWarning) and "surgeon" in str(filename):
                click.echo(f"surgeon: warning: {message}", err=True)
            else:
                outer(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        return self


train_cmd = _TrainCommand("train", callback=friendly(_train), params=_params(), help=_train.__doc__)

__all__ = ["train_cmd"]
