"""What every CLI command shares: one-line errors (its own and click's usage errors), no tracebacks
for bad input, quiet loading, the MODEL_DIR argument type.

Its own module so command files (cli_export, cli_train) can import it without importing cli.py,
which imports them to register their commands.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import warnings

import click

from .errors import Interrupted, SurgeonError
from .modelpath import resolve_model_path

EXIT_BAD_INPUT = 2
TRUST_BASE_HELP = (
    "Do not check that the base's content is the one the diff was made on (only its tensor names, "
    "dtypes and shapes); a warning says so."
)


def exit_code(signal_number: int) -> int:
    """A command stopped by a signal exits 128 + its number (SIGINT 130, SIGTERM 143), as a shell
    reports a process that signal killed; every surgeon command does the same."""
    return 128 + signal_number


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that atomic writers clean up."""

    signal_number = signal.SIGTERM


@contextlib.contextmanager
def _sigterm_raises():
    def handler(number, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    for line in str(message).splitlines() or [""]:
        click.echo(f"surgeon: error: {line}", err=True)
    sys.exit(code)


def friendly(func):
    """Turn user mistakes into one-line errors; keep tracebacks for real bugs."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings(record=True) as caught, _sigterm_raises():
                warnings.simplefilter("always", UserWarning)
                result = func(*args, **kwargs)
            for warning in caught:
                if "surgeon" in str(warning.filename) or "matched no module" in str(warning.message):
                    click.echo(f"surgeon: warning: {warning.message}", err=True)
            return result
        except Interrupted as exc:  # e.g. train: stopped at a step boundary, says how to resume
            _fail(str(exc), exit_code(exc.signal_number))
        except SurgeonError as exc:
            _fail(str(exc))
        except KeyboardInterrupt as exc:
            number = getattr(exc, "signal_number", signal.SIGINT)
            _fail(f"interrupted by {signal.Signals(number).name}; nothing was written", exit_code(number))

    return wrapper


def quiet_transformers() -> None:
    """Offline, errors only, and no transformers progress bars ("Loading weights" on every load):
    a command shows surgeon's own bars (export, train) and nothing else."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # transformers imports torchao whenever it is installed (the quant extra); its CPU wheel logs a
    # warning for each CUDA-only extension it cannot load, and torch one for each enum it registers
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class ModelDir(click.ParamType):
    """A model directory argument: a path, or `package:<package>/<subdir>` (surgeon.modelpath)."""

    name = "model_dir"

    def convert(self, value, param, ctx):
        try:
            return resolve_model_path(value)
        except SurgeonError as exc:
            self.fail(str(exc), param, ctx)


MODEL_DIR = ModelDir()


def usage_error_line(exc: click.ClickException) -> str:
    """click's usage error as one line: the command, what is wrong, where to look."""
    message = " ".join(exc.format_message().split())
    context = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and context is not None:
        return f"{context.command_path}: {message.rstrip('.')} (see {context.command_path} --help)"
    return message


class SurgeonGroup(click.Group):
    """The command group: click's own errors (missing argument, bad option value, unknown command)
    print as `surgeon: error: …` on one line and exit 2, like surgeon's errors."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            click.echo(f"surgeon: error: {usage_error_line(exc)}", err=True)
            sys.exit(EXIT_BAD_INPUT if isinstance(exc, click.UsageError) else exc.exit_code)
        except click.Abort:
            _fail("interrupted; nothing was written")
        if not standalone_mode:
            return result
        # non-standalone click returns --help's / --version's exit code as the result
        sys.exit(result if isinstance(result, int) else 0)
