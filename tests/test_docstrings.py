"""surgeon.docstrings: the offline real-text source the examples and benchmarks share."""

from __future__ import annotations

import inspect
import textwrap

from surgeon.docstrings import docstrings, package_modules, stdlib_modules


def test_defaults_are_the_modules_own_public_api_deduplicated():
    docs = docstrings(["textwrap", "textwrap"])
    assert inspect.getdoc(textwrap) not in docs  # "Text wrapping and filling.": 40 characters or fewer
    assert docstrings(["textwrap"], min_length=0)[0] == inspect.getdoc(textwrap)
    assert inspect.getdoc(textwrap.TextWrapper) in docs and inspect.getdoc(textwrap.TextWrapper.wrap) in docs
    assert len(docs) == len(set(docs)) and all(len(d) > 40 for d in docs)


def test_options_narrow_or_widen_the_walk():
    assert docstrings(["textwrap"], kinds=(inspect.isclass,), members=None, min_length=0) == [
        inspect.getdoc(textwrap), inspect.getdoc(textwrap.TextWrapper)]
    import os
    import shutil

    assert inspect.getdoc(os) not in docstrings(["shutil"])  # shutil imports os: not its own
    assert inspect.getdoc(os) in docstrings(["shutil"], own=False)
    assert inspect.getdoc(shutil) in docstrings(["shutil"], own=False)
    short = docstrings(["textwrap"], min_length=0, unique=False)
    assert len(short) >= len(docstrings(["textwrap"]))


def test_modules_that_do_not_import_are_skipped():
    assert docstrings(["surgeon_no_such_module", "textwrap"]) == docstrings(["textwrap"])


def test_module_lists():
    assert "email.message" in package_modules("email") and "email" not in package_modules("email")
    assert not any("test" in name for name in package_modules("unittest"))
    names = stdlib_modules(skip={"json"})
    assert "textwrap" in names and "json" not in names and not any(n.startswith("_") for n in names)
