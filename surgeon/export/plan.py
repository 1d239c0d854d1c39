"""The merge plan: every tensor of an output checkpoint, where its value comes from, what is
added to it, and which of the base's shard files it goes in.

`plan_merged` lays out the patched model in its base's own architecture: each base tensor in
its base shard, LoRA merge pieces attached to the weights they fold into, trained tensors
taken from the diff, tensors the recipe derives from the base (a tiled position table) taken
from the meta model. Native-architecture exporters start from this plan and rename, copy or
transform its entries; `surgeon.export.write` streams it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..diff import DIFF_FILE
from ..errors import CheckpointError
from ..lora.merge import untied_names
from ..quant import QuantSpec
from .meta_diff import MetaDiff
from .stream import DTYPES

Layout = dict[str, dict[str, "OutTensor"]]  # output shard file -> output name -> tensor


@dataclass
class OutTensor:
    """One output tensor.

    `source` is ("base", file, name) | ("diff", DIFF_FILE, name) | ("model", "", name) (a tensor
    of the patched meta model that was loaded or computed) | ("zeros", "", ""). `pieces` are
    LoRA merge pieces in the source's coordinates. `quantized`, for a base weight the recipe stores
    quantised, replaces the source by dequantize(quantize(source)) — the values the patched model
    computes with — before the pieces are added (whole tensor: NF4's scales span rows). `transform`, when set, maps the whole merged
    source tensor (shape `source_shape`) to the written one (shape `shape`): for small tensors
    only (a position table), since it holds the tensor in memory.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: tuple[str, str, str]
    pieces: list = field(default_factory=list)
    source_shape: tuple[int, ...] | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    quantized: QuantSpec | None = None  # a base weight the model holds quantised: its dequantised values

    @property
    def read_shape(self) -> tuple[int, ...]:
        return self.shape if self.source_shape is None else self.source_shape

    def renamed(self, name: str, **changes) -> OutTensor:
        """A copy written under another name (its pieces list is copied, not shared)."""
        return replace(self, name=name, **{"pieces": list(self.pieces), **changes})


def plan_merged(meta: MetaDiff, pieces, adapters, *, dequantize: bool = True) -> tuple[Layout, dict]:
    """Per output shard (the base's files), the tensors to write; and the config updates.

    `dequantize=False` writes quantised weights with their base values (an export that re-applies
    the quantize rule on load); it is then an error for a LoRA piece to merge into one."""
    info = meta.info
    layout: Layout = {file: {} for file in info.files}
    for name, (tag, shape) in info.tensors.items():
        if tag not in DTYPES:
            raise CheckpointError(
                f"{info.directory}: tensor {name} has dtype {tag}, which export does not handle"
            )
        file = info.weight_map[name]
        layout[file][name] = OutTensor(name, DTYPES[tag], tuple(shape), ("base", file, name))
    config = dict(meta.config_changes)

    # A tie the merge breaks (untie: true): both sides become tensors of their own.
    for name, source in sorted(untied_names(meta.model, adapters).items()):
        if name in info.weight_map:
            continue
        if source not in info.weight_map:
            raise CheckpointError(
                f"{meta.base_dir}: the checkpoint stores neither {name} nor {source}, which it is tied to"
            )
        base = layout[info.weight_map[source]][source]
        layout[info.weight_map[source]][name] = base.renamed(name)
        config["tie_word_embeddings"] = False  # else transformers re-ties them on load

    outs = by_name(layout)
    params = dict(meta.model.named_parameters())
    for name in meta.trained_base_names() + meta.derived:
        if name not in outs:
            raise CheckpointError(
                f"{meta.base_dir}: the patched model's tensor {name} is not stored in the checkpoint"
            )
        outs[name].source = (
            ("diff", DIFF_FILE, name) if name in meta.surgery.ledger.trainable else ("model", "", name)
        )
        outs[name].shape = tuple(params[name].shape)
    # buffers the recipe resized (extend_positions: position_ids), where the checkpoint has them
    for name, buffer in meta.model.named_buffers():
        if name in outs and tuple(buffer.shape) != outs[name].shape and not buffer.is_meta:
            outs[name].source, outs[name].shape = ("model", "", name), tuple(buffer.shape)
    quantized = meta.surgery.ledger.quantized
    for name, (spec, _) in quantized.items() if dequantize else ():
        if name not in outs or outs[name].source[0] != "base":
            raise RuntimeError(f"export bug: quantised weight {name} is not a base tensor of the plan")
        outs[name].quantized = spec
    for piece in pieces:
        if not dequantize and piece.param_name in quantized:
            raise RuntimeError(f"export bug: LoRA merging into {piece.param_name}, which stays quantised")
        if piece.param_name not in outs:
            raise CheckpointError(
                f"{meta.base_dir}: LoRA adapter {piece.adapter} merges into {piece.param_name}, "
                "which the checkpoint does not store under that name"
            )
        outs[piece.param_name].pieces.append(piece)
    return layout, config


def by_name(layout: Layout) -> dict[str, OutTensor]:
    return {o.name: o for file_outs in layout.values() for o in file_outs.values()}
