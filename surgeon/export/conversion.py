"""What every native-architecture conversion shares: the per-layer attention of the patched
model, the result a converter returns, and the check of that result against the target class.

A converter (`longformer.py`, `sliding_decoder.py`) maps the merged plan of a patched model
(`plan.plan_merged`) onto a transformers architecture that computes the same function: tensor
names, copies and transforms, and a complete config. `verify_target` then builds the target on
the meta device and insists that every tensor it needs is written with its shape and nothing
else is — transformers would otherwise initialise a missing tensor randomly with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..attention.interface import variant_of
from ..errors import SurgeonError
from ..modelmap import ModelMap
from .meta_diff import MetaDiff
from .plan import Layout, by_name

WAY_OUT = "export with --format surgeon instead (a self-contained directory surgeon.load reads)"


@dataclass
class LayerAttention:
    """One self-attention module of the layer stack and the variant surgery gave it (or None)."""

    index: int
    path: str
    module: torch.nn.Module
    variant: object | None
    rule: str  # "rule N (action) at file:line" that attached the variant, "" when dense


@dataclass
class Conversion:
    """A converter's result: the renamed plan and the complete config.json of the target."""

    architecture: str
    layout: Layout
    config: dict
    readme: str  # a section for the exported README: what the user must pass, what differs
    usage: dict = field(default_factory=dict)  # facts for the summary, e.g. global positions


@dataclass
class Source:
    """The patched model's class, split into family prefix and head suffix (BertForMaskedLM)."""

    config: object  # the patched model's live config (recipe changes included)
    family: str  # model_type
    name: str  # class name
    suffix: str  # "Model", "ForMaskedLM", …


def source_of(meta: MetaDiff, families: dict[str, str], suffixes, target: str, problems: list[str]) -> Source:
    """The source class; a problem line when `target` has no class for its head."""
    config = meta.model.config
    name = type(meta.model).__name__
    source = Source(config, config.model_type, name, name.removeprefix(families[config.model_type]))
    if source.suffix not in suffixes:
        known = ", ".join(families[source.family] + s for s in suffixes)
        problems.append(f"{name} has no {target} class (only {known})")
    return source


def target_config(meta: MetaDiff, config: dict, architecture: str) -> dict:
    """A converter's config.json: its architecture, in the base checkpoint's dtype."""
    config = dict(config, architectures=[architecture])
    dtype = meta.info.config.get("dtype") or meta.info.config.get("torch_dtype")
    if dtype:
        config["dtype"] = dtype
    return config


def refuse(diff_dir: str, target: str, problems: list[str]) -> SurgeonError:
    """One line per problem, each naming the modules, the reason and the way out."""
    lines = list(dict.fromkeys(problems))
    return SurgeonError(
        "\n".join(f"{diff_dir}: cannot export as {target}: {line}; {WAY_OUT}" for line in lines)
    )


def layer_attention(meta: MetaDiff) -> list[LayerAttention]:
    """Every self-attention module in the model's layer stacks, in layer order."""
    rule_of = {
        path: f"{rule.label} at {rule.where}" for rule in meta.surgery.rules for path in rule.attention
    }
    out = []
    for target in ModelMap(meta.model).targets():
        if "attn" in target.roles and target.layer is not None and target.fused is None:
            out.append(
                LayerAttention(
                    target.layer.index, target.path, target.module,
                    variant_of(target.module), rule_of.get(target.path, ""),
                )
            )  # fmt: skip
    return sorted(out, key=lambda a: (a.index, a.path))


def describe_modules(layers: list[LayerAttention]) -> str:
    paths = [a.path for a in layers]
    return ", ".join(paths[:3]) + (f", … (+{len(paths) - 3})" if len(paths) > 3 else "")


def verify_target(conversion: Conversion) -> None:
    """Build the target class from the new config on the meta device; every tensor it stores
    must be planned with its shape (one name per tied group suffices) and nothing else."""
    import transformers
    from accelerate import init_empty_weights

    config_class = transformers.CONFIG_MAPPING[conversion.config["model_type"]]
    config = config_class.from_dict({k: v for k, v in conversion.config.items() if k != "model_type"})
    with init_empty_weights():
        model = getattr(transformers, conversion.architecture)(config)
    model.tie_weights()
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    planned = by_name(conversion.layout)
    extra = sorted(set(planned) - set(expected))
    if extra:
        raise RuntimeError(f"export bug: {conversion.architecture} has no tensor {extra[0]}")
    for name, out in planned.items():
        if out.shape != expected[name]:
            raise RuntimeError(
                f"export bug: {name} is planned {out.shape}, {conversion.architecture} has {expected[name]}"
            )
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        if not any(n in planned for n in names):
            raise RuntimeError(f"export bug: nothing is planned for {names[0]} of {conversion.architecture}")
    persistent = {n for n, _ in model.named_buffers() if n in expected}
    missing = sorted(persistent - set(planned))
    if missing:
        raise RuntimeError(
            f"export bug: nothing is planned for the buffer {missing[0]} of {conversion.architecture}"
        )
