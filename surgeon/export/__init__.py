"""Exporting a diff as something that runs without the diff (docs/export.md).

- `stream.py`: streamed safetensors reading and writing (one tensor, or block of rows, at a time);
- `meta_diff.py`: the diff re-applied to its base on the meta device (`open_meta_diff`), and the
  one shape-checked `load_state_dict(assign=True)` helper (`assign_tensors`);
- `mergeable.py`: which changes have no merged form;
- `plan.py`: the merge plan (each output tensor's source, LoRA pieces, shard);
- `write.py`: streaming a plan to disk (shards, index, config, the base's small files);
- `hf.py`: `--format hf`, a merged checkpoint of the base's architecture, or through
  `native.py` (with `conversion.py`) the architecture that computes an attention surgery:
  `longformer.py` (BERT/RoBERTa family), `sliding_decoder.py` (Llama family → Mistral/Qwen2);
- `self_contained.py`: `--format surgeon`, one directory for any surgery, and its loader.

The PEFT format lives in `surgeon.peft_io`.
"""

from .hf import export_merged
from .mergeable import mergeability_problems
from .meta_diff import LORA_MARK, MetaDiff, assign_tensors, open_meta_diff
from .self_contained import export_self_contained, load_self_contained
from .stream import ShardReader, ShardWriter

__all__ = [
    "LORA_MARK",
    "MetaDiff",
    "ShardReader",
    "ShardWriter",
    "assign_tensors",
    "export_merged",
    "export_self_contained",
    "load_self_contained",
    "mergeability_problems",
    "open_meta_diff",
]
