"""What every CLI command shares: one-line errors, no tracebacks for bad input, quiet loading.

Its own module so command files (cli_export, cli_train) can import it without importing cli.py,
which imports them to register their commands.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

import click

from .errors import SurgeonError

EXIT_BAD_INPUT = 2
TRUST_BASE_HELP = (
    "Do not check that the base's content is the one the diff was made on (only its tensor names, "
    "dtypes and shapes); a warning says so."
)


def _fail(message: str) -> None:
    for line in str(message).splitlines() or [""]:
        click.echo(f"surgeon: error: {line}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def friendly(func):
    """Turn user mistakes into one-line errors; keep tracebacks for real bugs."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                result = func(*args, **kwargs)
            for warning in caught:
                if "surgeon" in str(warning.filename) or "matched no module" in str(warning.message):
                    click.echo(f"surgeon: warning: {warning.message}", err=True)
            return result
        except SurgeonError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted; nothing was written")

    return wrapper


def quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
