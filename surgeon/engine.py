"""Apply a recipe to a model: resolve every rule's targets and check them all, then act."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

from . import registry
from .context import SurgeryContext
from .errors import SurgeonError
from .ledger import Ledger, RuleRecord
from .modelmap import ModelMap, Target
from .recipe import Recipe, RuleSpec, load_recipe

SURGERY_ATTR = "_surgeon_surgery"


@dataclass
class Surgery:
    """What `patch` did to one model: the ledger, the recipes applied, warnings."""

    model: nn.Module
    ledger: Ledger
    recipes: list[Recipe] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    applied: set = field(default_factory=set)  # rule identities, to refuse re-application

    @property
    def rules(self) -> list[RuleRecord]:
        return self.ledger.rules

    def report(self, seq_len: int | None = None, *, world_size: int = 1, strategy: str = "ddp"):
        from .report import build_report

        return build_report(self, seq_len=seq_len, world_size=world_size, strategy=strategy)


def surgery_of(model: nn.Module) -> Surgery | None:
    return getattr(model, SURGERY_ATTR, None)


def patch(model: nn.Module, recipe: Recipe | dict | str) -> Surgery:
    """Apply `recipe` to `model` in place and return the record of what changed.

    Every rule's selector is resolved and every target checked by its action before any
    weight is touched. Applying a rule that was already applied to this model is an error.
    """
    recipe = load_recipe(recipe)
    surgery = surgery_of(model)
    first = surgery is None
    if first:
        surgery = Surgery(model, Ledger(model))
    elif surgery.recipes and recipe.base != surgery.recipes[0].base:
        raise SurgeonError(
            f"{recipe.source}: base: {recipe.base} conflicts with the earlier recipe's "
            f"base: {surgery.recipes[0].base} on this model"
        )
    for rule in recipe.rules:
        if rule.key() in surgery.applied:
            raise SurgeonError(
                f"{_where(recipe, rule)}: rule {rule.index + 1} (do: {rule.do}) was already applied "
                "to this model; patching twice with the same rule would inject twice"
            )
    model_map = ModelMap(model)
    ctx = SurgeryContext(model, model_map, surgery.ledger, surgery.warnings)
    ctx.base = recipe.base if first else None  # None: trainability is what earlier patches left
    plan = _plan(recipe, model_map, ctx, surgery)

    if first:
        for param in model.parameters():
            ctx.set_trainable(param, recipe.base == "trainable")
    for rule, action, targets in plan:
        ctx.rule = RuleRecord(
            rule.index, rule.do, rule.select.describe(), rule.params.model_dump(mode="json"),
            rule.line, recipe.source, [t.display for t in targets],
        )  # fmt: skip
        surgery.ledger.rules.append(ctx.rule)
        ctx.state = {}
        for target in targets:
            action.apply(target, rule.params, ctx)
        action.finish(targets, rule.params, ctx)
        surgery.applied.add(rule.key())
    ctx.rule = None
    surgery.recipes.append(recipe)
    setattr(model, SURGERY_ATTR, surgery)
    surgery.ledger.check_consistent(model)
    return surgery


def _plan(recipe: Recipe, model_map: ModelMap, ctx: SurgeryContext, surgery: Surgery):
    problems: list[str] = []
    plan = []
    ctx.planned = plan  # grows rule by rule: a check sees the rules before its own
    for rule in recipe.rules:
        action = registry.get(rule.do).action_class()
        targets = model_map.select(rule.select)
        where = _where(recipe, rule)
        if not targets:
            message = f"{where}: rule {rule.index + 1} (do: {rule.do}): selector {{{rule.select.describe()}}} matched no module"
            if rule.on_empty == "error":
                problems.append(message + " (set on_empty: warn to allow this)")
            elif rule.on_empty == "warn":
                surgery.warnings.append(message)
                warnings.warn(message, stacklevel=3)
        failures: list[tuple[Target, str]] = []
        for target in targets:
            try:
                if target.fused is not None and not action.accepts_slices:
                    raise SurgeonError(
                        f"{rule.do} cannot act on a slice of the fused projection "
                        f"{target.path} ({target.class_name}, {'/'.join(sorted(target.roles))}); "
                        "select the whole module instead (e.g. role: attn)"
                    )
                action.check(target, rule.params, ctx)
            except SurgeonError as exc:
                failures.append((target, str(exc)))
        problems += [f"{where}: rule {rule.index + 1} (do: {rule.do}): {line}" for line in _collapse(failures)]
        if targets:
            try:
                action.check_rule(targets, rule.params, ctx)
            except SurgeonError as exc:
                problems.append(f"{where}: rule {rule.index + 1} (do: {rule.do}): {exc}")
        plan.append((rule, action, targets))
    if problems:
        raise SurgeonError("\n".join(_dedupe(problems)))
    return plan


def _dedupe(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def _collapse(failures: list[tuple[Target, str]]) -> list[str]:
    """One line per distinct problem of a rule: messages that differ only in the module they
    name (one per layer of an 80-layer model) are shown once, for the first module, with a
    count of the others."""
    groups: dict[str, list[Target]] = {}
    first: dict[str, str] = {}
    for target, message in failures:
        shape = message.replace(target.path, "\0") if target.path else message
        groups.setdefault(shape, []).append(target)
        first.setdefault(shape, message)
    lines = []
    for shape, targets in groups.items():
        line = first[shape]
        if len(targets) > 1:
            layers = [t.layer for t in targets]
            distinct = None not in layers and len({(ref.stack, ref.index) for ref in layers}) == len(layers)
            more = len(targets) - 1
            line += f" (and {more} more {'layer' if distinct else 'module'}{'s' if more > 1 else ''})"
        lines.append(line)
    return lines


def _where(recipe: Recipe, rule: RuleSpec) -> str:
    return f"{recipe.source}:{rule.line}" if rule.line else recipe.source
