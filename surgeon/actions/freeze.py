"""`freeze` / `unfreeze`: set requires_grad on every parameter of the selected modules.

"Freeze the first N layers" is `base: trainable` + `freeze` on `{role: layer, layers: ":N"}`,
or `base: frozen` + `unfreeze` on `{role: layer, layers: "N:"}`.
"""

from __future__ import annotations

from .base import Action


class Freeze(Action):
    name = "freeze"
    summary = "make every parameter of the selected modules frozen"

    def apply(self, target, params, ctx) -> None:
        ctx.set_trainable(target.module, False)


class Unfreeze(Action):
    name = "unfreeze"
    summary = "make every parameter of the selected modules trainable"

    def apply(self, target, params, ctx) -> None:
        ctx.set_trainable(target.module, True)
