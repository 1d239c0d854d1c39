"""Command line: each command parses, makes one library call, renders.

Bad input prints `surgeon: error: <what and where>` (one line per problem), exits 2, writes
nothing, and shows no traceback.
"""

from __future__ import annotations

import json
import sys

import click

from .cli_common import EXIT_BAD_INPUT, MODEL_DIR, TRUST_BASE_HELP, SurgeonGroup, friendly, quiet_transformers
from .errors import SurgeonError


def _model_dir(recipe, model_dir: str | None, command: str) -> str:
    if model_dir:
        return model_dir
    if recipe is None:
        raise SurgeonError(f"{command} needs MODEL_DIR (or a --recipe whose `model:` names a default)")
    default = recipe.default_model_dir()
    if default is None:
        raise SurgeonError(f"{command}: no MODEL_DIR given and {recipe.source} names no default `model:`")
    return default


@click.group(cls=SurgeonGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="surgeon")
def cli() -> None:
    """surgeon: recipe-driven surgery on Hugging Face transformers models."""


@cli.command()
@click.argument("recipe_path", metavar="RECIPE")
@click.argument("model_dir", required=False, type=MODEL_DIR)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), help="Output directory for the diff.")
@click.option("--dry-run", is_flag=True, help="Print the plan (rules, matched modules) and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--force", is_flag=True, help="Replace OUT if it is surgeon's own output (atomically).")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle .bin weights (loaded with weights_only=True).")
@friendly
def apply(recipe_path, model_dir, out_dir, dry_run, as_json, force, allow_pickle):
    """Apply RECIPE to the checkpoint in MODEL_DIR and write a minimal diff to OUT.

    RECIPE is a YAML file or a shipped recipe's name, `recipes:NAME` (`surgeon recipes` lists
    them). MODEL_DIR is a directory or `package:<package>/<subdir>`; it may be omitted when the
    recipe names a default `model:`.
    """
    from . import load_recipe

    recipe = load_recipe(recipe_path)
    model_dir = _model_dir(recipe, model_dir, "apply")
    if not dry_run and not out_dir:
        raise SurgeonError("apply needs -o/--out (or --dry-run)")
    quiet_transformers()
    from .checkpoint import inspect_checkpoint, load_model
    from .diff import save_diff
    from .engine import patch
    from .fsutil import check_paths

    if dry_run:
        from .checkpoint import build_meta_model

        inspect_checkpoint(model_dir, allow_pickle=allow_pickle, need_weights=False)
        model, _ = build_meta_model(model_dir, real_buffers=False)
        surgery = patch(model, recipe)
        _print_plan(surgery)
        return
    inspect_checkpoint(model_dir, allow_pickle=allow_pickle)
    # recipe.source: the recipe's file, also for recipes:NAME
    check_paths(inputs=[recipe.source, model_dir], outputs=[out_dir], overwrite=force)
    model, _ = load_model(model_dir, allow_pickle=allow_pickle)
    surgery = patch(model, recipe)
    report = surgery.report()
    save_diff(model, out_dir, base_dir=model_dir, overwrite=force)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        click.echo(report.render())
        click.echo(f"wrote {out_dir} (diff of {report.data['diff_tensors']} tensors)")


def _print_plan(surgery) -> None:
    click.echo("plan (nothing written):")
    rows = {row["rule"]: row for row in surgery.report().data["rules"]}
    for record in surgery.rules:
        row = rows[record.index + 1]
        examples = ", ".join(m or "<model>" for m in record.matched[:3])
        more = f", … (+{len(record.matched) - 3})" if len(record.matched) > 3 else ""
        click.echo(
            f"  rule {record.index + 1} [{record.where}] {record.action}: {len(record.matched)} modules"
            f" ({examples}{more}); trainable +{row['trainable_params']:,}, added {row['added_params']:,}"
        )


@cli.command()
@click.argument("model_dir", required=False, type=MODEL_DIR)
@click.option("-r", "--recipe", "recipe_path", help="Recipe (a file or recipes:NAME) to apply before reporting.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--seq-len", type=click.IntRange(min=1), help="Add per-layer attention cost at this length.")
@click.option("--world-size", type=click.IntRange(min=1, max=1 << 20), default=1, show_default=True,
              help="Training processes: memory per rank is shown for this many.")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="ddp: every rank holds everything; fsdp: weights, grads and AdamW states sharded over the ranks.")
@friendly
def report(model_dir, recipe_path, as_json, seq_len, world_size, strategy):
    """Parameter counts (total, trainable, added), per rule and per layer, and training memory.

    Reads config.json only (the model is built on the meta device), so it takes seconds even
    for a 70B-parameter config. MODEL_DIR may be omitted when the recipe names a default `model:`.
    """
    from . import load_recipe

    recipe = load_recipe(recipe_path) if recipe_path else None
    model_dir = _model_dir(recipe, model_dir, "report")
    quiet_transformers()
    from .checkpoint import build_meta_model
    from .engine import Surgery, patch
    from .ledger import Ledger

    model, _ = build_meta_model(model_dir, real_buffers=False)
    surgery = patch(model, recipe) if recipe else Surgery(model, Ledger(model))
    result = surgery.report(seq_len=seq_len, world_size=world_size, strategy=strategy)
    click.echo(json.dumps(result.to_dict(), indent=1) if as_json else result.render())


@cli.command()
@click.argument("model_dir", type=MODEL_DIR)
@click.option("--json", "as_json", is_flag=True, help="Print role -> module paths as JSON.")
@friendly
def roles(model_dir, as_json):
    """Print how each role resolves on MODEL_DIR (role -> module paths), from config alone."""
    quiet_transformers()
    from .checkpoint import build_meta_model
    from .modelmap import ModelMap

    model, _ = build_meta_model(model_dir, real_buffers=False)
    table = ModelMap(model).role_table()
    if as_json:
        click.echo(json.dumps(table, indent=1))
        return
    from tabulate import tabulate

    rows = []
    for role, paths in table.items():
        shown = ", ".join(_compress(paths)) if paths else "-"
        rows.append([role, len(paths), shown])
    click.echo(tabulate(rows, headers=["role", "count", "modules"], tablefmt="simple_outline", maxcolwidths=[None, None, 100]))


def _compress(paths: list[str]) -> list[str]:
    """Fold per-layer paths: encoder.layer.0.attention.self … .5 → encoder.layer.{0..5}.attention.self."""
    import re

    groups: dict[str, list[int]] = {}
    order: list[str] = []
    for path in paths:
        match = re.match(r"^(.*?\.)(\d+)(\..*|$)", path)
        key = f"{match.group(1)}{{}}{match.group(3)}" if match else path
        if key not in groups:
            groups[key] = []
            order.append(key)
        if match:
            groups[key].append(int(match.group(2)))
    out = []
    for key in order:
        indices = groups[key]
        if not indices:
            out.append(key)
        elif len(indices) == 1:
            out.append(key.replace("{}", str(indices[0])))
        else:
            out.append(key.replace("{}", f"{{{min(indices)}..{max(indices)}}}"))
    return out


@cli.command()
@click.argument("diff_dir", type=click.Path(file_okay=False))
@click.option("--base", "base_dir", type=MODEL_DIR, help="Base model dir (default: the one in the manifest).")
@click.option("--seq-len", type=click.IntRange(min=1), default=8, show_default=True,
              help="Tokens in the test forward pass: give the length the diff is meant for (e.g. 2048) "
                   "to exercise its attention at that size.")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle .bin base weights.")
@click.option("--trust-base", is_flag=True, help=TRUST_BASE_HELP)
@friendly
def verify(diff_dir, base_dir, seq_len, allow_pickle, trust_base):
    """Load DIFF_DIR onto its base strictly (the base's exact content, the diff's own bytes, the
    exact tensor set) and run a forward pass."""
    quiet_transformers()
    import torch

    from .binding import fully_bound
    from .diff import load, read_manifest

    manifest = read_manifest(diff_dir)
    model = load(base_dir, diff_dir, allow_pickle=allow_pickle, trust_base=trust_base)
    limit = _max_tokens(model)
    if limit is not None and seq_len > limit:
        raise SurgeonError(f"verify: --seq-len {seq_len} exceeds the {limit} positions of the patched model")
    ids = torch.arange(seq_len).remainder(getattr(model.config, "vocab_size", 100) or 100)[None]
    with torch.no_grad():
        inputs = _dummy_inputs(model, ids)
        output = model(**inputs)
    first = output[0] if isinstance(output, tuple) else next(iter(output.values()))
    finite = bool(torch.isfinite(first).all())
    if trust_base:
        checked = "base content NOT checked (--trust-base)"
    elif fully_bound(manifest):
        checked = "fingerprint matches (every base tensor's sha256)"
    else:
        checked = "fingerprint matches (listing and replaced tensors only: an older diff)"
    click.echo(
        f"ok: {diff_dir} loads onto {base_dir or manifest['base']['path']}: "
        f"{len(manifest['tensors'])} tensors, {checked}, forward output {tuple(first.shape)} "
        f"{'finite' if finite else 'NOT finite'}"
    )
    if not finite:
        sys.exit(1)


def _max_tokens(model) -> int | None:
    """The longest input the model's learned absolute position tables allow (None: no such table,
    e.g. rotary positions)."""
    from .actions.extend_positions import position_offset, position_tables

    sizes = [table.num_embeddings - position_offset(table) for _, table in position_tables(model, "")]
    return min(sizes) if sizes else None


def _dummy_inputs(model, ids):
    import torch

    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = getattr(model.config, "image_size", 224)
        return {"pixel_values": torch.zeros(1, getattr(model.config, "num_channels", 3), size, size)}
    inputs = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, :2]
    return inputs


@cli.command()
@friendly
def schema():
    """Print the recipe's JSON schema (for editors); each action's `with:` is included."""
    from . import registry
    from .recipe import RecipeModel

    data = RecipeModel.model_json_schema()
    loaded, broken = registry.load_all()
    for message in broken:
        click.echo(f"surgeon: warning: {message}", err=True)
    data.setdefault("$defs", {})
    variants = []
    for info in loaded:
        params = info.action_class.Params.model_json_schema()
        defs = params.pop("$defs", {})
        data["$defs"].update(defs)
        key = f"with_{info.name}"
        data["$defs"][key] = params
        variants.append(
            {
                "if": {"properties": {"do": {"const": info.name}}},
                "then": {"properties": {"with": {"$ref": f"#/$defs/{key}"}}},
            }
        )
    rule = data["$defs"].get("Rule")
    if rule is not None:
        rule["properties"]["do"]["enum"] = [info.name for info in loaded]
        rule["allOf"] = variants
    click.echo(json.dumps(data, indent=1))


@cli.command("actions")
@friendly
def actions_cmd():
    """List the registered actions (built-in and plugins) and where each comes from."""
    from . import registry

    loaded, broken = registry.load_all()
    for info in loaded:
        click.echo(f"{info.name:18s} {info.action_class.summary}  [{info.origin}]")
    for message in broken:
        click.echo(f"surgeon: error: {message}", err=True)
    if broken:
        sys.exit(EXIT_BAD_INPUT)


@cli.command("recipes")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print name, description and file of each as JSON.")
@friendly
def recipes_cmd(name, as_json):
    """List the shipped recipes (run one with `surgeon apply recipes:NAME MODEL_DIR -o OUT`), or
    print recipe NAME's YAML (to copy and edit: `surgeon recipes lora-llama > mine.yaml`)."""
    from . import recipe_library
    from .recipe import load_recipe

    if name is not None:
        with open(recipe_library.path_of(name), encoding="utf-8") as handle:
            click.echo(handle.read(), nl=False)
        return
    listing = []
    for known in recipe_library.names():
        recipe = load_recipe(recipe_library.LIBRARY_PREFIX + known)
        listing.append({"name": known, "description": recipe.description or "", "file": recipe.source})
    if as_json:
        click.echo(json.dumps(listing, indent=1))
        return
    from tabulate import tabulate

    rows = [[f"{recipe_library.LIBRARY_PREFIX}{r['name']}", r["description"]] for r in listing]
    click.echo(tabulate(rows, headers=["recipe", "description"], tablefmt="simple", maxcolwidths=[None, 90]))


from .cli_train import train_cmd  # noqa: E402
cli.add_command(train_cmd, "train")
from .cli_export import export_cmd, import_gguf_cmd, import_peft_cmd  # noqa: E402
cli.add_command(export_cmd, "export")
cli.add_command(import_peft_cmd, "import-peft")
cli.add_command(import_gguf_cmd, "import-gguf")
from .cli_generate import generate_cmd  # noqa: E402
cli.add_command(generate_cmd, "generate")


def main() -> None:
    cli(prog_name="surgeon")


if __name__ == "__main__":
    main()
