"""`freeze` / `unfreeze`: set requires_grad on every parameter of the selected modules.

"Freeze the first N layers" is `base: trainable` + `freeze` on `{role: layer, layers: ":N"}`,
or `base: frozen` + `unfreeze` on `{role: layer, layers: "N:"}`.
"""

from __future__ import annotations

from ..errors import SurgeonError
from .base import Action
from .quantize import planned_or_quantized


class Freeze(Action):
    name = "freeze"
    summary = "make every parameter of the selected modules frozen"

    def apply(self, target, params, ctx) -> None:
        ctx.set_trainable(target.module, False)


class Unfreeze(Action):
    name = "unfreeze"
    summary = "make every parameter of the selected modules trainable"

    def check(self, target, params, ctx) -> None:
        for local, param in target.module.named_parameters():
            name = f"{target.path}.{local}" if target.path else local
            if planned_or_quantized(param, name, ctx):
                raise SurgeonError(
                    f"unfreeze: {target.display} holds {name}, which is stored quantised and cannot be "
                    "trained; select the modules to train without it (or train it through LoRA)"
                )

    def apply(self, target, params, ctx) -> None:
        ctx.set_trainable(target.module, True)
