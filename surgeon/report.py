"""Parameter report, read from the ledger only (the diff reads the same record).

Every number is a sum over the same per-tensor split (`Ledger.split`: base elements and added
elements of each parameter), so the parts add up to the totals by construction:
- totals: base + added = parameters of the patched model; trainable = trainable base + trainable added;
  added = added trainable + added frozen (e.g. new position rows nobody unfroze);
- rules: each trainable tensor is counted once, under the rule that last made it trainable (a
  `base: trainable` row holds the rest), so the rules' trainable column sums to the trainable total;
  each rule's added elements (new tensors, growth of resized ones) sum to the added total;
- layers: every parameter belongs to one layer or to "outside the layers", so the rows sum to the totals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from tabulate import tabulate

from .modelmap import ModelMap

ADAMW_STATES = 2  # exp_avg and exp_avg_sq
STRATEGIES = ("ddp", "fsdp")  # how `training_memory` places weights, grads and optimizer states on ranks
SCORE_BYTES = 4  # the cost table counts fp32 scores, whatever the model's dtype
NOTE_WIDTH = 56  # the notes column wraps at word boundaries; --json has the full text
SELECT_WIDTH = 36
OUTSIDE = "outside the layers"


@dataclass
class Report:
    data: dict

    def to_dict(self) -> dict:
        return self.data

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        d = self.data
        parts = [_render_totals(d), _render_rules(d)]
        if d["layers"]:
            parts.append(_render_layers(d))
        if d.get("attention_cost"):
            parts.append(_render_cost(d["attention_cost"]))
        for warning in d.get("warnings", []):
            parts.append(f"warning: {warning}")
        return "\n".join(parts)


def _render_totals(d: dict) -> str:
    added = _n(d["added_params"])
    if d["added_params"]:
        added += f"  = {_n(d['added_trainable_params'])} trainable + {_n(d['added_frozen_params'])} frozen"
    trainable = f"{_n(d['trainable_params'])}  ({d['trainable_percent']:.4f}% of base)"
    if d["added_trainable_params"]:
        trainable += f" = {_n(d['trainable_base_params'])} base + {_n(d['added_trainable_params'])} added"
    summary = [
        ["model", d["model_class"]],
        ["total params (base)", _n(d["total_params"])],
        ["added params", added],
        ["trainable params", trainable],
        ["diff tensors", f"{d['diff_tensors']}  ({_bytes(d['diff_bytes'])})"],
    ]
    quantized = d.get("quantized")
    if quantized and quantized["params"]:
        summary.append(
            [
                "quantised weights",
                (
                    f"{_n(quantized['params'])} params in {_bytes(quantized['bytes'])} "
                    f"({_bytes(quantized['dense_bytes'])} at {d['dtype']})"
                ),
            ]
        )
    mem = d["training_memory"]
    summary.append(
        [
            f"training memory ({mem['dtype']}, AdamW)",
            (
                f"{_bytes(mem['total_bytes'])} = weights {_bytes(mem['weights_bytes'])} + "
                f"grads {_bytes(mem['grads_bytes'])} + optimizer {_bytes(mem['optimizer_bytes'])}"
            ),
        ]
    )
    rank = mem["per_rank"]
    if mem["world_size"] > 1:
        summary.append(
            [
                f"  per rank ({mem['strategy']}, {mem['world_size']} ranks)",
                (
                    f"{_bytes(mem['per_rank_bytes'])} = weights {_bytes(rank['weights_bytes'])} + "
                    f"grads {_bytes(rank['grads_bytes'])} + optimizer {_bytes(rank['optimizer_bytes'])}"
                ),
            ]
        )
    return tabulate(summary, tablefmt="simple_outline", disable_numparse=True)  # the summary holds text


def _render_rules(d: dict) -> str:
    rows = [
        [r["rule"], r["action"], r["select"], r["matched_modules"], _n(r["trainable_params"]),
         _n(r["added_params"]), "; ".join(r["notes"])]
        for r in d["rules"]
    ]  # fmt: skip
    if d["base_trainable_params"]:
        rows.insert(
            0, ["base", "trainable", "every base parameter", "", _n(d["base_trainable_params"]), "0", ""]
        )
    rows.append(["total", "", "", "", _n(d["trainable_params"]), _n(d["added_params"]), ""])
    return tabulate(
        rows,
        headers=["rule", "action", "select", "modules", "trainable", "added", "notes"],
        tablefmt="simple_outline",
        maxcolwidths=[None, None, SELECT_WIDTH, None, None, None, NOTE_WIDTH],
        colalign=("right", "left", "left", "right", "right", "right", "left"),
        disable_numparse=True,
    )


def _render_layers(d: dict) -> str:
    rows = []
    for group in collapse(d["layers"], key=lambda r: (r["stack"], r["params"], r["trainable_params"],
                                                     r["added_params"], r["attention"])):  # fmt: skip
        first, last = group[0], group[-1]
        index = (
            str(first["index"]) if len(group) == 1 else f"{first['index']}–{last['index']} (×{len(group)})"
        )
        rows.append([first["stack"], index, _n(first["params"]), _n(first["trainable_params"]),
                     _n(first["added_params"]), first["attention"] or ""])  # fmt: skip
    out = d["outside_layers"]
    rows.append([OUTSIDE, "", _n(out["params"]), _n(out["trainable_params"]), _n(out["added_params"]), ""])
    return tabulate(
        rows,
        headers=["stack", "layer (each)", "params", "trainable", "added", "attention"],
        tablefmt="simple_outline",
        colalign=("left", "left", "right", "right", "right", "left"),
        disable_numparse=True,
    )


def _render_cost(cost: dict) -> str:
    rows = []
    def same(c: dict) -> tuple:
        return (_layer_pattern(c), c["variant"], c["causal"], c["flops"], c["dense_flops"], c["score_bytes"])

    for group in collapse(cost["modules"], key=same):
        first = group[0]
        module = first["module"] if len(group) == 1 else _fold(group)
        variant = first["variant"] + (" (causal)" if first["causal"] else "")
        rows.append([module, variant, _flops(first["dense_flops"]), _flops(first["flops"]),
                     _ratio(first["dense_flops"], first["flops"]),
                     _bytes(first["dense_score_bytes"]), _bytes(first["score_bytes"])])  # fmt: skip
    total = cost["total"]
    rows.append([f"all {len(cost['modules'])} modules", "", _flops(total["dense_flops"]),
                 _flops(total["flops"]), _ratio(total["dense_flops"], total["flops"]), "", ""])  # fmt: skip
    table = tabulate(
        rows,
        headers=[
            "module (each)",
            "variant",
            "dense FLOPs",
            "patched FLOPs",
            "ratio",
            "dense scores",
            "patched scores",
        ],
        tablefmt="simple_outline",
        colalign=("left", "left", "right", "right", "right", "right", "right"),
        disable_numparse=True,
    )
    return (
        f"attention cost at seq_len={cost['seq_len']}, one sequence:\n{table}\n"
        "FLOPs: Q·Kᵀ and P·V (2 FLOPs per multiply-add) over the query-key pairs each method\n"
        "computes; a causal module's dense baseline counts the n(n+1)/2 causal pairs. Scores: the fp32\n"
        "score matrix of all heads of one sequence, as if materialised (dense: n×n; fused kernels\n"
        "tile it, the FLOPs are the same)."
    )


def collapse(rows: list[dict], key) -> list[list[dict]]:
    """Runs of consecutive rows with the same key, in order (80 identical layers -> one group)."""
    groups: list[list[dict]] = []
    for row in rows:
        if groups and key(groups[-1][-1]) == key(row):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


_LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def _layer_pattern(cost_row: dict) -> str:
    """The module path with its layer index blanked: rows of the same module in different layers match."""
    index = cost_row.get("layer")
    if index is None:
        return cost_row["module"]
    return (
        cost_row["module"].replace(f".{index}.", ".{}.", 1)
        if f".{index}." in cost_row["module"]
        else cost_row["module"]
    )


def _fold(group: list[dict]) -> str:
    first, last = group[0], group[-1]
    span = f"{{{first['layer']}–{last['layer']}}}"
    return f"{_layer_pattern(first).replace('{}', span, 1)} (×{len(group)})"


def _n(count: int) -> str:
    return f"{count:,}"


def _ratio(dense: float, patched: float) -> str:
    return f"{dense / max(patched, 1):.1f}x"


def _bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _flops(count: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(count) < 1000 or unit == "P":
            return f"{count:.1f}{unit}"
        count /= 1000
    return str(count)


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def training_memory(
    weights_bytes: int, trainable: int, size: int, dtype: torch.dtype, *, world_size: int = 1, strategy: str = "ddp"
) -> dict:
    """Weights + gradients + AdamW states, in total and per rank. ddp (or one process) keeps a whole
    copy on every rank; fsdp (FSDP2 `fully_shard`, ZeRO-3) splits all three evenly over the ranks
    (rounded up), besides the one unit it gathers whole while computing it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")
    parts = {
        "weights_bytes": weights_bytes,
        "grads_bytes": trainable * size,
        "optimizer_bytes": ADAMW_STATES * trainable * size,
    }
    shards = world_size if strategy == "fsdp" else 1
    per_rank = {k: -(-v // shards) for k, v in parts.items()}
    return {
        "dtype": str(dtype).removeprefix("torch."),
        **parts,
        "total_bytes": sum(parts.values()),
        "strategy": strategy,
        "world_size": world_size,
        "per_rank": per_rank,
        "per_rank_bytes": sum(per_rank.values()),
        "note": "weights (quantised ones at their stored bytes) + gradients + AdamW states; activations "
        "not included" + ("; fsdp also gathers one unit's weights whole while computing it" if shards > 1 else ""),
    }


def build_report(surgery, seq_len: int | None = None, *, world_size: int = 1, strategy: str = "ddp") -> Report:
    ledger = surgery.ledger
    model = surgery.model
    params = dict(model.named_parameters())
    model_map = ModelMap(model)
    trainable_base, trainable_added = ledger.trainable_split()
    trainable_total = trainable_base + trainable_added
    added_trainable = trainable_added
    dtype = next(iter(ledger.base_dtype.values()), torch.float32)
    size = _dtype_bytes(dtype)
    weights = sum(p.numel() for p in params.values())
    quantized_params, quantized_bytes = ledger.quantized_bytes()
    diff_bytes = sum(params[n].numel() * params[n].element_size() for n in ledger.diff_names() if n in params)
    owners = ledger.trainable_owners()
    owned: dict[int, int] = {}
    for name, owner in owners.items():
        key = id(owner) if owner is not None else 0
        owned[key] = owned.get(key, 0) + sum(ledger.split(name))
    rules = []
    for record in ledger.rules:
        rules.append(
            {
                "rule": record.index + 1,
                "line": record.line,
                "source": record.source,
                "action": record.action,
                "select": record.select,
                "params": record.params,
                "matched_modules": len(record.matched),
                "matched_examples": record.matched[:5],
                "trainable_params": owned.get(id(record), 0),
                "frozen_params": sum(record.frozen.values()),
                "added_params": sum(record.added.values()),
                "attention_modules": record.attention,
                "notes": record.notes,
            }
        )
    layers, outside = _layers(model_map, params, ledger)
    data = {
        "model_class": type(model).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "total_params": ledger.base_total,
        "added_params": ledger.added_total,
        "model_params": ledger.base_total + ledger.added_total,
        "trainable_params": trainable_total,
        "trainable_percent": 100.0 * trainable_total / max(ledger.base_total, 1),
        "trainable_base_params": trainable_base,
        "added_trainable_params": added_trainable,
        "added_frozen_params": ledger.added_total - added_trainable,
        "base_trainable_params": owned.get(0, 0),
        "diff_tensors": len(ledger.diff_names()),
        "diff_bytes": diff_bytes,
        "quantized": {
            "params": quantized_params,
            "bytes": quantized_bytes,
            "dense_bytes": quantized_params * size,
            "formats": sorted({spec.describe() for spec, _ in ledger.quantized.values()}),
        },
        "training_memory": training_memory(
            (weights - quantized_params) * size + quantized_bytes,
            trainable_total,
            size,
            dtype,
            world_size=world_size,
            strategy=strategy,
        ),
        "rules": rules,
        "layers": layers,
        "outside_layers": outside,
        "warnings": list(surgery.warnings),
    }
    if seq_len:
        data["attention_cost"] = attention_cost(model_map, seq_len)
    return Report(data)


def _owner(model_map: ModelMap, name: str) -> str:
    path = name.rsplit(".", 1)[0] if "." in name else ""
    while path and path not in model_map.entries:
        path = path.rsplit(".", 1)[0] if "." in path else ""
    return path


def _layers(model_map: ModelMap, params: dict, ledger) -> tuple[list[dict], dict]:
    """One row per layer of every stack, and one for everything outside them: base, trainable and
    added elements, split per tensor by the ledger, so the rows sum to the totals."""
    from .attention.interface import variant_of

    rows: dict[tuple[str, int], dict] = {}
    for stack, count in model_map.stacks.items():
        for index in range(count):
            rows[(stack, index)] = {
                "stack": stack, "index": index, "params": 0, "trainable_params": 0,
                "added_params": 0, "attention": None,
            }  # fmt: skip
    outside = {"params": 0, "trainable_params": 0, "added_params": 0}
    for name in params:
        layer = model_map.layer_of(_owner(model_map, name))
        row = outside if layer is None else rows[(layer.stack, layer.index)]
        base, added = ledger.split(name)
        row["params"] += base
        row["added_params"] += added
        if name in ledger.trainable:
            row["trainable_params"] += base + added
    for target in model_map.targets():
        if "attn" in target.roles and target.layer is not None:
            variant = variant_of(target.module)
            if variant is not None:
                rows[(target.layer.stack, target.layer.index)]["attention"] = getattr(
                    variant, "name", "custom"
                )
    return list(rows.values()), outside


def attention_cost(model_map: ModelMap, seq_len: int) -> dict:
    """Per self-attention module: FLOPs and score memory of dense vs patched attention, for one
    sequence of `seq_len` tokens; a causal module's dense baseline is causal dense attention."""
    from .attention.interface import variant_of

    modules = []
    for target in model_map.targets():
        if "attn" not in target.roles:
            continue
        module = target.module
        config = getattr(module, "config", None)
        heads = (getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None)
                 or getattr(config, "num_attention_heads", None))  # fmt: skip
        head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None)
        if head_dim is None and config is not None and heads:
            head_dim = getattr(config, "hidden_size", 0) // heads
        if not heads or not head_dim:
            continue
        causal = bool(getattr(module, "is_causal", False))
        dense = dense_cost(seq_len, heads, head_dim, causal=causal)
        variant = variant_of(module)
        cost = (
            variant.cost(seq_len, heads, head_dim)
            if variant is not None and hasattr(variant, "cost")
            else dense
        )
        modules.append(
            {
                "module": target.path,
                "layer": target.layer.index if target.layer is not None else None,
                "variant": getattr(variant, "name", "dense") if variant is not None else "dense",
                "causal": causal,
                "dense_flops": dense["flops"],
                "dense_score_bytes": dense["score_bytes"],
                "flops": cost["flops"],
                "score_bytes": cost["score_bytes"],
            }
        )
    total = {"dense_flops": sum(m["dense_flops"] for m in modules), "flops": sum(m["flops"] for m in modules)}
    basis = ("one sequence; FLOPs of Q·Kᵀ and P·V (causal dense: n(n+1)/2 pairs); "
             "scores: fp32, all heads, as if materialised (dense: n×n)")  # fmt: skip
    return {
        "seq_len": seq_len,
        "basis": basis,
        "modules": modules,
        "total": total,
    }


def dense_cost(
    n: int, heads: int, head_dim: int, *, causal: bool = False, bytes_per_score: int = SCORE_BYTES
) -> dict:
    """Dense attention of one sequence: Q·Kᵀ and P·V are 2 matmuls of pairs·d multiply-adds per head,
    over n² query-key pairs, or n(n+1)/2 when causal (fused kernels skip the masked half). Score memory
    is the n×n matrix per head that eager attention materialises, causal or not."""
    pairs = n * (n + 1) // 2 if causal else n * n
    return {"flops": 4 * heads * pairs * head_dim, "score_bytes": heads * n * n * bytes_per_score}
