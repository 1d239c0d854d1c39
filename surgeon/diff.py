"""Minimal diffs: only the tensors surgery made trainable or added, bound to their base.

A diff directory holds
- `diff.safetensors`: exactly `ledger.diff_names()` — nothing else;
- `recipe.yaml` (and `recipe-2.yaml`, … if the model was patched more than once);
- `manifest.json`: surgeon version, base path, what binds the diff to its exact base (every
  base tensor's name/dtype/shape and sha256, `surgeon.binding`), and what each stored tensor
  is (dtype, shape, sha256).
`load(base, diff)` checks the base and the diff's own bytes against the manifest, re-applies
the recipes to the base, each rule with the parameters recorded at save time, and loads the
tensors strictly.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Iterable

import pydantic
import torch

from . import __version__
from .binding import base_record, check_base, check_diff_file, diff_file_record, fully_bound
from .checkpoint import inspect_checkpoint, load_model, read_json_in
from .engine import patch, surgery_of
from .errors import CheckpointError, SurgeonError
from .fs_marker import DIFF_FILE, DIFF_FORMAT, DIFF_MANIFEST
from .fsutil import atomic_dir, relative_inside
from .modelpath import resolve_model_path
from .manifest_schema import validate_manifest
from .recipe import Recipe, load_recipe
from .yamlfile import dump_yaml

MANIFEST = DIFF_MANIFEST  # a diff is recognised as surgeon's by its manifest (surgeon.fs_marker)
FORMAT = DIFF_FORMAT
FORMAT_VERSION = 2  # 2: the base's content and the diff's own tensors are digested (surgeon.binding)


def _recipe_file(i: int) -> str:
    return "recipe.yaml" if i == 0 else f"recipe-{i + 1}.yaml"


def _recipe_text(recipe: Recipe) -> str:
    if recipe.text is not None:
        return recipe.text
    return dump_yaml(recipe.data)


def base_dir_of(model) -> str | None:
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return os.path.abspath(path)
    return None


def diff_tensors(model) -> dict[str, torch.Tensor]:
    """name -> tensor for exactly the names the ledger says belong in the diff."""
    surgery = surgery_of(model)
    if surgery is None:
        raise SurgeonError("this model has not been patched by surgeon: nothing to save")
    surgery.ledger.check_consistent(model)
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    out = {}
    for name in surgery.ledger.diff_names():
        tensor = state[name]
        if tensor.is_meta:
            raise SurgeonError(f"{name} is on the meta device (a model built from config only has no weights to save)")
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def _given_tensors(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    surgery = surgery_of(model)
    surgery.ledger.check_consistent(model)
    names = surgery.ledger.diff_names()
    check_stored_names("the tensors to save", set(tensors), set(names))
    shapes = {n: tuple(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    for name in names:
        if tuple(tensors[name].shape) != shapes[name]:
            given = tuple(tensors[name].shape)
            raise SurgeonError(f"{name}: the tensor to save has shape {given}, the model's is {shapes[name]}")
    return {name: tensors[name].detach().to("cpu").contiguous() for name in names}


def save_diff(
    model,
    out_dir: str,
    *,
    base_dir: str | None = None,
    overwrite: bool = False,
    inputs: Iterable[str] = (),
    tensors: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Write the diff of a patched model to `out_dir` atomically; return the manifest.

    The base, the recipe files the model was patched from and `inputs` (anything else the caller
    read: a PEFT dir, data files) are all checked against `out_dir` (`surgeon.fsutil.check_paths`).
    `tensors`: the diff's tensors as full CPU tensors, for a model whose own are not (sharded
    across processes); they must be exactly the ledger's diff names, shaped as the model's.
    """
    from safetensors.torch import save_file

    surgery = surgery_of(model)
    if surgery is None:
        raise SurgeonError("this model has not been patched by surgeon: nothing to save")
    base_dir = resolve_model_path(base_dir) if base_dir else base_dir_of(model)
    if base_dir is None:
        raise SurgeonError(
            "cannot tell which checkpoint this model came from; pass base_dir= (the model directory)"
        )
    info = inspect_checkpoint(base_dir, allow_pickle=True)
    if info.config.get("model_type") == "surgeon":  # surgeon.export.self_contained.MODEL_TYPE
        raise SurgeonError(
            f"{base_dir} is a `surgeon export --format surgeon` directory, not a base a diff can be loaded "
            "onto; keep training from the diff it was exported from (surgeon train DIFF) and export again"
        )
    tensors = diff_tensors(model) if tensors is None else _given_tensors(model, tensors)
    base = base_record(info)  # hashes the base's files once; cached for later loads
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "surgeon_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base": {
            "path": os.path.abspath(base_dir),
            "model_type": info.config.get("model_type"),
            "architectures": info.config.get("architectures"),
            **base,
        },
        "recipes": [_recipe_file(i) for i in range(len(surgery.recipes))],
        # every rule's parameters with the defaults filled in: load_recipes re-applies these,
        # so a later surgeon whose defaults differ still rebuilds the function of these tensors
        "rules": [{"do": r.action, "with": r.params} for r in surgery.ledger.rules],
        "tensors": {
            name: {
                "kind": "added" if name in surgery.ledger.added else "trainable",
                "by": surgery.ledger.added.get(name) or surgery.ledger.trainable.get(name),
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
            }
            for name, t in tensors.items()
        },
    }
    recipe_files = [r.source for r in surgery.recipes if r.directory is not None]
    with atomic_dir(out_dir, [base_dir, *recipe_files, *inputs], overwrite=overwrite) as tmp:
        save_file(tensors, os.path.join(tmp, DIFF_FILE), metadata={"format": FORMAT})
        # digests of the bytes as written, read back from the file
        manifest["diff_header_sha256"], stored = diff_file_record(os.path.join(tmp, DIFF_FILE))
        for name, record in manifest["tensors"].items():
            record["sha256"] = stored[name]
        for i, recipe in enumerate(surgery.recipes):
            with open(os.path.join(tmp, _recipe_file(i)), "w", encoding="utf-8") as handle:
                handle.write(_recipe_text(recipe))
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1)
            handle.write("\n")
    return manifest


def read_manifest(diff_dir: str) -> dict:
    """The manifest of `diff_dir`, its types checked (`surgeon.manifest_schema`)."""
    path = os.path.join(diff_dir, MANIFEST)
    manifest = read_json_in(diff_dir, MANIFEST, "a surgeon diff")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a surgeon diff manifest")
    version = manifest.get("format_version", 1)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: diff format {version} is newer than this surgeon reads")
    validate_manifest(manifest, path)
    return manifest


def check_stored_names(path: str, stored: set[str], expected: set[str]) -> None:
    """A diff holds exactly what the re-applied recipe trains or adds: name the first outlier."""
    missing, extra = sorted(expected - stored), sorted(stored - expected)
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]} that the recipe makes trainable or adds")
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]} that the recipe neither trains nor adds")


def load_recipes(diff_dir: str, manifest: dict) -> list[Recipe]:
    """The diff's recipes, each rule's parameters pinned to what they resolved to when the diff
    was saved: a later surgeon whose defaults changed (e.g. `summary_keys`) still rebuilds the
    function the tensors were trained in."""
    recipes = []
    files = manifest.get("recipes") or ["recipe.yaml"]
    if not isinstance(files, list):
        raise CheckpointError(f"{os.path.join(diff_dir, MANIFEST)}: recipes must be a list of file names")
    for file in files:
        inside = relative_inside(diff_dir, file) if isinstance(file, str) else None
        if inside is None or os.sep in inside:
            raise CheckpointError(
                f"{os.path.join(diff_dir, MANIFEST)}: recipes: {file!r} is not a file name in {diff_dir}"
            )
        path = os.path.join(diff_dir, inside)
        if not os.path.isfile(path):
            raise CheckpointError(f"{diff_dir}: {file} listed in the manifest is missing")
        recipes.append(load_recipe(path))
    saved = manifest.get("rules")
    if saved is None:  # diffs written before the record existed: the recipes as they read now
        return recipes
    rules = [rule for recipe in recipes for rule in recipe.rules]
    if len(saved) != len(rules):
        raise CheckpointError(f"{diff_dir}: the manifest records {len(saved)} rules, its recipes hold {len(rules)}")
    made_with = manifest.get("surgeon_version", "?")
    for i, (record, rule) in enumerate(zip(saved, rules)):
        if record.get("do") != rule.do:
            raise CheckpointError(
                f"{diff_dir}: rule {i + 1} is '{rule.do}' in the recipe but '{record.get('do')}' in the manifest"
            )
        recorded = record.get("with") or {}
        try:
            rule.params = type(rule.params).model_validate(recorded)
        except pydantic.ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"])
            raise CheckpointError(
                f"{diff_dir}: rule {i + 1} (do: {rule.do}) was saved by surgeon {made_with} with {field} = "
                f"{recorded.get(field, '(missing)')!r}, which this surgeon does not accept: {error['msg']}"
            ) from None
    return recipes


def _tensor_hash(tensor: torch.Tensor) -> str:
    """sha256 of a loaded tensor's bytes: how format 1 recorded the base tensors a diff replaces."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def _check_replaced(manifest: dict, model, base_dir: str, diff_dir: str) -> None:
    """Format 1 diffs: the base content of the tensors they replace, as the loaded model holds it."""
    params = dict(model.named_parameters())
    for name, digest in manifest["base"].get("replaced_sha256", {}).items():
        if name not in params:
            raise CheckpointError(f"{diff_dir}: base {base_dir} has no parameter {name}")
        if _tensor_hash(params[name]) != digest:
            raise CheckpointError(f"{diff_dir} was made on another base: the content of {name} in {base_dir} differs")


def copy_stored_tensors(model, path: str, expected: set[str]) -> None:
    """Copy into the model, in place and shape-checked, the tensors of the safetensors file at
    `path`, which must hold exactly `expected` (names of the model's parameters and buffers).
    In place, not by assignment: a tensor other modules hold a reference to stays shared."""
    from safetensors import SafetensorError, safe_open

    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    try:
        with safe_open(path, framework="pt") as handle:
            check_stored_names(path, set(handle.keys()), expected)
            with torch.no_grad():
                for name in sorted(expected):
                    tensor = handle.get_tensor(name)
                    target = state[name]
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise CheckpointError(
                            f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                            f"the patched model expects {tuple(target.shape)}"
                        )
                    target.copy_(tensor.to(target.dtype))
    except FileNotFoundError:
        raise CheckpointError(f"{os.path.dirname(path) or '.'}: no {os.path.basename(path)}") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def load(base_dir: str | None, diff_dir: str, *, allow_pickle: bool = False, trust_base: bool = False):
    """Load `base_dir`, re-apply the diff's recipes, load its tensors strictly; return the model.

    The base must be the checkpoint the diff was made on, tensor for tensor (`surgeon.binding`);
    `trust_base=True` checks only its tensor names, dtypes and shapes, and warns.
    """
    manifest = read_manifest(diff_dir)
    base_dir = resolve_model_path(base_dir) if base_dir else manifest["base"]["path"]
    info = inspect_checkpoint(base_dir, allow_pickle=allow_pickle)
    check_base(manifest, info, diff_dir, trust_base=trust_base)
    recipes = load_recipes(diff_dir, manifest)
    model, _ = load_model(base_dir, allow_pickle=allow_pickle)
    if not trust_base and not fully_bound(manifest):
        _check_replaced(manifest, model, base_dir, diff_dir)
    for recipe in recipes:
        patch(model, recipe)
    path = os.path.join(diff_dir, DIFF_FILE)
    copy_stored_tensors(model, path, set(surgery_of(model).ledger.diff_names()))
    check_diff_file(manifest, path)
    model.eval()
    return model
