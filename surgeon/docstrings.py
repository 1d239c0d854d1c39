"""Real English text with no network: the docstrings of installed Python modules.

The examples and benchmarks need prose a language model has not been tuned on and that every
machine running surgeon has — the standard library's docstrings are that (and those of torch,
transformers … where a benchmark wants more). This module is what they share: which modules to
read (`stdlib_modules`, `package_modules`) and the walk over a module's documented objects
(`docstrings`). It lives in the package so that scripts run from any directory import it
without path manipulation; it imports nothing but the standard library.

Each caller states its text by the options it passes; the defaults are the public API a module
defines itself, methods and properties included, deduplicated, docstrings over 40 characters.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import pkgutil
import sys
import warnings
from collections.abc import Iterable
from types import ModuleType

# Never imported by stdlib_modules: GUI, platform-only, deprecated or side-effect modules.
STDLIB_SKIP = frozenset({
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "msilib", "msvcrt", "nt", "winreg", "winsound",
    "ossaudiodev", "spwd", "nis", "crypt", "lib2to3", "distutils", "ensurepip", "pydoc_data", "encodings", "venv",
    "sre_compile", "sre_constants", "sre_parse", "asynchat", "asyncore", "smtpd", "imp",
})  # fmt: skip

METHOD_KINDS = (property, classmethod, staticmethod)


def try_import(name: str) -> ModuleType | None:
    """The module, or None where it does not import here (platform-only modules, optional C
    extensions, SystemExit on import); its import-time output and warnings are swallowed."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:
            return None


def stdlib_modules(skip: Iterable[str] = STDLIB_SKIP) -> list[str]:
    """Top-level standard-library modules (sys.stdlib_module_names), public ones, minus `skip`."""
    skip = frozenset(skip)
    return [n for n in sorted(sys.stdlib_module_names) if not n.startswith("_") and n not in skip]


def package_modules(package: str, exclude: Iterable[str] = ("test", "__main__")) -> list[str]:
    """The submodules of `package` (recursively, not the package itself), minus those whose
    name contains any of `exclude`."""
    path = getattr(try_import(package), "__path__", [])
    return [m.name for m in pkgutil.walk_packages(path, package + ".") if not any(x in m.name for x in exclude)]


def docstrings(
    modules: Iterable[str],
    *,
    # True: only objects the module defines (their __module__ is the module); False: every name
    # it offers (dir(module), which includes what it imports and names it loads lazily)
    own: bool = True,
    private: bool = False,  # also objects whose name starts with "_"
    kinds: tuple = (),  # only objects passing one of these inspect predicates (e.g. inspect.isclass); () = any
    members: tuple | None = (inspect.isfunction, *METHOD_KINDS),  # public class members read; None: none
    min_length: int = 40,  # docstrings of at most this many characters are left out
    unique: bool = True,  # each distinct docstring once
) -> list[str]:
    """The docstrings (`inspect.getdoc`) of `modules` and their objects, in order: per module
    its own docstring, its objects by name, then the members of its classes (class by class,
    members by name). Modules that do not import here are skipped."""
    seen, out = set(), []
    for name in modules:
        module = try_import(name)
        if module is None:
            continue
        names = sorted(vars(module)) if own else dir(module)
        objects = [module] + [
            value for key, value in ((key, getattr(module, key, None)) for key in names)
            if (private or not key.startswith("_"))
            and (not own or getattr(value, "__module__", None) == module.__name__)
            and (not kinds or any(kind(value) for kind in kinds))
        ]  # fmt: skip
        if members is not None:
            for cls in [o for o in objects if inspect.isclass(o)]:
                objects += [v for k, v in sorted(vars(cls).items())
                            if not k.startswith("_") and any(_is(v, kind) for kind in members)]  # fmt: skip
        for obj in objects:
            doc = inspect.getdoc(obj)
            if not doc or len(doc) <= min_length or (unique and doc in seen):
                continue
            seen.add(doc)
            out.append(doc)
    return out


def _is(value, kind) -> bool:
    return isinstance(value, kind) if isinstance(kind, type) else kind(value)
