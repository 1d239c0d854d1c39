"""Roles resolve structurally, to the expected module paths, on many families."""

from __future__ import annotations

import pytest
import transformers
from conftest import FAMILIES, tiny_model

import surgeon
from surgeon.modelmap import ModelMap

# family -> role -> expected paths for layer 0 of the first stack (and globals)
EXPECTED = {
    "bert": {
        "attn": "encoder.layer.0.attention.self",
        "attn.q": "encoder.layer.0.attention.self.query",
        "attn.o": "encoder.layer.0.attention.output.dense",
        "mlp.up": "encoder.layer.0.intermediate.dense",
        "mlp.down": "encoder.layer.0.output.dense",
        "embed": "embeddings",
        "head": "pooler",
    },
    "roberta": {
        "attn.v": "roberta.encoder.layer.0.attention.self.value",
        "attn.o": "roberta.encoder.layer.0.attention.output.dense",
        "head": "lm_head",
        "embed": "roberta.embeddings",
    },
    "distilbert": {
        "attn": "transformer.layer.0.attention",
        "attn.q": "transformer.layer.0.attention.q_lin",
        "attn.o": "transformer.layer.0.attention.out_lin",
        "mlp": "transformer.layer.0.ffn",
        "mlp.up": "transformer.layer.0.ffn.lin1",
        "mlp.down": "transformer.layer.0.ffn.lin2",
    },
    "gpt2": {
        "attn": "transformer.h.0.attn",
        "attn.qkv": "transformer.h.0.attn.c_attn",
        "attn.q": "transformer.h.0.attn.c_attn[q:0:32]",
        "attn.v": "transformer.h.0.attn.c_attn[v:64:96]",
        "attn.o": "transformer.h.0.attn.c_proj",
        "mlp.up": "transformer.h.0.mlp.c_fc",
        "mlp.down": "transformer.h.0.mlp.c_proj",
        "embed": "transformer.wte",
        "head": "lm_head",
        "norm": "transformer.ln_f",
    },
    "llama": {
        "attn": "model.layers.0.self_attn",
        "attn.k": "model.layers.0.self_attn.k_proj",
        "attn.o": "model.layers.0.self_attn.o_proj",
        "mlp": "model.layers.0.mlp",
        "mlp.gate": "model.layers.0.mlp.gate_proj",
        "mlp.up": "model.layers.0.mlp.up_proj",
        "mlp.down": "model.layers.0.mlp.down_proj",
        "norm": "model.norm",
        "head": "lm_head",
    },
    "mistral": {"attn.q": "model.layers.0.self_attn.q_proj", "mlp.gate": "model.layers.0.mlp.gate_proj"},
    "qwen2": {"attn.q": "model.layers.0.self_attn.q_proj", "mlp.down": "model.layers.0.mlp.down_proj"},
    "t5": {
        "attn": "encoder.block.0.layer.0.SelfAttention",
        "attn.o": "encoder.block.0.layer.0.SelfAttention.o",
        "xattn": "decoder.block.0.layer.1.EncDecAttention",
        "xattn.q": "decoder.block.0.layer.1.EncDecAttention.q",
        "mlp.up": "encoder.block.0.layer.1.DenseReluDense.wi",
        "mlp.down": "decoder.block.0.layer.2.DenseReluDense.wo",
    },
    "bart": {
        "attn": "decoder.layers.0.self_attn",
        "xattn": "decoder.layers.0.encoder_attn",
        "xattn.o": "decoder.layers.0.encoder_attn.out_proj",
        "mlp.up": "encoder.layers.0.fc1",
    },
    "vit": {
        "attn": "layers.0.attention",
        "attn.o": "layers.0.attention.o_proj",
        "mlp.up": "layers.0.mlp.fc1",
        "embed": "embeddings",
        "head": "pooler",
    },
}

# number of self-attention modules and layers per family (encoder + decoder stacks)
COUNTS = {"t5": (5, 5), "bart": (5, 5)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_roles_resolve_to_expected_paths(family):
    table = ModelMap(tiny_model(family)).role_table()
    for role, path in EXPECTED[family].items():
        assert path in table[role], f"{family}: {role} -> {table[role]}"
    layers, attns = COUNTS.get(family, (3, 3))
    assert len(table["layer"]) == layers
    assert len(table["attn"]) == attns
    # every layer has one q, k, v, o projection for its self-attention
    for part in "qkvo":
        assert len(table[f"attn.{part}"]) == attns, (family, part, table[f"attn.{part}"])
    # cross-attention is never self-attention
    assert not set(table["attn"]) & set(table["xattn"])
    assert len(table["xattn"]) == {"t5": 2, "bart": 2}.get(family, 0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attention_role_matches_interface_callers(family):
    """The `attn`/`xattn` modules are exactly the modules whose forward calls the interface."""
    from surgeon.modelmap import routes_through_interface

    model = tiny_model(family)
    table = ModelMap(model).role_table()
    callers = {
        path for path, module in model.named_modules()
        if routes_through_interface(module) and type(module).__name__.endswith(("Attention", "SelfAttention"))
    }  # fmt: skip
    assert callers == set(table["attn"]) | set(table["xattn"])


def test_layers_count_within_each_stack():
    model = tiny_model("t5")
    targets = ModelMap(model).select(surgeon.recipe.Selector(role="attn", layers="-1:"))
    assert sorted(t.path for t in targets) == [
        "decoder.block.1.layer.0.SelfAttention",
        "encoder.block.2.layer.0.SelfAttention",
    ]


def test_selector_keys_are_anded():
    model = tiny_model("bert")
    from surgeon.recipe import Selector

    mm = ModelMap(model)
    by_type = mm.select(Selector(type="Linear", layers="0"))
    assert {t.path for t in by_type} == {
        f"encoder.layer.0.{p}" for p in
        ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")
    }  # fmt: skip
    by_glob = mm.select(Selector(path="encoder.layer.*.attention.self", layers=[1]))
    assert [t.path for t in by_glob] == ["encoder.layer.1.attention.self"]
    by_regex = mm.select(Selector(regex=r"encoder\.layer\.[02]\.output\.dense"))
    assert [t.path for t in by_regex] == ["encoder.layer.0.output.dense", "encoder.layer.2.output.dense"]
    assert mm.select(Selector(role="head", layers="0:1")) == []
    # beside path/regex/type, role means "inside a module with that role"
    inside = mm.select(Selector(role="attn", type="Linear", layers=[2]))
    assert [t.path for t in inside] == [f"encoder.layer.2.attention.self.{p}" for p in ("query", "key", "value")]
    assert [t.path for t in mm.select(Selector(role="head", type="Linear"))] == ["pooler.dense"]
    # alone, role is the module itself: the whole model is one target, not every module
    assert [t.path for t in mm.select(Selector(role="model"))] == [""]


def test_structurally_similar_families_not_in_the_list():
    """Families with no entry anywhere in surgeon: Phi-3 (fused qkv_proj), Gemma, ELECTRA."""
    phi3 = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, vocab_size=96, max_position_embeddings=64, pad_token_id=0))  # fmt: skip
    table = ModelMap(phi3).role_table()
    assert table["attn"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    # GQA-aware slices: q = 4 heads x 8, k = v = 2 heads x 8
    assert "model.layers.0.self_attn.qkv_proj[q:0:32]" in table["attn.q"]
    assert "model.layers.0.self_attn.qkv_proj[k:32:48]" in table["attn.k"]
    assert "model.layers.0.self_attn.qkv_proj[v:48:64]" in table["attn.v"]
    assert table["attn.o"] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]

    gemma = transformers.GemmaModel(transformers.GemmaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
        intermediate_size=48, vocab_size=96))  # fmt: skip
    table = ModelMap(gemma).role_table()
    assert len(table["attn.q"]) == 2 and table["mlp.gate"] == ["layers.0.mlp.gate_proj", "layers.1.mlp.gate_proj"]

    electra = transformers.ElectraModel(transformers.ElectraConfig(
        embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        vocab_size=96))  # fmt: skip
    table = ModelMap(electra).role_table()
    assert table["attn.o"] == ["encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense"]
    assert table["mlp.down"] == ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]


def test_roles_command(tiny_model_dir):
    from click.testing import CliRunner

    from surgeon.cli import cli

    result = CliRunner().invoke(cli, ["roles", tiny_model_dir("gpt2")])
    assert result.exit_code == 0, result.output
    assert "transformer.h.{0..2}.attn.c_attn[q:0:32]" in result.output


def test_unpatched_mistral_sliding_window_is_honoured():
    """A Mistral layer with config.sliding_window, left unpatched, keeps its window under surgeon."""
    import torch

    from conftest import FAMILIES

    config = FAMILIES["mistral"][0]()
    config.sliding_window = 4
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).eval()
    ids = torch.randint(3, 96, (1, 12))
    with torch.no_grad():
        model.set_attn_implementation("eager")
        expected = model(input_ids=ids).logits
        model.set_attn_implementation("sdpa")
        from surgeon.attention import interface

        interface.ensure_registered()
        model.set_attn_implementation(interface.ATTN_IMPLEMENTATION)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
