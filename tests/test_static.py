"""Code the tests never run — benchmarks, examples' full-size paths — is checked statically for
syntax errors and undefined names (ruff's E9/F63/F7/F82). A benchmark once reached main raising
NameError in its cross-check; nothing else would have caught it."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_syntax_errors_or_undefined_names():
    import ruff  # noqa: F401  (a test dependency: fail, don't skip, when it is missing)

    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
         "--select", "E9,F63,F7,F82", "surgeon", "benchmarks", "examples", "tests"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
