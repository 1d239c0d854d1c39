"""`--format hf` for a diff whose attention surgery changed: the transformers architecture that
computes the same function, merged and streamed like a plain merged export.

Encoders of the BERT/RoBERTa family with a sliding window become Longformer (`longformer.py`);
Llama-family decoders with a causal window become Mistral or Qwen2 (`sliding_decoder.py`).
Anything else — dilation, per-layer settings the target cannot hold, blockwise, Linformer,
latent, LSH, bottleneck adapters — is refused, one line per reason, pointing at
`--format surgeon`. The exported README.md (the base's, with a section appended) and
config.json say what the user must pass (Longformer's global_attention_mask).
"""

from __future__ import annotations

import os

from ..lora.merge import merge_pieces
from . import longformer, sliding_decoder
from .conversion import refuse, verify_target
from .mergeable import mergeability_problems
from .meta_diff import MetaDiff
from .plan import plan_merged
from .write import write_checkpoint

_CONVERTERS = {  # source model_type -> (target description, converter)
    **{family: ("Longformer", longformer.to_longformer) for family in longformer.FAMILIES},
    **{family: ("Mistral/Qwen2", sliding_decoder.to_sliding_decoder) for family in sliding_decoder.FAMILIES},
}
_README = "README.md"


def export_native(meta: MetaDiff, out_dir: str, *, adapters, progress: bool, overwrite: bool) -> dict:
    """Write the patched model of `meta` as the native architecture that computes it."""
    model_type = meta.model.config.model_type
    if model_type not in _CONVERTERS:
        raise refuse(
            meta.diff_dir, "a native transformers architecture",
            [
                f"{type(meta.model).__name__} ({model_type}) has no transformers architecture with this attention "
                "(surgeon converts BERT/RoBERTa-family encoders to Longformer and Llama-family decoders to Mistral/Qwen2)"
            ],
        )  # fmt: skip
    target, converter = _CONVERTERS[model_type]
    problems = mergeability_problems(meta)
    if problems:
        raise refuse(meta.diff_dir, target, problems)
    layout, config_changes = plan_merged(meta, merge_pieces(meta.model, adapters), adapters)
    conversion, problems = converter(meta, layout, config_changes)
    if conversion is None:
        raise refuse(meta.diff_dir, target, problems)
    verify_target(conversion)
    summary = write_checkpoint(
        meta, conversion.layout, out_dir, config_changes={}, whole_config=conversion.config,
        extra_files={_README: _with_base_readme(meta.base_dir, conversion.readme)},
        progress=progress, overwrite=overwrite, desc=f"export ({conversion.architecture})",
    )  # fmt: skip
    summary["architecture"] = conversion.architecture
    summary["source_architecture"] = type(meta.model).__name__
    summary["usage"] = conversion.usage
    summary["config_changes"] = sorted(set(summary["config_changes"]) | set(config_changes))
    return summary


def _with_base_readme(base_dir: str, section: str) -> str:
    """The base's README (model card, front matter first) with the export's section appended."""
    path = os.path.join(base_dir, _README)
    if not os.path.isfile(path):
        return section
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read().rstrip() + "\n\n" + section
