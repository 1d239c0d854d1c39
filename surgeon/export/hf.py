"""`surgeon export --format hf`: the diff merged into its base, written as a plain Hugging Face
checkpoint — of the base's own architecture, or, when attention surgery changed the function,
of the transformers architecture that computes it (`native.py`: Longformer, Mistral, Qwen2).

The output is what `transformers.AutoModel.from_pretrained(OUT)` loads with no surgeon
installed: config.json (with the recipe's config changes, e.g. extended positions), the base's
safetensors shard layout and index, the base's dtypes, tokenizer and other small files copied.
LoRA is merged (W + scale·B·A computed in fp32, rounded once to the base dtype); tensors the
recipe trained (BitFit biases, unfrozen layers, grown position tables) are written from the
diff. Only the model is *built*, on the meta device; weights are streamed (`write.py`).
"""

from __future__ import annotations

from ..diff import read_manifest
from ..errors import SurgeonError
from ..fsutil import check_output
from ..lora.merge import merge_pieces
from .mergeable import mergeability_problems
from .meta_diff import open_meta_diff
from .native import export_native
from .plan import plan_merged
from .write import write_checkpoint


def export_merged(
    diff_dir: str,
    out_dir: str,
    base_dir: str | None = None,
    progress: bool = True,
    *,
    adapters: list[str] | None = None,
    overwrite: bool = False,
    trust_base: bool = False,
) -> dict:
    """Write `diff_dir` merged into its base as a plain HF checkpoint in `out_dir`; return a summary.

    `adapters`: which LoRA adapters to merge (default: what `surgeon.lora.merge.merge_pieces`
    merges by default). The output is written atomically; on any error nothing is left behind.
    A diff with attention surgery is written as its native architecture (`export_native`) or
    refused, naming the modules and pointing at `--format surgeon`.
    """
    manifest = read_manifest(diff_dir)
    base_dir = base_dir or manifest["base"]["path"]
    check_output(out_dir, [base_dir, diff_dir], overwrite=overwrite)
    meta = open_meta_diff(diff_dir, base_dir, trust_base=trust_base)
    if any(rule.attention for rule in meta.surgery.rules):
        return export_native(meta, out_dir, adapters=adapters, progress=progress, overwrite=overwrite)
    problems = mergeability_problems(meta)
    if problems:
        raise SurgeonError(
            f"{diff_dir} cannot be exported as a merged checkpoint:\n" + "\n".join(f"  {p}" for p in problems)
        )
    layout, config = plan_merged(meta, merge_pieces(meta.model, adapters), adapters)
    return write_checkpoint(
        meta, layout, out_dir, config_changes=config, progress=progress, overwrite=overwrite
    )
