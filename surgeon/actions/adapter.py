"""`adapter`: Houlsby bottleneck adapters after the attention output and the MLP output.

    - do: adapter
      select: {role: layer}
      with: {reduction_factor: 16, activation: relu, placement: [attn, mlp]}

A selected layer (or attention / MLP module) gets one adapter on the output of its `attn.o`
projection and one on its `mlp.down` projection, as `placement` says; selecting those
projections directly works too. See `surgeon.adapters.bottleneck` for the math.
"""

from __future__ import annotations

import re
from typing import Literal

import pydantic
from pydantic import Field

from ..adapters.bottleneck import ACTIVATIONS, Bottleneck, BottleneckHost
from ..errors import SurgeonError
from .base import Action, params_config
from .limits import Width
from .lora import dims, module_kind

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_ROLE_OF = {"attn": "attn.o", "mlp": "mlp.down"}


class AdapterParams(pydantic.BaseModel):
    model_config = params_config()

    reduction_factor: Width | None = Field(
        None, description="bottleneck size = hidden size // reduction_factor (default 16)"
    )
    size: Width | None = Field(None, description="bottleneck size, instead of reduction_factor")
    activation: Literal[tuple(ACTIVATIONS)] = Field(  # type: ignore[valid-type]
        "swish",
        description="nonlinearity between down and up (swish, as AdapterHub's Houlsby config; "
        "a ReLU can start dead when the block output is tiny)",
    )
    placement: list[Literal["attn", "mlp"]] = Field(
        ["attn", "mlp"], description="after the attention output, the MLP output, or both"
    )
    name: str = Field("default", description="adapter name; several named adapters can live on one model")

    @pydantic.model_validator(mode="after")
    def _check(self) -> AdapterParams:
        if self.reduction_factor is not None and self.size is not None:
            raise ValueError("give reduction_factor or size, not both")
        if not self.placement:
            raise ValueError("placement needs at least one of: attn, mlp")
        if not _NAME.match(self.name):
            raise ValueError(
                f"adapter name {self.name!r} must be letters, digits, '_' or '-', not starting with a digit"
            )
        return self

    def bottleneck(self, dim: int) -> int:
        if self.size is not None:
            return self.size
        return max(1, dim // (self.reduction_factor or 16))


def _points(target, params: AdapterParams, ctx) -> list[tuple[str, object]]:
    """(path, module) of the projections whose outputs get an adapter."""
    wanted = {_ROLE_OF[p] for p in params.placement}
    if target.fused is None and target.roles & wanted:
        return [(target.path, target.module)]
    prefix = target.path + "." if target.path else ""
    found = []
    for path, entry in ctx.map.entries.items():
        if (path.startswith(prefix) or not target.path) and entry.roles & wanted:
            found.append((path, entry.module))
    return found


class Adapter(Action):
    name = "adapter"
    Params = AdapterParams
    summary = "add Houlsby bottleneck adapters after the attention and MLP outputs"

    def check(self, target, params: AdapterParams, ctx) -> None:
        points = _points(target, params, ctx)
        if not points:
            roles = " or ".join(_ROLE_OF[p] for p in params.placement)
            raise SurgeonError(
                f"adapter: {target.display} ({target.class_name}) contains no {roles} projection; "
                "select layers (role: layer) or the projections themselves"
            )
        planned = ctx.__dict__.setdefault("_surgeon_adapter_planned", set())
        for path, module in points:
            kind = module_kind(module)
            if kind not in ("linear", "conv1d"):
                raise SurgeonError(
                    f"adapter: {path} is a {type(module).__name__}; bottleneck adapters go on "
                    "nn.Linear or Conv1D outputs"
                )
            dim = dims(module, kind)[1]
            if params.bottleneck(dim) > dim:
                raise SurgeonError(
                    f"adapter: size {params.bottleneck(dim)} exceeds the hidden size {dim} of {path}"
                )
            host = BottleneckHost.on(module)
            if (host is not None and params.name in host._modules) or (id(module), params.name) in planned:
                raise SurgeonError(
                    f"adapter: adapter '{params.name}' is already on {path}; "
                    "give the second one another name (with: {name: ...})"
                )
            planned.add((id(module), params.name))

    def finish(self, targets, params: AdapterParams, ctx) -> None:
        points = [p for t in targets for p in _points(t, params, ctx)]
        sizes = sorted({params.bottleneck(dims(m, module_kind(m))[1]) for _, m in points})
        ctx.note(
            f"'{params.name}': {len(points)} bottlenecks, size {'/'.join(map(str, sizes))}, "
            f"{params.activation} (not mergeable)"
        )

    def apply(self, target, params: AdapterParams, ctx) -> None:
        for path, module in _points(target, params, ctx):
            kind = module_kind(module)
            dim = dims(module, kind)[1]
            weight = module.weight
            adapter = Bottleneck(
                dim, params.bottleneck(dim), params.activation, device=weight.device, dtype=weight.dtype
            )
            adapter.train(module.training)
            host = BottleneckHost.ensure(module)
            ctx.add_module(host, params.name, adapter)
