"""Text generation from a checkpoint or a surgeon diff, with transformers' own `generate`.

`load_generator(path)` takes either a model directory (config.json) or a diff directory
(manifest.json: its base is loaded and the diff applied, exactly as `surgeon.load`). It reads the
config and the tokenizer of the checkpoint the model stands on at once and the weights on first
use, so a bad prompt or option is reported before any weight is read. `generate_text` runs
`model.generate` (transformers' KV cache; patched attention such as a causal sliding window
takes part through the attention interface) and returns the new text only.
"""

from __future__ import annotations

import os

from .checkpoint import load_model, model_class, read_config
from .diff import MANIFEST, load, read_manifest
from .errors import SurgeonError
from .train.data import load_tokenizer


class Generator:
    """A model to generate with: its tokenizer and config now, its weights on first `.model`."""

    def __init__(self, path: str, *, base_dir: str | None = None, allow_pickle: bool = False):
        if os.path.isfile(os.path.join(path, MANIFEST)):
            self.diff_dir: str | None = path
            self.base_dir = base_dir or read_manifest(path)["base"]["path"]
        else:
            if base_dir is not None:
                raise SurgeonError(f"{path} is a model directory, not a diff: --base applies to diffs only")
            self.diff_dir, self.base_dir = None, path
        self.config = read_config(self.base_dir)
        cls = model_class(self.config)
        if not (hasattr(cls, "can_generate") and cls.can_generate()):
            raise SurgeonError(
                f"{path}: {cls.__name__} has no language-modelling head to generate with "
                "(a …ForCausalLM, …LMHeadModel or …ForConditionalGeneration checkpoint is needed)"
            )
        self.tokenizer = load_tokenizer(self.base_dir, "generate")
        self._allow_pickle = allow_pickle
        self._model = None

    @property
    def model(self):
        if self._model is None:
            if self.diff_dir is None:
                self._model, _ = load_model(self.base_dir, allow_pickle=self._allow_pickle)
            else:
                self._model = load(self.base_dir, self.diff_dir, allow_pickle=self._allow_pickle)
        return self._model

    @property
    def max_positions(self) -> int | None:
        # a diff may extend positions (extend_positions): then only the patched model's config says
        config = self.model.config.to_dict() if self.diff_dir is not None else self.config
        value = config.get("max_position_embeddings") or config.get("n_positions")
        return value if isinstance(value, int) and value > 0 else None


def load_generator(path: str, *, base_dir: str | None = None, allow_pickle: bool = False) -> Generator:
    """A model directory or a diff directory (with its base: `base_dir` or the manifest's)."""
    return Generator(path, base_dir=base_dir, allow_pickle=allow_pickle)


def encode_prompt(tokenizer, prompt: str, *, chat: bool):
    """(1, n) input ids: the plain prompt, or a one-turn chat through the tokenizer's template."""
    if not prompt:
        raise SurgeonError("generate: the prompt is empty")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SurgeonError("generate: --chat: this tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def generate_text(
    generator: Generator,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    greedy: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int = 0,
    chat: bool = False,
    streamer=None,
) -> str:
    """Generate up to `max_new_tokens` after `prompt`; return the new text (special tokens
    dropped). greedy: argmax decoding; otherwise sampling with the checkpoint's generation
    config, `temperature` / `top_p` overriding it, seeded by `seed`."""
    import torch

    tokenizer = generator.tokenizer
    ids = encode_prompt(tokenizer, prompt, chat=chat)
    limit = generator.max_positions
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise SurgeonError(
            f"generate: the prompt ({ids.shape[1]} tokens) plus --max-new-tokens {max_new_tokens} exceeds "
            f"the model's {limit} positions"
        )
    options = dict(max_new_tokens=max_new_tokens, do_sample=not greedy)
    if not greedy:
        options.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None})
    else:  # the checkpoint's sampling settings would only warn under greedy decoding
        options.update(temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    with torch.no_grad():
        out = generator.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pad_token_id=pad, streamer=streamer, **options
        )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
