"""`surgeon train`: parse, call `surgeon.train.train`, render.

Runs as one process by default; under `accelerate launch --multi_gpu --num_processes N …`
the same command runs data-parallel (CPU: gloo). Only rank 0 prints and writes.
"""

from __future__ import annotations

import sys

import click

from .cli_common import TRUST_BASE_HELP, friendly, quiet_transformers


@click.command("train")
@click.argument("diff_dir", type=click.Path(file_okay=False))
@click.option("--data", "data_files", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="UTF-8 text file to train on (repeatable); tokenized with the base's tokenizer and packed.")
@click.option("--objective", type=click.Choice(["distill", "mlm", "clm"]), default="distill", show_default=True,
              help="distill: match the unpatched base (dense attention) layer by layer; mlm: masked LM; clm: next token.")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Optimizer steps in total.")
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True, help="Tokens per packed sequence.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Sequences per step, per process.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="Peak AdamW learning rate (linear warm-up, cosine decay to 10 %).")
@click.option("--save-every", type=click.IntRange(min=1), help="Write a resumable checkpoint every K steps (to OUT.checkpoints/).")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in OUT.checkpoints/.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory for the trained diff.")
@click.option("--base", "base_dir", type=click.Path(file_okay=False), help="Base model dir (default: the one in the manifest).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for batch order, masking and dropout.")
@click.option("--final", type=click.Choice(["hidden", "pooled", "logits", "none"]), default="hidden", show_default=True,
              help="distill: also match the final hidden states (relative MSE), their mean-pooled cosine "
                   "(sentence embeddings), or the logits (KL).")
@click.option("--final-weight", type=float, default=1.0, show_default=True, help="distill: weight of the final-output term.")
@click.option("--attn-weight", type=float, default=1.0, show_default=True,
              help="distill: weight of the per-layer attention-output terms (0: match the final output only).")
@click.option("--time-limit", type=click.FloatRange(min=0), help="Stop after this many seconds of training and write the diff.")
@click.option("--layerwise", is_flag=True,
              help="distill: feed each patched attention module the teacher's input and match its output there "
                   "(layers calibrate independently; --final/--attn-weight do not apply). Good as a first stage.")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16"]), default="no", show_default=True,
              help="bf16: forward passes under bf16 autocast (weights and optimizer stay fp32); ~1.5x faster on CPUs with AVX512-BF16/AMX.")
@click.option("--trust-base", is_flag=True, help=TRUST_BASE_HELP)
@click.option("--force", is_flag=True, help="Replace OUT if it exists (atomically).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@friendly
def train_cmd(diff_dir, data_files, objective, steps, seq_len, batch_size, lr, save_every, resume, out_dir,
              base_dir, seed, final, final_weight, attn_weight, time_limit, layerwise, mixed_precision, trust_base, force, no_progress):  # fmt: skip
    """Train the trainable tensors of the patched model in DIFF_DIR; write the trained diff to OUT."""
    quiet_transformers()
    from .train import TrainingInterrupted, train

    try:
        result = train(
            diff_dir, list(data_files), out_dir=out_dir, objective=objective, steps=steps, seq_len=seq_len,
            batch_size=batch_size, lr=lr, save_every=save_every, resume=resume, base_dir=base_dir, seed=seed,
            final=final, final_weight=final_weight, attn_weight=attn_weight, time_limit=time_limit, mixed_precision=mixed_precision,
            layerwise=layerwise, trust_base=trust_base, overwrite=force, progress=not no_progress,
        )  # fmt: skip
    except TrainingInterrupted as exc:
        click.echo(f"surgeon: error: {exc}", err=True)
        sys.exit(128 + exc.signal_number)
    from accelerate import PartialState

    if PartialState().is_main_process:
        last = f"{result.losses[-1]:.4g}" if result.losses else "n/a"
        end = result.steps if result.stopped_at is None else result.stopped_at
        click.echo(
            f"trained {result.trainable:,} parameters for steps {result.start_step + 1}–{end} "
            f"({objective}); final loss {last}; wrote {result.out_dir}"
        )
