"""`lora`: low-rank adapters (Hu et al. 2021) on Linear, Conv1D, Embedding and fused-qkv slices.

    - do: lora
      select: {role: [attn.q, attn.v]}     # on GPT-2: only the q and v thirds of c_attn
      with: {r: 8, alpha: 16, dropout: 0.05}

The math and the lean training path are in `surgeon.lora.layer`; switching, disabling and
merging in `surgeon.lora`. Base parameter names never change: the adapter hangs off the module
as `<path>.surgeon_lora.<name>.lora_A` / `.lora_B` (a fused slice adds `.<part>` after the name).
"""

from __future__ import annotations

import math
import re
from typing import Literal

import pydantic
from pydantic import Field
from torch import nn

from ..errors import SurgeonError
from ..lora.host import LoraHost
from ..lora.layer import InputGroup, LoraAdapter
from ..lora.merge import parameter_names, tied_partners
from .base import Action, params_config
from .limits import Width, check_scale

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


class LoraParams(pydantic.BaseModel):
    model_config = params_config()

    r: Width = Field(8, description="rank of the update; 1 ≤ r ≤ min(in, out) of each module")
    alpha: float | None = Field(
        None, description="scale numerator: the update is scaled by alpha/r (default: alpha = r)"
    )
    dropout: float = Field(
        0.0,
        description="dropout on the adapter's input, in [0, 1); one mask is shared by the "
        "projections that read the same input",
    )
    init: Literal["default", "gaussian", "random"] = Field(
        "default",
        description="default: A kaiming-uniform, B zero (unchanged outputs); gaussian: A ~ N(0, 1/r), "
        "B zero; random: both random (outputs change; for tests)",
    )
    rslora: bool = Field(False, description="scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r")
    name: str = Field("default", description="adapter name; several named adapters can live on one model")
    untie: bool = Field(
        False,
        description="allow merging into a tied weight (e.g. lm_head tied to the embeddings) "
        "by giving it its own copy",
    )

    @pydantic.field_validator("alpha")
    @classmethod
    def _alpha(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"alpha must be finite (got {value})")
        if value is not None and not value > 0:
            raise ValueError(f"alpha must be > 0 (got {value})")
        return value

    @pydantic.model_validator(mode="after")
    def _scale_representable(self) -> LoraParams:
        check_scale(self.scale, "alpha/sqrt(r)" if self.rslora else "alpha/r")
        return self

    @property
    def scale(self) -> float:
        """The update's multiplier: alpha/r, or alpha/sqrt(r) with rslora (alpha defaults to r)."""
        alpha = self.alpha if self.alpha is not None else float(self.r)
        return alpha / (self.r**0.5 if self.rslora else self.r)

    @pydantic.field_validator("dropout")
    @classmethod
    def _dropout(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError(f"dropout must be in [0, 1) (got {value})")
        return value

    @pydantic.field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"adapter name {value!r} must be letters, digits, '_' or '-', not starting with a digit"
            )
        return value


def module_kind(module: nn.Module) -> str | None:
    """'linear' | 'conv1d' | 'embedding', or None for a module LoRA can't handle."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        Conv1D = ()
    if isinstance(module, Conv1D):
        return "conv1d"
    return None


def dims(module: nn.Module, kind: str) -> tuple[int, int]:
    """(in, out) features of the module; an Embedding's "in" is its vocabulary size."""
    weight = module.weight
    if kind == "linear":
        return weight.shape[1], weight.shape[0]
    return weight.shape[0], weight.shape[1]  # Conv1D (in, out); Embedding (num, dim)


def _group_key(target, name: str, dropout: float) -> tuple | None:
    """Which adapters read the same input tensor (shared dropout + one matmul)."""
    parent = target.path.rsplit(".", 1)[0] if "." in target.path else ""
    roles = target.roles
    if target.fused is not None:
        key = (target.path, "fused")
    elif roles & {"attn.q", "attn.k", "attn.v"}:
        key = (target.attention_path or parent, "attn.qkv")
    elif roles & {"xattn.k", "xattn.v"}:  # read the encoder states, not the decoder's
        key = (target.attention_path or parent, "xattn.kv")
    elif roles & {"mlp.gate", "mlp.up"}:
        key = (parent, "mlp.in")
    else:
        return None
    return key + (name, dropout)


class Lora(Action):
    name = "lora"
    Params = LoraParams
    accepts_slices = True
    summary = "add a low-rank update (alpha/r)·B·A to Linear, Conv1D, Embedding or fused-qkv slices"

    def check(self, target, params: LoraParams, ctx) -> None:
        module = target.module
        kind = module_kind(module)
        if kind is None:
            raise SurgeonError(
                f"lora: {target.display} is a {target.class_name}; LoRA handles nn.Linear, "
                "transformers Conv1D and nn.Embedding (select the projections inside it, "
                "e.g. role: [attn.q, attn.v])"
            )
        in_f, out_f = dims(module, kind)
        if target.fused is not None:
            out_f = target.fused.stop - target.fused.start
        if params.r > min(in_f, out_f):
            raise SurgeonError(
                f"lora: r={params.r} exceeds min(in, out) = min({in_f}, {out_f}) of {target.display} "
                f"({target.class_name}): a rank-{params.r} update can't exist there"
            )
        part = target.fused.part if target.fused is not None else None
        taken = _taken(module, ctx)
        clash = (
            (params.name, part) in taken
            or (params.name, None) in taken
            or (part is None and any(n == params.name for n, _ in taken))
        )
        if clash:
            raise SurgeonError(
                f"lora: adapter '{params.name}' is already on {target.display}; "
                "give the second one another name (with: {name: ...})"
            )
        _planned(ctx).setdefault(id(module), set()).add((params.name, part))

    def apply(self, target, params: LoraParams, ctx) -> None:
        module = target.module
        kind = module_kind(module)
        in_f, out_f = dims(module, kind)
        out_range = None
        if target.fused is not None:
            out_range = (target.fused.start, target.fused.stop)
            out_f = out_range[1] - out_range[0]
        weight = module.weight
        adapter = LoraAdapter(
            kind, in_f, out_f,
            r=params.r, alpha=params.alpha if params.alpha is not None else float(params.r),
            dropout=params.dropout, rslora=params.rslora, init=params.init, out_range=out_range,
            untie=params.untie, padding_idx=getattr(module, "padding_idx", None),
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        adapter.train(module.training)  # a model patched in eval mode stays in eval mode
        host = LoraHost.ensure(module, kind=kind)
        if target.fused is None:
            ctx.add_module(host, params.name, adapter)
        else:
            parts = host._modules.get(params.name)
            if parts is None:
                parts = nn.ModuleDict()
                host.add_module(params.name, parts)  # holds no tensors of its own
            ctx.add_module(parts, target.fused.part, adapter)
        key = _group_key(target, params.name, adapter.dropout)
        if key is not None:
            groups = ctx.model.__dict__.setdefault("_surgeon_lora_groups", {})
            group = groups.get(key)
            if group is None:
                group = groups[key] = InputGroup(key)
            group.members.append(adapter)
            adapter.group = group


    def finish(self, targets, params: LoraParams, ctx) -> None:
        scale = params.scale
        slices = sum(1 for t in targets if t.fused is not None)
        ctx.note(
            f"'{params.name}': {len(targets)} modules{f' ({slices} fused slices)' if slices else ''}, "
            f"r={params.r}, scale={scale:g}" + (f", dropout={params.dropout:g}" if params.dropout else "")
        )
        if not params.untie:
            # Found now rather than when `surgeon export` refuses the merge: training, saving and
            # loading the adapter are fine, only folding it into a shared weight is not.
            for path, others in _tied_targets(ctx.model, targets):
                ctx.warn(
                    f"lora '{params.name}' on {path}.weight, which is tied to {', '.join(others)}: merging it "
                    "(surgeon export, surgeon.merge) will be refused unless this rule sets untie: true"
                )


def _tied_targets(model: nn.Module, targets) -> list[tuple[str, list[str]]]:
    """(module path, the weight's other names) for each target whose weight is tied — the
    condition under which merge_pieces refuses an adapter without untie."""
    names = parameter_names(model)
    modules = {t.path: t.module for t in targets}  # fused slices share their module
    tied = [(path, tied_partners(names, path, module.weight)) for path, module in modules.items()]
    return [(path, others) for path, others in tied if others]


def _taken(module: nn.Module, ctx) -> set:
    host = LoraHost.on(module)
    existing = {(name, part) for name, part, _ in host.adapters()} if host is not None else set()
    return existing | _planned(ctx).get(id(module), set())


def _planned(ctx) -> dict:
    """(adapter name, part) per module claimed by rules already checked in this patch: two
    rules of one recipe may not put the same name on one module either."""
    return ctx.__dict__.setdefault("_surgeon_lora_planned", {})
