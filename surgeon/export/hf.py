"""`surgeon export --format hf` on a diff that keeps its base's attention: the diff merged into
its base, written as a plain Hugging Face checkpoint of the same architecture.

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
from ..fsutil import atomic_dir, check_output
from ..lora.merge import merge_pieces
from .meta_diff import MetaDiff, open_meta_diff
from .mergeable import mergeability_problems
from .plan import Layout, plan_merged
from .stream import ReaderPool
from .write import copy_small_files, write_config, write_index, write_shards


def export_merged(
    diff_dir: str,
    out_dir: str,
    base_dir: str | None = None,
    progress: bool = True,
    *,
    adapters: list[str] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write `diff_dir` merged into its base as a plain HF checkpoint in `out_dir`; return a summary.

    `adapters`: which LoRA adapters to merge (default: what `surgeon.lora.merge.merge_pieces`
    merges by default). The output is written atomically; on any error nothing is left behind.
    """
    manifest = read_manifest(diff_dir)
    base_dir = base_dir or manifest["base"]["path"]
    check_output(out_dir, [base_dir, diff_dir], overwrite=overwrite)
    meta = open_meta_diff(diff_dir, base_dir)
    problems = mergeability_problems(meta)
    if problems:
        raise SurgeonError(
            f"{diff_dir} cannot be exported as a merged checkpoint:\n" + "\n".join(f"  {p}" for p in problems)
        )
    layout, config = plan_merged(meta, merge_pieces(meta.model, adapters), adapters)
    return write_checkpoint(meta, layout, out_dir, config_changes=config, progress=progress, overwrite=overwrite)


def write_checkpoint(
    meta: MetaDiff,
    layout: Layout,
    out_dir: str,
    *,
    config_changes: dict,
    whole_config: dict | None = None,
    extra_files: dict[str, str] | None = None,
    sharded: bool | None = None,
    progress: bool = True,
    overwrite: bool = False,
    desc: str = "export",
) -> dict:
    """Stream `layout` into `out_dir` atomically with its index, config.json (the base's with
    `config_changes`, or `whole_config`), the base's small files and `extra_files` (name -> text)."""
    with ReaderPool() as readers, atomic_dir(out_dir, [meta.base_dir, meta.diff_dir], overwrite=overwrite) as tmp:
        written = write_shards(tmp, meta, layout, readers, progress=progress, desc=desc)
        write_index(tmp, meta, layout, written["bytes"], sharded=sharded)
        write_config(tmp, meta, config_changes, whole=whole_config)
        written["copied"], written["skipped"] = copy_small_files(meta.base_dir, tmp, meta.info)
        for name, text in (extra_files or {}).items():
            with open(f"{tmp}/{name}", "w", encoding="utf-8") as handle:
                handle.write(text)
    written["out_dir"] = out_dir
    written["config_changes"] = sorted(config_changes)
    return written
