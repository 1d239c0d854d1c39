"""An example third-party action, `scale_init`: multiply the selected modules' weights by a
factor in place, and make them trainable. It shows the whole plugin surface: a name, a typed
parameter model, a check, and an apply that goes through the SurgeryContext.

    pip install -e examples/surgeon-plugin-example
    surgeon actions          # lists scale_init [surgeon-plugin-example (...)]
"""

from __future__ import annotations

import pydantic
import torch

from surgeon.actions.base import Action, params_config
from surgeon.errors import SurgeonError


class ScaleInitParams(pydantic.BaseModel):
    model_config = params_config()
    factor: float = pydantic.Field(gt=0, description="multiply weights by this")


class ScaleInit(Action):
    name = "scale_init"
    Params = ScaleInitParams
    summary = "scale the selected modules' weights and train them (example plugin)"

    def check(self, target, params, ctx) -> None:
        if getattr(target.module, "weight", None) is None:
            raise SurgeonError(f"scale_init: {target.display} ({target.class_name}) has no weight")

    def apply(self, target, params, ctx) -> None:
        with torch.no_grad():
            target.module.weight.mul_(params.factor)
        ctx.set_trainable(target.module.weight, True)
        ctx.note(f"{target.display}.weight scaled by {params.factor}")
