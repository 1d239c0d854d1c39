"""What an action is: a name, a typed parameter model, a check and an apply.

Built-in actions and third-party plugins are the same kind of object and register the same
way (see `surgeon.registry`). An action never edits bookkeeping itself: it calls the
`SurgeryContext` methods, which change the model *and* record the change in the ledger, so the
report and the diff (which both read the ledger) cannot disagree with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import pydantic

if TYPE_CHECKING:
    from ..context import SurgeryContext
    from ..modelmap import Target


class NoParams(pydantic.BaseModel):
    """`with:` for actions that take no parameters."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)


def params_config(**extra) -> pydantic.ConfigDict:
    """The config every action's parameter model should use: unknown keys and silent
    coercions (e.g. the string "8" for an int) are errors."""
    return pydantic.ConfigDict(extra="forbid", strict=True, **extra)


class Action:
    """Base for actions. Subclasses set `name`, `Params`, and implement `apply`.

    - `name`: the recipe's `do:` value.
    - `Params`: a pydantic model for `with:`; use `model_config = params_config()`.
    - `accepts_slices`: whether the action can act on a slice of a fused projection
      (GPT-2 `c_attn` for `attn.q`); if False the engine refuses slice targets with a message
      naming the module and the role.
    - `check(target, params, ctx)`: raise `SurgeonError` if this target can't take this action.
      Called for every rule and target *before* any rule is applied.
    - `check_rule(targets, params, ctx)`: optional, once per rule before anything is applied,
      for conditions on the whole selection (e.g. BitFit: at least one bias among them).
    - `apply(target, params, ctx)`: change the model through `ctx`.
    - `finish(targets, params, ctx)`: optional, once per rule after all targets (e.g. sharing
      one tensor across layers).
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[pydantic.BaseModel]] = NoParams
    accepts_slices: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    def check(self, target: Target, params: pydantic.BaseModel, ctx: SurgeryContext) -> None:
        return None

    def check_rule(
        self, targets: list[Target], params: pydantic.BaseModel, ctx: SurgeryContext
    ) -> None:
        return None

    def apply(self, target: Target, params: pydantic.BaseModel, ctx: SurgeryContext) -> None:
        raise NotImplementedError

    def finish(
        self, targets: list[Target], params: pydantic.BaseModel, ctx: SurgeryContext
    ) -> None:
        return None


@dataclass(frozen=True)
class ActionInfo:
    """A registered action and where it came from (for duplicate-name errors)."""

    name: str
    action_class: type[Action]
    origin: str  # "<distribution> (<entry point value>)"
