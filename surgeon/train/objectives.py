"""Training objectives: each is an nn.Module whose forward returns the loss.

The module holds the patched model (and, for MLM/CLM on a headless checkpoint, a scaffold
head), so that one module is what DDP wraps. Work that needs no gradient — masking, the
teacher's forward — happens in `inputs(ids, generator)`, outside the DDP wrapper.

- `distill`: attention transfer without labels. The teacher is the unpatched base checkpoint
  (same weights, dense attention). Loss = mean over patched attention modules of the relative
  MSE between the student's and the teacher's attention output (the (B, n, H·D) context, read
  with forward hooks), plus `final_weight` × a loss on the final hidden states (relative MSE)
  or logits (KL), or the cosine distance of the mean-pooled final states (`pooled`, for
  sentence-embedding models). Layer-wise transfer as in TinyBERT (Jiao et al. 2020) and MiniLM
  (Wang et al. 2020); used here to calibrate converted attention rather than to compress.
  `attn_weight` scales the layer terms (0 = match only the final output).
  `layerwise`: each patched attention module is fed the *teacher's* input to that module, so
  every layer learns to reproduce the teacher's attention output on its own, without the
  errors of the layers below (the "attention transfer" stage of LoLCATs, Zhang et al. 2024).
  The loss is then the layer terms alone. Meant as a first stage before an end-to-end one
  (e.g. `final: pooled`); in ad-hoc trials on the MiniLM fidelity cases it did not beat
  end-to-end training alone. A student equal to its teacher (LoRA with B = 0, BitFit at the
  base's biases) gives a loss of 0: the trainer refuses it at the first step
  (`SAME_AS_TEACHER`), and objective auto picks distill only where attention is replaced
  (`choose_objective`).
- `mlm`: BERT masking (Devlin et al. 2019): 15 % of non-special tokens; of those 80 % →
  mask token, 10 % → random token, 10 % unchanged.
- `clm`: next-token prediction (labels = inputs; the model shifts them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.interface import variant_of
from ..checkpoint import load_model
from ..errors import SurgeonError
from ..modelmap import ModelMap, routes_through_interface
from .config import FINALS, OBJECTIVES

# below this relative MSE the student equals the teacher to fp32 rounding (~1e-7 relative error)
SAME_AS_TEACHER = 1e-10


def _relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    # normalised by the teacher's mean square so every layer weighs the same whatever its scale
    return (student.float() - teacher.float()).pow(2).mean() / teacher.float().pow(2).mean().clamp_min(1e-12)


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def is_causal_model(model: nn.Module) -> bool:
    return any(getattr(m, "is_causal", False) for m in model.modules())


def _with_head(model: nn.Module, kind: str) -> tuple[nn.Module, list[str]]:
    """`model` itself if it has an LM head, else a scaffold: the task class built from the same
    config with its body replaced by the patched model. Returns (module, scaffold parameter names).

    The scaffold head is trained (it is needed for a meaningful loss) and checkpointed, but it
    is not part of the patched model and never enters the final diff.
    """
    if model.get_output_embeddings() is not None:
        return model, []
    import transformers

    auto = transformers.AutoModelForMaskedLM if kind == "mlm" else transformers.AutoModelForCausalLM
    try:
        wrapper = auto.from_config(model.config)
    except ValueError:
        raise SurgeonError(
            f"train: {type(model).__name__} has no language-model head and transformers has no "
            f"{'masked' if kind == 'mlm' else 'causal'}-LM class for model_type "
            f"{model.config.model_type!r}; use another objective (e.g. distill)"
        ) from None
    prefix = wrapper.base_model_prefix
    body = model.base_model
    setattr(wrapper, prefix, body)
    wrapper.tie_weights()
    body_ids = {id(p) for p in body.parameters()}
    scaffold = []
    for name, param in wrapper.named_parameters():
        if id(param) not in body_ids:
            param.requires_grad_(True)
            scaffold.append(name)
    return wrapper, scaffold


class ClmObjective(nn.Module):
    name = "clm"

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        if not is_causal_model(model):
            raise SurgeonError(
                f"train: objective clm needs a causal (decoder) model; {type(model).__name__} "
                "attends both ways — use mlm or distill"
            )
        self.student = model
        self.net, self.scaffold = _with_head(model, "clm")

    def inputs(self, ids: torch.Tensor, generator: torch.Generator) -> dict:
        return {"input_ids": ids}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, labels=input_ids, use_cache=False).loss  # no cache in training


class MlmObjective(nn.Module):
    name = "mlm"
    rate = 0.15

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        if tokenizer.mask_token_id is None:
            raise SurgeonError(f"train: objective mlm needs a mask token; the tokenizer of {type(model).__name__} has none")
        if is_causal_model(model):
            raise SurgeonError(f"train: objective mlm needs a bidirectional model; {type(model).__name__} is causal — use clm")
        self.student = model
        self.net, self.scaffold = _with_head(model, "mlm")
        self.mask_id = tokenizer.mask_token_id
        self.vocab = model.get_input_embeddings().num_embeddings
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def inputs(self, ids: torch.Tensor, generator: torch.Generator) -> dict:
        ids = ids.clone()  # (B, n)
        can = ~torch.isin(ids, self.special.to(ids.device))
        chosen = (torch.rand(ids.shape, generator=generator) < self.rate).to(ids.device) & can
        if not chosen.any():  # a batch with no target would give a NaN loss
            chosen.view(-1)[can.view(-1).nonzero()[0]] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        roll = torch.rand(ids.shape, generator=generator).to(ids.device)
        random_ids = torch.randint(0, self.vocab, ids.shape, generator=generator).to(ids.device)
        ids = torch.where(chosen & (roll < 0.8), torch.full_like(ids, self.mask_id), ids)
        ids = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, ids)
        return {"input_ids": ids, "labels": labels}

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(input_ids=input_ids, labels=labels).loss


class DistillObjective(nn.Module):
    name = "distill"

    def __init__(self, model: nn.Module, teacher: nn.Module, *, final: str = "hidden", final_weight: float = 1.0,
                 attn_weight: float = 1.0, layerwise: bool = False):  # fmt: skip
        super().__init__()
        if final not in FINALS:
            raise SurgeonError(f"train: distill final must be one of {', '.join(FINALS)}, got {final!r}")
        self.student = model
        self.teacher = [teacher]  # a list keeps it out of this module: never trained, never wrapped by DDP
        self.final, self.final_weight, self.attn_weight = final, float(final_weight), float(attn_weight)
        self.layerwise = bool(layerwise)
        attn = [t.path for t in ModelMap(model).targets() if "attn" in t.roles and t.fused is None
                and t.path and t.module is not None and _is_attention_module(t)]  # fmt: skip
        patched = [p for p in attn if variant_of(model.get_submodule(p)) is not None]
        # "each patched attention layer"; a recipe that changes no attention (LoRA, BitFit)
        # is distilled on every attention module instead
        self.paths = patched or attn
        if not self.paths and final == "none":
            raise SurgeonError("train: distill has nothing to compare: no attention modules and final: none")
        if final == "logits" and model.get_output_embeddings() is None:
            raise SurgeonError(f"train: distill final: logits needs a model with an LM head; {type(model).__name__} has none")
        if self.layerwise and not self.paths:
            raise SurgeonError("train: distill layerwise needs attention modules to compare; the model has none")
        self._captured: dict[str, torch.Tensor] = {}
        self._capturing = False
        # layerwise: the teacher's input of each module; kept until the next forward, since
        # gradient checkpointing's recompute in the backward pass must see the same inputs
        self._forced: dict[str, torch.Tensor] = {}
        self._teacher_modules = {p: teacher.get_submodule(p) for p in self.paths}
        self._handles = [model.get_submodule(p).register_forward_hook(self._hook(p)) for p in self.paths]
        if self.layerwise:
            self._handles += [model.get_submodule(p).register_forward_pre_hook(self._force(p), with_kwargs=True)
                              for p in self.paths]  # fmt: skip

    def close(self) -> None:
        """Remove the hooks from the student (the trained model is returned to the caller)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._forced = {}

    def _hook(self, path: str):
        def capture(module, args, output):
            # gradient checkpointing re-runs the layer in the backward pass: that output is not kept
            if self._capturing:
                self._captured[path] = _first(output)  # (B, n, H·D)

        return capture

    def _force(self, path: str):
        def replace_input(module, args, kwargs):
            forced = self._forced.get(path)
            if forced is None:
                return None
            return _with_hidden_states(args, kwargs, forced)

        return replace_input

    @torch.no_grad()
    def inputs(self, ids: torch.Tensor, generator: torch.Generator) -> dict:
        teacher = self.teacher[0]
        captured: dict[str, torch.Tensor] = {}
        inputs: dict[str, torch.Tensor] = {}
        layer_terms = self.layerwise or bool(self.paths and self.attn_weight)  # else no attention target is read
        handles = [
            m.register_forward_hook(lambda mod, a, out, p=p: captured.__setitem__(p, _first(out)))
            for p, m in self._teacher_modules.items()
        ] if layer_terms else []
        if self.layerwise:
            handles += [
                m.register_forward_pre_hook(
                    lambda mod, a, kw, p=p: inputs.__setitem__(p, _hidden_states(a, kw)), with_kwargs=True
                )
                for p, m in self._teacher_modules.items()
            ]
        try:
            out = teacher(input_ids=ids, output_hidden_states=self.final in ("hidden", "pooled"))
        finally:
            for handle in handles:
                handle.remove()
        targets = {f"attn_{i}": captured[p] for i, p in enumerate(self.paths)} if layer_terms else {}
        if self.layerwise:  # the layer terms are the whole loss: no final term
            return {"input_ids": ids, **targets, **{f"in_{i}": inputs[p] for i, p in enumerate(self.paths)}}
        if self.final in ("hidden", "pooled"):
            targets["final"] = out.hidden_states[-1]
        elif self.final == "logits":
            targets["final"] = out.logits
        return {"input_ids": ids, **targets}

    def forward(self, input_ids: torch.Tensor, **targets) -> torch.Tensor:
        self._captured.clear()
        self._capturing = True
        try:
            return self._loss(input_ids, targets)
        finally:
            self._capturing = False
            self._captured.clear()

    def _loss(self, input_ids: torch.Tensor, targets: dict) -> torch.Tensor:
        if self.layerwise:
            self._forced = {p: targets[f"in_{i}"] for i, p in enumerate(self.paths)}
            self.student(input_ids=input_ids)
            parts = [_relative_mse(self._captured[p], targets[f"attn_{i}"]) for i, p in enumerate(self.paths)]
            return torch.stack(parts).mean()
        out = self.student(input_ids=input_ids, output_hidden_states=self.final in ("hidden", "pooled"))
        loss = input_ids.new_zeros((), dtype=torch.float32)
        if self.paths and self.attn_weight:
            parts = [_relative_mse(self._captured[p], targets[f"attn_{i}"]) for i, p in enumerate(self.paths)]
            loss = loss + self.attn_weight * torch.stack(parts).mean()
        if self.final == "hidden":
            loss = loss + self.final_weight * _relative_mse(out.hidden_states[-1], targets["final"])
        elif self.final == "pooled":
            # sentence-embedding models (e.g. sentence-transformers) are read through mean pooling:
            # 1 - cosine of the mean-pooled final states targets that use directly
            pooled = F.cosine_similarity(out.hidden_states[-1].float().mean(1), targets["final"].float().mean(1), dim=-1)
            loss = loss + self.final_weight * (1 - pooled).mean()
        elif self.final == "logits":
            log_p = F.log_softmax(out.logits.float(), dim=-1)
            log_q = F.log_softmax(targets["final"].float(), dim=-1)
            loss = loss + self.final_weight * F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1).mean()
        return loss


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden-states input of an attention module's forward: first positional argument, or
    the `hidden_states` keyword (transformers' attention modules take it one of these ways)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise SurgeonError("train: distill layerwise: an attention module was called without hidden_states")


def _with_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _is_attention_module(target) -> bool:
    return routes_through_interface(target.module) or variant_of(target.module) is not None


def has_attention_variant(model: nn.Module) -> bool:
    """Does the patched model replace some attention module by an efficient variant?"""
    return any(variant_of(m) is not None for m in model.modules())


def choose_objective(model: nn.Module) -> tuple[str, str]:
    """objective auto: (objective, why). distill only where some attention differs from the base
    (a diff of LoRA/BitFit alone starts equal to the base, so distilling it learns nothing)."""
    if has_attention_variant(model):
        return "distill", "some attention is replaced by an efficient variant: calibrate it to the dense base"
    unchanged = "the diff replaces no attention, so distill would compare the model with itself"
    if is_causal_model(model):
        return "clm", f"{unchanged}; the model is causal"
    return "mlm", f"{unchanged}; the model is bidirectional"


def build_objective(
    objective: str, model, tokenizer, base_dir: str, *, final: str, final_weight: float,
    attn_weight: float = 1.0, layerwise: bool = False, allow_pickle: bool = False,
    teacher: nn.Module | None = None,
) -> nn.Module:  # fmt: skip
    """The objective module; distill's teacher is `teacher` if given (a sharded run builds its own),
    else the base loaded from `base_dir`."""
    if objective not in OBJECTIVES:
        raise SurgeonError(f"train: unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if objective == "clm":
        return ClmObjective(model, tokenizer)
    if objective == "mlm":
        return MlmObjective(model, tokenizer)
    if teacher is None:
        teacher, _ = load_model(base_dir, allow_pickle=allow_pickle)
    teacher.requires_grad_(False).eval()
    return DistillObjective(model, teacher, final=final, final_weight=final_weight, attn_weight=attn_weight,
                            layerwise=layerwise)
