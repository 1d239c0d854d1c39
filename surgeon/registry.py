"""The action registry: every action, built-in or third-party, comes from entry points.

Built-ins are declared in surgeon's own pyproject under the entry-point group
`surgeon.actions`, exactly as a plugin package declares its own. Names are read from package
metadata without importing anything; an action's code is imported the first time a recipe uses
it. A name offered by two distributions is an error naming both; a plugin that fails to import
is reported with its origin and the import error, never skipped silently.
"""

from __future__ import annotations

import difflib
import functools
from importlib import metadata

from .actions.base import Action, ActionInfo
from .errors import SurgeonError

GROUP = "surgeon.actions"


def _origin(ep: metadata.EntryPoint) -> str:
    dist = ep.dist.name if ep.dist is not None else "unknown distribution"
    return f"{dist} ({ep.value})"


@functools.lru_cache(maxsize=1)
def entry_points() -> dict[str, metadata.EntryPoint]:
    """Action name -> entry point, without importing any action."""
    found: dict[str, metadata.EntryPoint] = {}
    problems = []
    seen_values: dict[str, str] = {}
    for ep in metadata.entry_points(group=GROUP):
        if ep.name in found:
            # The same distribution seen twice on sys.path (e.g. an editable install and a
            # build dir) offers the same object: that is not a conflict.
            if seen_values[ep.name] == ep.value and _dist_name(ep) == _dist_name(found[ep.name]):
                continue
            problems.append(
                f"action '{ep.name}' is defined twice: by {_origin(found[ep.name])} "
                f"and by {_origin(ep)}"
            )
            continue
        found[ep.name] = ep
        seen_values[ep.name] = ep.value
    if problems:
        raise SurgeonError("; ".join(problems))
    if not found:
        raise SurgeonError(
            "no actions are registered: surgeon's package metadata is missing "
            "(install it with `pip install -e .`, not by putting the source on sys.path)"
        )
    return found


def _dist_name(ep: metadata.EntryPoint) -> str | None:
    return ep.dist.name if ep.dist is not None else None


def names() -> list[str]:
    return sorted(entry_points())


@functools.lru_cache(maxsize=None)
def get(name: str) -> ActionInfo:
    """Import and return one action; unknown names get a did-you-mean."""
    eps = entry_points()
    if name not in eps:
        raise SurgeonError(unknown_action_message(name))
    ep = eps[name]
    try:
        obj = ep.load()
    except Exception as exc:  # a broken plugin: say which one and why
        raise SurgeonError(
            f"action '{name}' from {_origin(ep)} failed to load: {type(exc).__name__}: {exc}"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, Action)):
        raise SurgeonError(
            f"action '{name}' from {_origin(ep)} is not a surgeon Action subclass"
        )
    if obj.name != name:
        raise SurgeonError(
            f"action '{name}' from {_origin(ep)} declares name '{obj.name}'; they must agree"
        )
    return ActionInfo(name, obj, _origin(ep))


def load_all() -> tuple[list[ActionInfo], list[str]]:
    """Every action that loads, and one message per plugin that doesn't."""
    loaded, broken = [], []
    for name in names():
        try:
            loaded.append(get(name))
        except SurgeonError as exc:
            broken.append(str(exc))
    return loaded, broken


def unknown_action_message(name: str) -> str:
    known = names()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown action '{name}'{hint}; known actions: {', '.join(known)}"


def reset() -> None:
    """Forget cached entry points (tests that add plugin distributions to sys.path)."""
    entry_points.cache_clear()
    get.cache_clear()
