"""The only way actions change a model: every change is applied and recorded together."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import quant
from .attention import interface, window_cache
from .errors import SurgeonError
from .ledger import Ledger, RuleRecord
from .modelmap import ModelMap, Target
from .quant import QuantSpec


class SurgeryContext:
    """Handed to `Action.check/apply/finish`.

    - `model`: the model being patched; `map`: its resolved structure (before this recipe).
    - `set_trainable(module_or_param, flag)`: (un)freeze; recorded per rule.
    - `add_module(parent, name, module, trainable=True)`: register new tensors on `parent`.
    - `replace_parameter(module, name, tensor, trainable=None)`: swap a base tensor (e.g. grow
      a position table); the growth is counted as added parameters.
    - `quantize_weight(module, spec)`: store a frozen Linear's weight quantised (`surgeon.quant`).
    - `attach_attention(target, variant)`: give an attention module an efficient variant.
    - `note(text)`: a line for the report (e.g. "tied lm_head untied").
    - `warn(text)`: something the patch does not stop for but the user should know now (kept in
      the surgery's warnings, raised as a UserWarning; the CLI prints it).
    - `state`: a dict private to the current rule, for `finish` (e.g. a tensor shared by layers).
    """

    def __init__(self, model: nn.Module, model_map: ModelMap, ledger: Ledger, warnings_out: list[str] | None = None):
        self.model = model
        self.warnings = warnings_out if warnings_out is not None else []
        self.map = model_map
        self.ledger = ledger
        self.rule: RuleRecord | None = None
        self.state: dict = {}
        # while checking: (rule, action, targets) of the recipe's earlier rules, which are
        # checked against the unpatched model but will have been applied before this one
        self.planned: list = []
        # the recipe's `base:` on a model's first patch (None on later ones): what every tensor's
        # trainability is before the first rule runs
        self.base: str | None = None

    def path_of(self, module: nn.Module) -> str:
        for path, candidate in self.model.named_modules():
            if candidate is module:
                return path
        raise KeyError("module is not part of the model")

    # ---- trainability ----------------------------------------------------------------
    def set_trainable(self, obj: nn.Module | nn.Parameter, trainable: bool) -> None:
        params = [obj] if isinstance(obj, nn.Parameter) else list(obj.parameters())
        for param in params:
            self._set_param(param, trainable)

    def _set_param(self, param: nn.Parameter, trainable: bool) -> None:
        name = self.ledger.name_of(param)
        if trainable and name in self.ledger.quantized:
            where = f"{self.rule.where}: rule {self.rule.index + 1} ({self.rule.action}): " if self.rule else ""
            raise SurgeonError(
                f"{where}{name} is stored quantised ({self.ledger.quantized[name][0].describe()}) and "
                "cannot be trained; train it through LoRA, or leave it out of the quantize rule"
            )
        param.requires_grad_(trainable)
        rule = self.rule
        if trainable and name not in self.ledger.trainable:
            self.ledger.trainable[name] = rule.label if rule else "base"
            if rule is not None:
                rule.made_trainable[name] = param.numel()
                rule.frozen.pop(name, None)
        elif not trainable and name in self.ledger.trainable:
            del self.ledger.trainable[name]
            if rule is not None:
                rule.frozen[name] = param.numel()
                rule.made_trainable.pop(name, None)

    # ---- new tensors -----------------------------------------------------------------
    def add_module(self, parent: nn.Module, name: str, module: nn.Module, *, trainable: bool = True) -> None:
        if name in dict(parent.named_children()):
            raise ValueError(f"{self.path_of(parent)} already has a child '{name}'")
        parent.add_module(name, module)
        self._record_added(self.path_of(module), module.named_parameters(), trainable)

    def add_parameter(self, parent: nn.Module, name: str, param: nn.Parameter, *, trainable: bool = True) -> None:
        parent.register_parameter(name, param)
        self._record_added(self.path_of(parent), [(name, param)], trainable)

    def _record_added(self, prefix: str, named, trainable: bool) -> None:
        self.ledger.refresh_names(self.model)
        label = self.rule.label if self.rule else "base"
        for local, param in named:
            full = f"{prefix}.{local}" if prefix else local
            self.ledger.added[full] = label
            self.ledger.added_numel[full] = param.numel()
            if self.rule is not None:
                self.rule.added[full] = param.numel()
            self._set_param(param, trainable)

    def replace_parameter(self, module: nn.Module, name: str, tensor: torch.Tensor, *, trainable: bool | None = None) -> None:
        """Swap a base tensor for `tensor` (e.g. a grown position table). It keeps its trainability
        and the rule that gave it (unless `trainable` says otherwise); the growth counts as added."""
        old = getattr(module, name)
        full = f"{self.path_of(module)}.{name}"
        owner = self.ledger.trainable.pop(full, None)
        new = nn.Parameter(tensor, requires_grad=False)
        setattr(module, name, new)
        old_shape = self.ledger.resized.get(full, (tuple(old.shape), None))[0]
        self.ledger.resized[full] = (old_shape, tuple(new.shape))
        self.ledger.refresh_names(self.model)
        if trainable is None and owner is not None:
            new.requires_grad_(True)  # still trainable, still owned by the rule (or base) that made it so
            self.ledger.trainable[full] = owner
        elif trainable:
            self._set_param(new, True)
        if self.rule is not None:
            growth = new.numel() - old.numel()
            self.rule.added[full] = self.rule.added.get(full, 0) + growth
            self.rule.notes.append(f"{full}: {tuple(old.shape)} -> {tuple(new.shape)}")

    # ---- quantised storage ---------------------------------------------------------------
    def quantize_weight(self, module: nn.Module, spec: QuantSpec) -> None:
        """Store `module.weight` (frozen) quantised per `spec`. On the meta device (report, export
        plans) nothing is computed: the ledger records the spec and the bytes it would take."""
        weight = module.weight
        name = self.ledger.name_of(weight)
        if weight.requires_grad or name in self.ledger.trainable:
            raise RuntimeError(f"surgeon bug: quantize_weight on trainable {name}")
        if weight.is_meta:
            stored = quant.expected_bytes(tuple(weight.shape), spec)
        else:
            new = nn.Parameter(quant.quantize(weight, spec), requires_grad=False)
            module.weight = new
            self.ledger.refresh_names(self.model)
            stored = quant.stored_bytes(new)
        self.ledger.quantized[name] = (spec, stored)
        if self.rule is not None:
            self.rule.quantized[name] = stored

    # ---- attention -------------------------------------------------------------------
    def attach_attention(self, target: Target, variant) -> None:
        interface.attach(self.model, target.module, variant)
        window_cache.install(self.model)
        if isinstance(variant, nn.Module):
            self._record_added(
                f"{target.path}.{interface.VARIANT_ATTR}", variant.named_parameters(), True
            )
        if self.rule is not None:
            self.rule.attention.append(target.path)

    def note(self, text: str) -> None:
        if self.rule is not None:
            self.rule.notes.append(text)

    def warn(self, text: str) -> None:
        if self.rule is not None:
            text = f"{self.rule.where}: {text}"
        self.warnings.append(text)
        warnings.warn(text, stacklevel=2)
