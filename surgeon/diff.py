"""Minimal diffs: only the tensors surgery made trainable or added, bound to their base.

A diff directory holds
- `diff.safetensors`: exactly `ledger.diff_names()` — nothing else;
- `recipe.yaml` (and `recipe-2.yaml`, … if the model was patched more than once);
- `manifest.json`: surgeon version, base path, the base's fingerprint (every tensor's
  name/dtype/shape, and sha256 of the base content of each tensor the diff replaces), and
  what each stored tensor is.
`load(base, diff)` re-applies the recipes to the base, each rule with the parameters recorded
at save time, and loads the tensors strictly.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable

import pydantic
import torch
import yaml

from . import __version__
from .checkpoint import CheckpointInfo, inspect_checkpoint, load_model, read_json_in
from .engine import patch, surgery_of, tensor_hash
from .errors import CheckpointError, SurgeonError
from .fs_marker import DIFF_FILE, DIFF_FORMAT, DIFF_MANIFEST
from .fsutil import atomic_dir, relative_inside
from .recipe import Recipe, load_recipe

MANIFEST = DIFF_MANIFEST  # a diff is recognised as surgeon's by its manifest (surgeon.fs_marker)
FORMAT = DIFF_FORMAT
FORMAT_VERSION = 1


def _recipe_file(i: int) -> str:
    return "recipe.yaml" if i == 0 else f"recipe-{i + 1}.yaml"


def _recipe_text(recipe: Recipe) -> str:
    if recipe.text is not None:
        return recipe.text
    return yaml.safe_dump(recipe.data, sort_keys=False)


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


def save_diff(
    model, out_dir: str, *, base_dir: str | None = None, overwrite: bool = False, inputs: Iterable[str] = ()
) -> dict:
    """Write the diff of a patched model to `out_dir` atomically; return the manifest.

    The base, the recipe files the model was patched from and `inputs` (anything else the caller
    read: a PEFT dir, data files) are all checked against `out_dir` (`surgeon.fsutil.check_paths`).
    """
    from safetensors.torch import save_file

    surgery = surgery_of(model)
    if surgery is None:
        raise SurgeonError("this model has not been patched by surgeon: nothing to save")
    base_dir = base_dir or base_dir_of(model)
    if base_dir is None:
        raise SurgeonError(
            "cannot tell which checkpoint this model came from; pass base_dir= (the model directory)"
        )
    info = inspect_checkpoint(base_dir, allow_pickle=True)
    tensors = diff_tensors(model)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "surgeon_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base": {
            "path": os.path.abspath(base_dir),
            "model_type": info.config.get("model_type"),
            "architectures": info.config.get("architectures"),
            "listing_sha256": info.listing_digest() if info.tensors else None,
            "tensors": {n: _spec(d, s) for n, (d, s) in sorted(info.tensors.items())},
            "replaced_sha256": {n: h for n, h in sorted(surgery.base_hashes.items()) if n in tensors},
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
        for i, recipe in enumerate(surgery.recipes):
            with open(os.path.join(tmp, _recipe_file(i)), "w", encoding="utf-8") as handle:
                handle.write(_recipe_text(recipe))
        with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=1)
            handle.write("\n")
    return manifest


def _spec(dtype: str, shape) -> str:
    """("F32", [384, 512]) -> "F32[384,512]": one short line per tensor in the manifest."""
    return f"{dtype}[{','.join(str(int(x)) for x in shape)}]"


def read_manifest(diff_dir: str) -> dict:
    path = os.path.join(diff_dir, MANIFEST)
    manifest = read_json_in(diff_dir, MANIFEST, "a surgeon diff")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a surgeon diff manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: diff format {manifest['format_version']} is newer than this surgeon reads")
    return manifest


def check_base(manifest: dict, info: CheckpointInfo, diff_dir: str) -> None:
    """Refuse a base whose tensor listing differs from the one the diff was made on."""
    expected = manifest["base"].get("tensors") or {}
    if not expected or not info.tensors:
        return  # pickle bases have no header listing
    if info.listing_digest() == manifest["base"].get("listing_sha256"):
        return
    for name, spec in expected.items():
        if name not in info.tensors:
            raise CheckpointError(f"{diff_dir} was made on another base: {info.directory} has no tensor {name}")
        got = _spec(*info.tensors[name])
        if got != spec:
            raise CheckpointError(
                f"{diff_dir} was made on another base: tensor {name} is {got} "
                f"in {info.directory}, expected {spec}"
            )
    extra = sorted(set(info.tensors) - set(expected))
    raise CheckpointError(f"{diff_dir} was made on another base: {info.directory} has an extra tensor {extra[0]}")


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


def load(base_dir: str | None, diff_dir: str, *, allow_pickle: bool = False):
    """Load `base_dir`, re-apply the diff's recipes, load its tensors strictly; return the model."""
    from safetensors import SafetensorError, safe_open

    manifest = read_manifest(diff_dir)
    base_dir = base_dir or manifest["base"]["path"]
    info = inspect_checkpoint(base_dir, allow_pickle=allow_pickle)
    check_base(manifest, info, diff_dir)
    recipes = load_recipes(diff_dir, manifest)
    model, _ = load_model(base_dir, allow_pickle=allow_pickle)
    params = dict(model.named_parameters())
    for name, digest in manifest["base"].get("replaced_sha256", {}).items():
        if name not in params:
            raise CheckpointError(f"{diff_dir}: base {base_dir} has no parameter {name}")
        if tensor_hash(params[name]) != digest:
            raise CheckpointError(
                f"{diff_dir} was made on another base: the content of {name} in {base_dir} differs"
            )
    for recipe in recipes:
        patch(model, recipe)
    expected = set(surgery_of(model).ledger.diff_names())
    path = os.path.join(diff_dir, DIFF_FILE)
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
        raise CheckpointError(f"{diff_dir}: no {DIFF_FILE}") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    model.eval()
    return model
