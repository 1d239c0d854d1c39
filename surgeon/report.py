"""Parameter report, read from the ledger only (the diff reads the same record)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tabulate import tabulate

from .modelmap import ModelMap

ADAMW_STATES = 2  # exp_avg and exp_avg_sq


@dataclass
class Report:
    data: dict

    def to_dict(self) -> dict:
        return self.data

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        d = self.data
        summary = [
            ["model", d["model_class"]],
            ["total params (base)", _n(d["total_params"])],
            ["trainable params", f"{_n(d['trainable_params'])}  ({d['trainable_percent']:.4f}% of base)"],
            ["  of which added", _n(d["added_trainable_params"])],
            ["added params", _n(d["added_params"])],
            ["diff tensors", f"{d['diff_tensors']}  ({_bytes(d['diff_bytes'])})"],
        ]
        mem = d["training_memory"]
        summary.append(
            [
                f"training memory ({mem['dtype']}, AdamW)",
                f"{_bytes(mem['total_bytes'])} = weights {_bytes(mem['weights_bytes'])} + "
                f"grads {_bytes(mem['grads_bytes'])} + optimizer {_bytes(mem['optimizer_bytes'])}",
            ]
        )
        parts = [tabulate(summary, tablefmt="simple_outline")]
        rows = [
            [r["rule"], r["action"], r["select"], r["matched_modules"], _n(r["trainable_params"]),
             _n(r["added_params"]), "; ".join(r["notes"])[:60]]
            for r in d["rules"]
        ]  # fmt: skip
        parts.append(
            tabulate(
                rows,
                headers=["rule", "action", "select", "modules", "made trainable", "added", "notes"],
                tablefmt="simple_outline",
            )
        )
        if d["layers"]:
            layer_rows = [
                [l["stack"], l["index"], _n(l["params"]), _n(l["trainable_params"]), _n(l["added_params"]),
                 l["attention"] or ""]
                for l in d["layers"]
            ]  # fmt: skip
            parts.append(
                tabulate(
                    layer_rows,
                    headers=["stack", "layer", "params", "trainable", "added", "attention"],
                    tablefmt="simple_outline",
                )
            )
        if d.get("attention_cost"):
            parts.append(_render_cost(d["attention_cost"]))
        for warning in d.get("warnings", []):
            parts.append(f"warning: {warning}")
        return "\n".join(parts)


def _render_cost(cost: dict) -> str:
    rows = [
        [c["module"], c["variant"], _flops(c["dense_flops"]), _flops(c["flops"]),
         f"{c['dense_flops'] / max(c['flops'], 1):.1f}x", _bytes(c["dense_score_bytes"]), _bytes(c["score_bytes"])]
        for c in cost["modules"]
    ]  # fmt: skip
    return f"attention cost at seq_len={cost['seq_len']} (per sequence):\n" + tabulate(
        rows,
        headers=["module", "variant", "dense FLOPs", "patched FLOPs", "ratio", "dense scores", "patched scores"],
        tablefmt="simple_outline",
    )


def _n(count: int) -> str:
    return f"{count:,}"


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


def build_report(surgery, seq_len: int | None = None) -> Report:
    ledger = surgery.ledger
    model = surgery.model
    params = dict(model.named_parameters())
    model_map = ModelMap(model)
    trainable = ledger.trainable
    added_trainable = sum(params[n].numel() for n in trainable if n in ledger.added)
    trainable_total = sum(params[n].numel() for n in trainable)
    dtype = next(iter(ledger.base_dtype.values()), torch.float32)
    size = _dtype_bytes(dtype)
    weights = sum(p.numel() for p in params.values())
    diff_bytes = sum(params[n].numel() * params[n].element_size() for n in ledger.diff_names() if n in params)
    rules = []
    for record in ledger.rules:
        rules.append(
            {
                "rule": record.index + 1,
                "line": record.line,
                "action": record.action,
                "select": record.select,
                "params": record.params,
                "matched_modules": len(record.matched),
                "matched_examples": record.matched[:5],
                "trainable_params": sum(record.made_trainable.values()),
                "frozen_params": sum(record.frozen.values()),
                "added_params": sum(record.added.values()),
                "attention_modules": record.attention,
                "notes": record.notes,
            }
        )
    data = {
        "model_class": type(model).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "total_params": ledger.base_total,
        "trainable_params": trainable_total,
        "trainable_percent": 100.0 * trainable_total / max(ledger.base_total, 1),
        "added_params": ledger.added_total,
        "added_trainable_params": added_trainable,
        "diff_tensors": len(ledger.diff_names()),
        "diff_bytes": diff_bytes,
        "training_memory": {
            "dtype": str(dtype).removeprefix("torch."),
            "weights_bytes": weights * size,
            "grads_bytes": trainable_total * size,
            "optimizer_bytes": ADAMW_STATES * trainable_total * size,
            "total_bytes": (weights + (1 + ADAMW_STATES) * trainable_total) * size,
            "note": "weights + gradients + AdamW states; activations not included",
        },
        "rules": rules,
        "layers": _layers(model_map, params, ledger),
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


def _layers(model_map: ModelMap, params: dict, ledger) -> list[dict]:
    from .attention.interface import variant_of

    rows: dict[tuple[str, int], dict] = {}
    for stack, count in model_map.stacks.items():
        for index in range(count):
            rows[(stack, index)] = {
                "stack": stack, "index": index, "params": 0, "trainable_params": 0,
                "added_params": 0, "attention": None,
            }  # fmt: skip
    for name, param in params.items():
        layer = model_map.layer_of(_owner(model_map, name))
        if layer is None:
            continue
        row = rows[(layer.stack, layer.index)]
        if name in ledger.added:
            row["added_params"] += param.numel()
        else:
            row["params"] += param.numel()
        if name in ledger.trainable:
            row["trainable_params"] += param.numel()
    for target in model_map.targets():
        if "attn" in target.roles and target.layer is not None:
            variant = variant_of(target.module)
            if variant is not None:
                rows[(target.layer.stack, target.layer.index)]["attention"] = getattr(variant, "name", "custom")
    return list(rows.values())


def attention_cost(model_map: ModelMap, seq_len: int) -> dict:
    """Per self-attention module: FLOPs and peak score memory of dense vs patched attention."""
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
        dense = dense_cost(seq_len, heads, head_dim)
        variant = variant_of(module)
        cost = variant.cost(seq_len, heads, head_dim) if variant is not None and hasattr(variant, "cost") else dense
        modules.append(
            {
                "module": target.path,
                "variant": getattr(variant, "name", "dense") if variant is not None else "dense",
                "dense_flops": dense["flops"],
                "dense_score_bytes": dense["score_bytes"],
                "flops": cost["flops"],
                "score_bytes": cost["score_bytes"],
            }
        )
    return {"seq_len": seq_len, "modules": modules}


def dense_cost(n: int, heads: int, head_dim: int, bytes_per_score: int = 4) -> dict:
    """QKᵀ and PV: 2 matmuls of n·n·d multiply-adds per head; scores n×n per head if
    materialised (fused kernels tile them, but this is the memory the math asks for)."""
    return {"flops": 4 * heads * n * n * head_dim, "score_bytes": heads * n * n * bytes_per_score}
