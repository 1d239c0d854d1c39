"""`surgeon export --format surgeon`: one self-contained directory for any surgery.

    OUT/config.json                  model_type "surgeon": the base's config (with the recipe's
                                     changes), the recipe still to apply, the files' sha256
    OUT/model.safetensors (+ index)  the base weights, LoRA merged where it can be, trained
                                     tensors written (the base's shard names and dtypes)
    OUT/surgeon_added.safetensors    what the remaining rules add: adapters, attention-variant
                                     tensors (Linformer E/F, latents), LoRA kept unmerged
    OUT/tokenizer…, README.md        the base's small files; the model card gets a section

`surgeon.load(OUT)` needs no base: it checks every weight file against its recorded sha256,
builds the base architecture from OUT's weights, re-applies the remaining rules with the
parameters the diff recorded, and loads the added tensors strictly. After `import
surgeon.auto`, `transformers.AutoModel.from_pretrained(OUT)` does the same. Plain transformers
refuses the directory (unknown model_type "surgeon") instead of silently loading dense weights.

Which rules remain: a LoRA adapter is merged (its rules dropped) when every piece of it folds
into a base tensor — not when its weight is tied without `untie: true`, nor when it adapts a
module a rule added, nor when it adapts a weight `quantize` stores quantised; those stay LoRA.
`quantize` stays: the weights are written with the base's own values, and loading quantises
them again to the same bits (QLoRA's base is kept, on disk at the base's precision). LoRA adapters not chosen with `adapters=` are left out.
`extend_positions` is dropped: its table and config are already in the weights. Every other
rule (freeze/unfreeze/BitFit restore what is trainable; adapters; attention variants) stays.
"""

from __future__ import annotations

import hashlib
import json
import os

from .. import __version__
from ..checkpoint import CONFIG, INDEX, model_class, read_json_in
from ..diff import copy_stored_tensors, read_manifest
from ..engine import patch, surgery_of
from ..errors import CheckpointError, SurgeonError
from ..fsutil import check_output, relative_inside
from ..lora.merge import merge_pieces, untied_names
from ..recipe import load_recipe
from .meta_diff import MetaDiff, open_meta_diff
from .plan import plan_merged
from .write import write_checkpoint

MODEL_TYPE = "surgeon"
FORMAT = "surgeon-export"
FORMAT_VERSION = 1
ADDED_FILE = "surgeon_added.safetensors"
_REALISED = {"extend_positions"}  # rules whose whole effect is in the written weights and config
_HASH_BLOCK = 16 * 2**20


def export_self_contained(
    diff_dir: str,
    out_dir: str,
    base_dir: str | None = None,
    progress: bool = True,
    *,
    adapters: list[str] | None = None,
    overwrite: bool = False,
    trust_base: bool = False,
) -> dict:
    """Write `diff_dir` and its base as one directory `surgeon.load(out_dir)` reads; return a summary.

    `adapters`: the LoRA adapters to include (default: all). Streamed and atomic like the merged
    export: on any error nothing is left behind."""
    base_dir = base_dir or read_manifest(diff_dir)["base"]["path"]
    check_output(out_dir, [base_dir, diff_dir], overwrite=overwrite)
    meta = open_meta_diff(diff_dir, base_dir, trust_base=trust_base)
    merged, kept, left_out = _split_lora(meta, adapters)
    pieces = merge_pieces(meta.model, merged) if merged else []
    # quantised weights are written as the base holds them; the quantize rule re-applies on load
    layout, config_changes = plan_merged(meta, pieces, merged, dequantize=False)
    records, recipe = _remaining_recipe(meta, merged + left_out)
    added = sorted(n for record in records for n in record.added)
    state = meta.state()

    def write_added(tmp: str, written: dict) -> None:
        from safetensors.torch import save_file

        tensors = {name: state[name].detach().contiguous() for name in added}
        save_file(tensors, os.path.join(tmp, ADDED_FILE), metadata={"format": FORMAT})
        written["sha256"][ADDED_FILE] = file_sha256(os.path.join(tmp, ADDED_FILE))
        if os.path.isfile(os.path.join(tmp, INDEX)):
            written["sha256"][INDEX] = file_sha256(os.path.join(tmp, INDEX))

    def config(written: dict) -> dict:
        return {
            "model_type": MODEL_TYPE,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "surgeon_version": __version__,
            "base_config": {**meta.info.config, **config_changes},
            "recipe": recipe,
            "lora": {"merged": merged, "kept": kept, "left_out": left_out},
            "files": dict(sorted(written["sha256"].items())),
            "made_from": {"diff": os.path.abspath(diff_dir), "base": os.path.abspath(base_dir)},
        }

    summary = write_checkpoint(
        meta, layout, out_dir, config_changes={}, whole_config=config, finish=write_added,
        extra_files={"README.md": _readme(meta, recipe, merged, kept)}, progress=progress,
        overwrite=overwrite, desc="export (surgeon)", kind=FORMAT,
    )  # fmt: skip
    summary.update(added=len(added), rules=len(recipe["rules"]) if recipe else 0)
    summary["lora"] = {"merged": merged, "kept": kept, "left_out": left_out}
    summary["config_changes"] = sorted(config_changes)
    return summary


def _split_lora(meta: MetaDiff, adapters: list[str] | None) -> tuple[list[str], list[str], list[str]]:
    """LoRA adapter names: (merged into the weights, kept as LoRA, left out)."""
    names = sorted({r.params.get("name", "default") for r in meta.surgery.rules if r.action == "lora"})
    if adapters is not None:
        unknown = sorted(set(adapters) - set(names))
        if unknown:
            raise SurgeonError(
                f"{meta.diff_dir} has no LoRA adapter named {unknown[0]!r}; it holds {', '.join(names) or 'none'}"
            )
    merged, kept, left_out = [], [], []
    for name in names:
        if adapters is not None and name not in adapters:
            left_out.append(name)
            continue
        try:
            pieces = merge_pieces(meta.model, [name])
        except SurgeonError:  # tied without untie: merging would change the partner too
            kept.append(name)
            continue
        stored = set(meta.info.weight_map) | set(untied_names(meta.model, [name]))
        quantized = meta.surgery.ledger.quantized  # stays quantised on load, so its LoRA stays LoRA
        foldable = all(p.param_name in stored and p.param_name not in quantized for p in pieces)
        (merged if foldable else kept).append(name)
    return merged, kept, left_out


def _remaining_recipe(meta: MetaDiff, lora_gone: list[str]):
    """(the rule records that stay, the recipe dict holding them with their recorded parameters)."""
    specs = [rule for recipe in meta.surgery.recipes for rule in recipe.rules]
    records, rules = [], []
    for spec, record in zip(specs, meta.surgery.rules):
        if record.action in _REALISED or (record.action == "lora" and record.params.get("name") in lora_gone):
            continue
        records.append(record)
        rule = {"do": spec.do, "select": spec.raw["select"], "with": spec.params.model_dump(mode="json")}
        if spec.on_empty != "error":
            rule["on_empty"] = spec.on_empty
        rules.append(rule)
    if not rules:
        return records, None
    return records, {"surgeon": 1, "base": meta.surgery.recipes[0].base, "rules": rules}


def file_sha256(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            sha.update(block)
    return sha.hexdigest()


def _readme(meta: MetaDiff, recipe: dict | None, merged: list[str], kept: list[str]) -> str:
    """The base's model card with a section on what this directory is and how to load it."""
    rules = recipe["rules"] if recipe else []
    section = (
        "## Exported by surgeon (`--format surgeon`)\n\n"
        f"A `{type(meta.model).__name__}` with surgery that plain transformers cannot express; load it with\n\n"
        '```python\nimport surgeon\nmodel = surgeon.load("THIS_DIRECTORY")\n```\n\n'
        'or `import surgeon.auto` and then `transformers.AutoModel.from_pretrained("THIS_DIRECTORY")`.\n'
        f"LoRA merged into the weights: {', '.join(merged) or 'none'}; kept as LoRA: {', '.join(kept) or 'none'}. "
        f"Rules re-applied on load: {', '.join(r['do'] for r in rules) or 'none'} (config.json holds them).\n"
    )
    path = os.path.join(meta.base_dir, "README.md")
    if not os.path.isfile(path):
        return section
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read().rstrip() + "\n\n" + section


# ---- loading ---------------------------------------------------------------------------
def is_self_contained(directory: str) -> bool:
    """Whether `directory` holds a `--format surgeon` export (config.json says so)."""
    try:
        with open(os.path.join(directory, CONFIG), encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def load_self_contained(directory: str, *, verify: bool = True):
    """The patched model of a `--format surgeon` directory; `verify=False` skips the sha256 check
    of the weight files (it reads every byte once)."""
    import transformers

    config = read_json_in(directory, CONFIG, "a surgeon export")
    where = os.path.join(directory, CONFIG)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a surgeon export (format {config.get('format')!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: export format {config['format_version']} is newer than this surgeon reads"
        )
    files = config.get("files") or {}
    if ADDED_FILE not in files:
        raise CheckpointError(f"{where}: the fingerprint lists no {ADDED_FILE}")
    for file, digest in files.items():
        inside = relative_inside(directory, file)
        path = os.path.join(directory, inside) if inside is not None else None
        if path is None or not os.path.isfile(path):
            raise CheckpointError(f"{where}: lists {file!r}, which the directory does not hold")
        if verify and file_sha256(path) != digest:
            raise CheckpointError(
                f"{path}: content differs from its sha256 in config.json (changed after export)"
            )

    base_config = config["base_config"]
    model_type = base_config.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise CheckpointError(
            f"{where}: base_config has model_type {model_type!r}, which transformers does not know"
        )
    hf_config = transformers.CONFIG_MAPPING[model_type].from_dict(base_config)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model, loading = model_class(base_config).from_pretrained(
            directory, config=hf_config, dtype="auto", local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{directory}: cannot load the model: {first}") from None
    bad = list(loading.get("missing_keys") or []) + [m[0] for m in loading.get("mismatched_keys") or []]
    if bad:
        raise CheckpointError(
            f"{directory}: the weights lack tensor {bad[0]} (or hold it with another shape)"
        )
    added = os.path.join(directory, ADDED_FILE)
    if config.get("recipe"):
        recipe = load_recipe(config["recipe"])
        recipe.source = where
        patch(model, recipe)
        expected = set(surgery_of(model).ledger.added)
    else:
        expected = set()
    copy_stored_tensors(model, added, expected)
    model.eval()
    return model
