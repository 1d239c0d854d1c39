"""Tiny checkpoints with real tokenizers for the training tests (character vocab for BERT,
byte-level BPE for GPT-2 and Llama), a diff maker, and a short text to train on."""

from __future__ import annotations

import os
import string

import pytest
import torch
import transformers

import surgeon

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many times faster on one thread on a shared 2-core machine (autouse in
    every module that imports it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TEXT = (
    "Return the number of items in a container. The argument may be a sequence (such as a string, "
    "bytes, tuple, list, or range) or a collection (such as a dictionary, set, or frozen set).\n"
)


def char_tokenizer():
    chars = list(string.ascii_lowercase + string.digits + ".,:;()[]_-='\"/")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars if c.isalnum()]
    return transformers.BertTokenizer(vocab={v: i for i, v in enumerate(vocab)})


def _byte_symbols() -> list[str]:
    # GPT-2's byte → printable-character table (Radford et al. 2019, encoder.py)
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def byte_tokenizer():
    vocab = {c: i for i, c in enumerate(_byte_symbols())}
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.GPT2Tokenizer(vocab=vocab, merges=[])


def make_base(directory, family: str = "bert", seed: int = 0, **overrides) -> str:
    """Save a tiny model of `family` with a matching tokenizer; return the directory."""
    tok = byte_tokenizer() if family in ("gpt2", "llama") else char_tokenizer()
    vocab = len(tok)
    if family in ("bert", "bert-headless"):
        config = transformers.BertConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=48, vocab_size=vocab, max_position_embeddings=64),
                                         **overrides})  # fmt: skip
        cls = transformers.BertModel if family == "bert-headless" else transformers.BertForMaskedLM
    elif family == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, n_positions=64,
                                         bos_token_id=vocab - 1, eos_token_id=vocab - 1, **overrides)  # fmt: skip
        cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=48, vocab_size=vocab,
                                          max_position_embeddings=64, bos_token_id=vocab - 1,
                                          eos_token_id=vocab - 1, pad_token_id=None, **overrides)  # fmt: skip
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def make_diff(base: str, out: str, rules, base_mode: str = "frozen", perturb: float = 0.0) -> str:
    model, _ = surgeon.load_model(base)
    surgeon.patch(model, {"surgeon": 1, "base": base_mode, "rules": rules})
    if perturb:  # move the trainable tensors away from the base: distillation must bring them back
        generator = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(perturb * torch.randn(p.shape, generator=generator))
    surgeon.save_diff(model, out, base_dir=base)
    return out


def data_file(tmp_path, text: str = TEXT * 20, name: str = "data.txt") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def step_dirs(root: str) -> list[str]:
    """The step checkpoints in a checkpoint directory (beside surgeon's marker file)."""
    return sorted(n for n in os.listdir(root) if n.startswith("step-")) if os.path.isdir(root) else []


BITFIT_ATTN = [{"do": "bitfit", "select": {"role": "attn"}}]
FAST = dict(seq_len=32, batch_size=4, progress=False)
