"""Which changes of a diff have no merged form (attention variants are the converters' call)."""

from __future__ import annotations

from ..attention.interface import VARIANT_ATTR
from ..lora.merge import non_mergeable
from .meta_diff import LORA_MARK, MetaDiff


def mergeability_problems(meta: MetaDiff) -> list[str]:
    """One line per added thing that cannot be folded into the weights: bottleneck adapters, and
    any added tensor that is neither LoRA nor an attention variant's own."""
    problems = list(non_mergeable(meta.model))
    if not problems:
        others = [n for n in meta.added_names() if LORA_MARK not in n and f".{VARIANT_ATTR}." not in n]
        if others:
            problems.append(
                f"added tensor {others[0]} ({meta.surgery.ledger.added[others[0]]})"
                + (f" and {len(others) - 1} more" if len(others) > 1 else "")
                + " is not LoRA and has no merged form"
            )
    return problems
