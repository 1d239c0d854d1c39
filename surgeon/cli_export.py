"""CLI: `surgeon export` (HF checkpoint, self-contained surgeon directory, PEFT adapter),
`surgeon import-peft` and `surgeon import-gguf`.

Registered on the `surgeon` group in cli.py with `cli.add_command(...)`.
"""

from __future__ import annotations

import click

from .cli_common import TRUST_BASE_HELP, friendly, quiet_transformers


@click.command("export")
@click.argument("diff_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--base", "base_dir", type=click.Path(file_okay=False), help="Base model dir (default: the one in the manifest).")
@click.option(
    "--format", "fmt", type=click.Choice(["hf", "surgeon", "peft"]), default="hf", show_default=True,
    help="hf: a plain transformers checkpoint with LoRA merged (attention surgery as Longformer/Mistral/"
    "Qwen2); surgeon: one self-contained directory for any surgery (surgeon.load(OUT)); peft: a PEFT LoRA adapter.",
)  # fmt: skip
@click.option("--adapter", "adapters", multiple=True, help="LoRA adapter(s) to export (repeatable; peft: exactly one).")
@click.option("--trust-base", is_flag=True, help=TRUST_BASE_HELP)
@click.option("--force", is_flag=True, help="Replace OUT if it is surgeon's own output (atomically).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@friendly
def export_cmd(diff_dir, out_dir, base_dir, fmt, adapters, trust_base, force, no_progress):
    """Export DIFF_DIR: merged into its base as a plain Hugging Face checkpoint (streamed tensor by
    tensor, never the whole model in memory; attention surgery as Longformer / Mistral / Qwen2),
    as one self-contained directory for any surgery (--format surgeon), or as a PEFT adapter
    (--format peft)."""
    from .errors import SurgeonError

    quiet_transformers()
    if fmt == "peft":
        from .peft_io import export_peft

        if len(adapters) > 1:
            raise SurgeonError("--format peft writes one adapter; give --adapter once")
        config = export_peft(diff_dir, out_dir, base_dir, adapter=adapters[0] if adapters else None, overwrite=force,
                             trust_base=trust_base)
        click.echo(
            f"wrote {out_dir}: PEFT LoRA adapter on {len(config['target_modules'])} modules "
            f"(r={config['r']}, lora_alpha={config['lora_alpha']})"
        )
        return
    if fmt == "surgeon":
        from .export.self_contained import export_self_contained

        summary = export_self_contained(
            diff_dir, out_dir, base_dir, progress=not no_progress, adapters=list(adapters) or None, overwrite=force,
            trust_base=trust_base,
        )
        lora, rules = summary["lora"], summary["rules"]
        click.echo(
            f"wrote {out_dir}: {summary['tensors']} base tensors ({summary['bytes'] / 2**20:.1f} MiB, "
            f"{summary['merged']} with LoRA merged), {summary['added']} added tensors, {rules} "
            f"rule{'s' if rules != 1 else ''} re-applied on load; LoRA merged: "
            f"{', '.join(lora['merged']) or 'none'}, kept: {', '.join(lora['kept']) or 'none'}; "
            f"load with surgeon.load({out_dir!r})"
        )
        return
    from .export import export_merged

    summary = export_merged(
        diff_dir, out_dir, base_dir, progress=not no_progress, adapters=list(adapters) or None, overwrite=force,
        trust_base=trust_base,
    )
    changed = f"; config changed: {', '.join(summary['config_changes'])}" if summary["config_changes"] else ""
    native = ""
    if "architecture" in summary:  # attention surgery: written as the architecture that computes it
        usage = ", ".join(f"{key} {value}" for key, value in summary["usage"].items())
        source = summary["source_architecture"]
        native = f"{summary['architecture']} converted from {source} ({usage}; see README.md), "
    click.echo(
        f"wrote {out_dir}: {native}{summary['tensors']} tensors ({summary['bytes'] / 2**20:.1f} MiB), "
        f"{summary['merged']} with LoRA merged, {summary['from_diff']} from the diff{changed}"
    )


@click.command("import-peft")
@click.argument("peft_dir", type=click.Path(file_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory for the diff.")
@click.option("--base", "base_dir", type=click.Path(file_okay=False), help="Base model dir (default: base_model_name_or_path).")
@click.option("--name", default="default", show_default=True, help="Adapter name in the surgeon diff.")
@click.option("--force", is_flag=True, help="Replace OUT if it is surgeon's own output (atomically).")
@friendly
def import_peft_cmd(peft_dir, out_dir, base_dir, name, force):
    """Turn the PEFT LoRA adapter in PEFT_DIR into a surgeon diff (loadable with `surgeon.load`)."""
    from .peft_io import import_peft

    quiet_transformers()
    manifest = import_peft(peft_dir, out_dir, base_dir, name=name, overwrite=force)
    click.echo(f"wrote {out_dir}: surgeon diff of {len(manifest['tensors'])} LoRA tensors on {manifest['base']['path']}")


@click.command("import-gguf")
@click.argument("gguf_file", metavar="FILE", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              help="Output directory (default: the cache, $SURGEON_CACHE or ~/.cache/surgeon).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (atomically).")
@friendly
def import_gguf_cmd(gguf_file, out_dir, force):
    """Dequantise the GGUF file FILE into a plain Hugging Face checkpoint (fp32 safetensors, config,
    tokenizer, generation config) that every surgeon command accepts as MODEL_DIR. Prints the
    directory on stdout."""
    from .gguf_convert import convert, converted

    quiet_transformers()
    directory = converted(gguf_file) if out_dir is None else convert(gguf_file, out_dir, overwrite=force)
    click.echo(directory)
