"""`surgeon generate`: load a checkpoint or a diff on its base, generate, print the new text.

Registered on the `surgeon` group in cli.py with `cli.add_command(...)`.
"""

from __future__ import annotations

import click

from .cli_common import friendly, quiet_transformers


@click.command("generate")
@click.argument("path", metavar="DIFF_OR_MODEL", type=click.Path(file_okay=False))
@click.option("-p", "--prompt", required=True, help="Text to continue (or, with --chat, the user's message).")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most tokens to generate.")
@click.option("--greedy", is_flag=True, help="Argmax decoding (deterministic) instead of sampling.")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True),
              help="Sampling temperature (default: the checkpoint's).")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True),
              help="Nucleus sampling mass (default: the checkpoint's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling.")
@click.option("--chat", is_flag=True, help="Send the prompt as one user turn (chat template).")
@click.option("--base", "base_dir", type=click.Path(file_okay=False),
              help="Base model dir of a diff (default: the manifest's).")
@click.option("--allow-pickle", is_flag=True, help="Allow pickle .bin base weights.")
@friendly
def generate_cmd(path, prompt, max_new_tokens, greedy, temperature, top_p, seed, chat, base_dir,
                 allow_pickle):
    """Generate text with the model in DIFF_OR_MODEL: a checkpoint directory, or a surgeon diff
    (loaded onto its base with its recipe re-applied). Prints only the generated text, as it is
    produced."""
    quiet_transformers()
    from transformers import TextStreamer

    from .generation import generate_text, load_generator

    generator = load_generator(path, base_dir=base_dir, allow_pickle=allow_pickle)
    streamer = TextStreamer(generator.tokenizer, skip_prompt=True, skip_special_tokens=True)
    generate_text(generator, prompt, max_new_tokens=max_new_tokens, greedy=greedy, temperature=temperature,
                  top_p=top_p, seed=seed, chat=chat, streamer=streamer)  # fmt: skip
