"""The recipes shipped inside the package (`surgeon/recipes/*.yaml`), addressed as `recipes:NAME`.

`surgeon apply recipes:longformer-4096 MODEL_DIR -o OUT` and `surgeon.load_recipe("recipes:lora-llama")`
read the installed copy, so they work from any directory and from a wheel; `surgeon recipes`
lists them. The repository's `recipes/` is a link to the same directory (no second copy).
"""

from __future__ import annotations

import difflib
import os

from .errors import SurgeonError

LIBRARY_PREFIX = "recipes:"
LIBRARY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
SUFFIX = ".yaml"


def is_library_name(source: str) -> bool:
    return isinstance(source, str) and source.startswith(LIBRARY_PREFIX)


def names() -> list[str]:
    """Every shipped recipe's name (its file name without `.yaml`), sorted."""
    if not os.path.isdir(LIBRARY_DIR):
        return []
    return sorted(f[: -len(SUFFIX)] for f in os.listdir(LIBRARY_DIR) if f.endswith(SUFFIX))


def path_of(source: str) -> str:
    """The file behind `recipes:NAME`; an unknown name is an error with the closest names."""
    name = source[len(LIBRARY_PREFIX) :] if is_library_name(source) else source
    name = name.removesuffix(SUFFIX)
    known = names()
    if name in known:
        return os.path.join(LIBRARY_DIR, name + SUFFIX)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" (did you mean {LIBRARY_PREFIX}{close[0]}?)" if close else ""
    raise SurgeonError(f"{LIBRARY_PREFIX}{name}: no such shipped recipe{hint}; `surgeon recipes` lists them")


def suggestion_for_missing_file(path: str) -> str:
    """For a recipe path that does not exist: a hint if it looks like a shipped recipe's name."""
    stem = os.path.basename(path).removesuffix(SUFFIX)
    known = names()
    if stem in known:
        return f" (the shipped recipe is {LIBRARY_PREFIX}{stem})"
    close = difflib.get_close_matches(stem, known, n=1, cutoff=0.75)
    return f" (did you mean {LIBRARY_PREFIX}{close[0]}?)" if close and os.sep not in path else ""
