"""`surgeon.load`: a patched model from a diff (on its base) or from a `--format surgeon` export."""

from __future__ import annotations

from . import diff
from .export.self_contained import is_self_contained, load_self_contained


def load(base_dir: str | None, diff_dir: str | None = None, *, allow_pickle: bool = False, trust_base: bool = False):
    """`load(base, diff)`: the base with the diff applied (`surgeon.diff.load`); `load(diff)` or
    `load(None, diff)`: the same on the base the manifest records; `load(export)`: the model of a
    self-contained `surgeon export --format surgeon` directory (no base needed).

    The base must be the one the diff was made on, tensor for tensor; `trust_base=True` checks
    only its tensor names, dtypes and shapes, and warns."""
    if diff_dir is None:
        if base_dir is not None and is_self_contained(base_dir):
            return load_self_contained(base_dir)
        return diff.load(None, base_dir, allow_pickle=allow_pickle, trust_base=trust_base)
    return diff.load(base_dir, diff_dir, allow_pickle=allow_pickle, trust_base=trust_base)
