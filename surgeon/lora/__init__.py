"""LoRA (Hu et al. 2021) for surgeon: the `lora` action's modules, switching, exact merge.

    surgeon.patch(model, {"surgeon": 1, "rules": [
        {"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 8, "name": "task_a"}}]})
    surgeon.lora.set_active(model, "task_a")       # or a list, or None for all
    with surgeon.lora.disable_adapters(model): ...  # base outputs
    surgeon.lora.merge(model); surgeon.lora.unmerge(model)   # exact, bit-exact restore
    surgeon.lora.save_adapter_diff(model, "runs/task_a", "task_a")
"""

from ..adapters.switch import active_adapters, adapter_names, disable_adapters, set_active
from .diffs import save_adapter_diff
from .layer import InputGroup, LoraAdapter
from .merge import MergePiece, lora_hosts, merge, merge_pieces, non_mergeable, unmerge, untied_names

__all__ = [
    "InputGroup",
    "LoraAdapter",
    "MergePiece",
    "active_adapters",
    "adapter_names",
    "disable_adapters",
    "lora_hosts",
    "merge",
    "merge_pieces",
    "non_mergeable",
    "save_adapter_diff",
    "set_active",
    "unmerge",
    "untied_names",
]
