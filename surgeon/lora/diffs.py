"""One diff per named adapter: `save_adapter_diff(model, out_dir, "task_a")`.

A model may carry several named adapters (one per task). This writes a diff holding only the
chosen adapters' tensors (plus everything not owned by a named adapter, e.g. BitFit biases),
with recipes from which the other adapters' rules are removed, so `surgeon.load(base, out_dir)`
rebuilds exactly that adapter. It reuses `surgeon.diff.save_diff` on a filtered view of the
surgery record; the live model is left as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import re

from ..errors import SurgeonError

ADAPTER_ACTIONS = ("lora", "adapter")
_OWNER = re.compile(r"(?:^|\.)(?:surgeon_lora|surgeon_adapter)\.([^.]+)\.")


def adapter_of(name: str) -> str | None:
    """The adapter owning parameter `name` (…surgeon_lora.<adapter>.…), or None."""
    match = _OWNER.search(name)
    return match.group(1) if match else None


def adds_other_adapter(do: str, params: dict, adapters: list[str]) -> bool:
    """Whether a rule (its action, its `with`) adds an adapter not in `adapters`."""
    return do in ADAPTER_ACTIONS and params.get("name", "default") not in adapters


def filter_recipe_data(data: dict, adapters: list[str]) -> dict | None:
    """The recipe without the rules adding other adapters; None if no rule is left."""
    rules = [r for r in data.get("rules", []) if not adds_other_adapter(r.get("do"), r.get("with") or {}, adapters)]
    if not rules:
        return None
    out = dict(data)
    out["rules"] = rules
    return out


def save_adapter_diff(
    model, out_dir: str, adapters, *, base_dir: str | None = None, overwrite: bool = False
) -> dict:
    """Write a diff with only `adapters` (a name or a list of names); return its manifest."""
    from .. import diff
    from ..adapters.switch import adapter_names
    from ..engine import SURGERY_ATTR, surgery_of
    from ..recipe import load_recipe

    adapters = [adapters] if isinstance(adapters, str) else list(adapters)
    surgery = surgery_of(model)
    if surgery is None:
        raise SurgeonError("this model has not been patched by surgeon: nothing to save")
    known = adapter_names(model)
    unknown = [a for a in adapters if a not in known]
    if unknown:
        raise SurgeonError(
            f"no adapter named '{unknown[0]}' on this model (adapters: {', '.join(known) or 'none'})"
        )
    recipes = []
    for recipe in surgery.recipes:
        data = filter_recipe_data(recipe.data, adapters)
        if data is not None:
            kept = load_recipe(data)
            kept.source = recipe.source
            recipes.append(kept)
    owned = set(surgery.ledger.trainable) | set(surgery.ledger.added)
    dropped = {n for n in owned if adapter_of(n) not in (None, *adapters)}
    ledger = copy.copy(surgery.ledger)
    ledger.trainable = {n: v for n, v in ledger.trainable.items() if n not in dropped}
    ledger.added = {n: v for n, v in ledger.added.items() if n not in dropped}
    # the rules the filtered recipes still hold: the manifest records their resolved parameters
    ledger.rules = [r for r in ledger.rules if not adds_other_adapter(r.action, r.params, adapters)]
    view = dataclasses.replace(surgery, ledger=ledger, recipes=recipes)
    params = dict(model.named_parameters())
    flipped = [params[n] for n in dropped if n in params and params[n].requires_grad]
    try:
        for param in flipped:  # the filtered ledger checks requires_grad against itself
            param.requires_grad_(False)
        setattr(model, SURGERY_ATTR, view)
        return diff.save_diff(model, out_dir, base_dir=base_dir, overwrite=overwrite)
    finally:
        setattr(model, SURGERY_ATTR, surgery)
        for param in flipped:
            param.requires_grad_(True)
