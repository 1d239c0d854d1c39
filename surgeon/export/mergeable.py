"""Which changes of a diff have no merged, plain-transformers form."""

from __future__ import annotations

from ..attention.interface import VARIANT_ATTR
from ..lora.merge import non_mergeable
from .meta_diff import LORA_MARK, MetaDiff


def shown(paths: list[str], limit: int = 3) -> str:
    """'a, b, c, … (+4)': a few module paths for a one-line message."""
    more = f", … (+{len(paths) - limit})" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def mergeability_problems(meta: MetaDiff, *, attention: bool = True) -> list[str]:
    """One line per change with no plain-transformers equivalent. `attention=False` leaves the
    efficient-attention rules to the caller (a native-architecture export may hold them)."""
    problems = list(non_mergeable(meta.model))
    if attention:
        for rule in meta.surgery.rules:
            if rule.attention:
                problems.append(
                    f"{rule.label} at {rule.where} replaced the attention of {shown(rule.attention)}: an "
                    "efficient-attention variant has no plain-transformers equivalent, so it cannot be exported merged"
                )
    if not problems:
        others = [n for n in meta.added_names() if LORA_MARK not in n and f".{VARIANT_ATTR}." not in n]
        if others:
            problems.append(
                f"added tensor {others[0]} ({meta.surgery.ledger.added[others[0]]})"
                + (f" and {len(others) - 1} more" if len(others) > 1 else "")
                + " is not LoRA and has no merged form"
            )
    return problems
