"""What every CLI command shares: one-line errors, no tracebacks for bad input, quiet loading.

Its own module so command files (cli_export, cli_train) can import it without importing cli.py,
which imports them to register their commands.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import warnings

import click

from .errors import Interrupted, SurgeonError

EXIT_BAD_INPUT = 2


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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
