"""`surgeon export --format hf` on attention surgery: the transformers architecture that computes
the patched function (Longformer for BERT/RoBERTa encoders, Mistral/Qwen2 for Llama decoders),
loaded by plain transformers in a process where `import surgeon` is blocked."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from click.testing import CliRunner
from conftest import FF, HEADS, LAYERS, VOCAB, H, first_output
from export_support import make_diff, run_plain, save_base

import surgeon
from surgeon.cli_export import export_cmd
from surgeon.errors import SurgeonError
from surgeon.export import export_merged


def _sliding(select: dict, **params) -> dict:
    return {"do": "sliding_window", "select": select, "with": params}


LORA_QV = {"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 4, "alpha": 8}}
RECIPES = {
    "bert": [LORA_QV, {"do": "bitfit", "select": {"role": "model"}}, _sliding({"role": "attn"}, window=4, global_tokens=[0])],
    "roberta_mlm": [LORA_QV, _sliding({"role": "attn"}, window=[4, 9, 8])],  # per layer; 9 is ±4, Longformer's 8
    "bert_cls": [LORA_QV, {"do": "unfreeze", "select": {"role": "head"}},
                 _sliding({"role": "attn", "layers": "1:"}, window=6, global_tokens=[0, 3])],  # layer 0 stays dense
    "bert_long": [{"do": "extend_positions", "select": {"role": "embed"}, "with": {"length": 128}}, LORA_QV,
                  _sliding({"role": "attn"}, window=8, global_tokens=[0])],
    "llama_generate": [LORA_QV, _sliding({"role": "attn"}, window=5)],
    "llama_some_generate": [LORA_QV, _sliding({"role": "attn", "layers": [0, 2]}, window=5)],
    "minilm": [{"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 8, "alpha": 16}},
               _sliding({"role": "attn"}, window=32, global_tokens=[0])],
}  # fmt: skip
TARGETS = {
    "bert": "LongformerModel", "roberta_mlm": "LongformerForMaskedLM", "bert_cls": "LongformerForSequenceClassification",
    "bert_long": "LongformerModel", "llama_generate": "MistralForCausalLM", "llama_some_generate": "Qwen2ForCausalLM",
    "minilm": "LongformerModel",
}  # fmt: skip


def _bert_cls(directory: str) -> str:
    config = transformers.BertConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                     intermediate_size=FF, vocab_size=VOCAB, max_position_embeddings=64, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).eval().save_pretrained(directory)
    return directory


def _padded(n: int, lengths: list[int], pad: int, seed: int = 1) -> dict:
    """Right-padded ids (B, n) and the attention mask."""
    ids = torch.randint(3, VOCAB, (len(lengths), n), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}


def _minilm_inputs(minilm_dir: str) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    long = " ".join(
        ["Surgery turns a dense encoder into a sliding-window one that ships as Longformer."] * 12
    )
    return dict(tok([long, "A short sentence, padded on the right."], padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def native(tmp_path_factory, minilm_dir):
    """key -> (base, diff, out, inputs for the patched model, inputs for the export); plain outputs."""
    tmp = str(tmp_path_factory.mktemp("native"))
    bases = {
        "bert": save_base("bert", f"{tmp}/bert"),
        "roberta_mlm": save_base("roberta", f"{tmp}/roberta", max_shard_size="20KB"),
        "bert_cls": _bert_cls(f"{tmp}/bert_cls"),
        "bert_long": f"{tmp}/bert",
        "llama_generate": save_base("llama", f"{tmp}/llama", max_shard_size="20KB"),
        "llama_some_generate": f"{tmp}/llama",
        "minilm": minilm_dir,
    }
    inputs = {
        "bert": _padded(23, [23, 15], pad=0), "roberta_mlm": _padded(30, [30, 19], pad=1),
        "bert_cls": _padded(20, [20, 12], pad=0), "bert_long": _padded(100, [100, 61], pad=0),
        "llama_generate": _padded(30, [30, 30], pad=0), "llama_some_generate": _padded(30, [30, 30], pad=0),
        "minilm": _minilm_inputs(minilm_dir),
    }  # fmt: skip
    cases = {}
    for key, recipe in RECIPES.items():
        diff = make_diff(bases[key], f"{tmp}/{key}-diff", {"surgeon": 1, "rules": recipe})
        summary = export_merged(diff, f"{tmp}/{key}-out", progress=False)
        plain_inputs = dict(inputs[key])
        glob = summary["usage"].get("global_attention_positions")
        if glob is not None:  # what the exported README tells a Longformer user to pass
            plain_inputs["global_attention_mask"] = torch.zeros_like(plain_inputs["input_ids"])
            plain_inputs["global_attention_mask"][:, glob] = 1
        cases[key] = (bases[key], diff, f"{tmp}/{key}-out", inputs[key], plain_inputs, summary)
    plain = run_plain({k: (c[2], c[4]) for k, c in cases.items()}, tmp)
    return cases, plain


@pytest.mark.parametrize("key", list(RECIPES))
def test_native_export_gives_patched_outputs(native, key):
    cases, plain = native
    base, diff, out, inputs, _, summary = cases[key]
    assert summary["architecture"] == TARGETS[key]
    patched = surgeon.load(base, diff)
    dense, _ = surgeon.load_model(base)
    fits = inputs["input_ids"].shape[1] <= dense.config.max_position_embeddings  # bert_long's base is shorter
    with torch.no_grad():
        want, before = first_output(patched(**inputs)), first_output(dense(**inputs)) if fits else None
    real = inputs["attention_mask"].bool()
    got = plain[key]
    if want.dim() == 3:  # per token: padded positions hold no output worth comparing
        want, got, before = want[real], got[real], before[real] if fits else None
    scale = max(1.0, want.abs().max().item())
    assert (got - want).abs().max().item() <= 1e-5 * scale
    if fits:
        assert (before - want).abs().max().item() > 1e-3 * scale  # the surgery changed the function


@pytest.mark.parametrize("key", ["llama_generate", "llama_some_generate"])
def test_native_decoder_generates_the_same_tokens(native, key):
    cases, plain = native
    base, diff, *_ = cases[key]
    prompt = cases[key][3]["input_ids"][:1, :6]
    patched = surgeon.load(base, diff)
    want = patched.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False, pad_token_id=0
    )
    assert torch.equal(plain[f"{key}:tokens"], want)


def test_longformer_config_and_readme_record_what_to_pass(native):
    cases, _ = native
    _, _, out, *_ = cases["bert_cls"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["model_type"] == "longformer" and config["architectures"] == [
        "LongformerForSequenceClassification"
    ]
    assert config["global_attention_positions"] == [0, 3]
    assert config["attention_window"] == [
        132,
        6,
        6,
    ]  # layer 0 stayed dense: the first multiple of 6 >= 2 * 64
    assert config["max_position_embeddings"] == 64 + 1  # BERT's table shifted below padding_idx + 1 = 1
    readme = open(os.path.join(out, "README.md")).read()
    assert "global_attention_mask[:, [0, 3]] = 1" in readme
    assert not any("surgeon" in n for n in surgeon.checkpoint.inspect_checkpoint(out).tensors)


def test_sharded_base_keeps_its_shard_names(native):
    cases, _ = native
    base, _, out, *_ = cases["roberta_mlm"]
    base_files = set(
        json.load(open(os.path.join(base, "model.safetensors.index.json")))["weight_map"].values()
    )
    out_index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(out_index["weight_map"].values()) == base_files
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == sorted(base_files)
    assert any(n.endswith("query_global.weight") for n in out_index["weight_map"])


def test_minilm_export_keeps_tokenizer_and_model_card(native, minilm_dir):
    cases, _ = native
    _, _, out, *_ = cases["minilm"]
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        assert (
            open(os.path.join(minilm_dir, name), "rb").read() == open(os.path.join(out, name), "rb").read()
        ), name
    readme = open(os.path.join(out, "README.md")).read()
    assert readme.startswith(open(os.path.join(minilm_dir, "README.md")).read().rstrip())
    assert "## Exported by surgeon" in readme


def test_cli_names_the_architecture(tmp_path):
    base = save_base("llama", str(tmp_path / "base"))
    diff = make_diff(
        base, str(tmp_path / "diff"), {"surgeon": 1, "rules": [_sliding({"role": "attn"}, window=4)]}
    )
    result = CliRunner().invoke(export_cmd, [diff, "-o", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "MistralForCausalLM converted from LlamaForCausalLM (sliding_window 4" in result.output


# ---- what no native architecture holds: one line each, the modules, the way out ---------------
REFUSED = {
    "dilation": ("bert", [_sliding({"role": "attn"}, window=4, dilation=[1, 2])],
                 r"encoder\.layer\.0\.attention\.self.*dilation \[1, 2\].*no dilation; export with --format surgeon"),
    "blockwise": ("bert", [{"do": "blockwise", "select": {"role": "attn", "layers": 1}, "with": {"block_size": 4}}],
                  r"encoder\.layer\.1\.attention\.self \(rule 1 \(blockwise\).*blockwise attention.*--format surgeon"),
    "linformer": ("roberta", [{"do": "linformer", "select": {"role": "attn"}, "with": {"k": 4, "max_length": 64}}],
                  r"roberta\.encoder\.layer\.0\.attention\.self.*linformer attention.*--format surgeon"),
    "windows_indivisible": ("bert", [_sliding({"role": "attn"}, window=[4, 6, 8])],
                            r"attention_window 6 on encoder\.layer\.1\.attention\.self does not divide the largest, 8"),
    "window_too_small": ("bert", [_sliding({"role": "attn"}, window=3)], r"window 3 \(±1\).*attention_window >= 4"),
    "globals_differ": ("bert", [_sliding({"role": "attn", "layers": 0}, window=4, global_tokens=[0]),
                                _sliding({"role": "attn", "layers": "1:"}, window=4)],
                       r"differ in global tokens \(\[0\] on encoder\.layer\.0.*none on encoder\.layer\.1"),
    "windows_differ": ("llama", [_sliding({"role": "attn", "layers": 0}, window=4),
                                 _sliding({"role": "attn", "layers": "1:"}, window=8)],
                       r"different windows \(4 on model\.layers\.0\.self_attn; 8 on model\.layers\.1\.self_attn"),
    "decoder_sink": ("llama", [_sliding({"role": "attn"}, window=4, global_tokens=[0])], r"global tokens \[0\].*sink"),
    "adapter": ("bert", [_sliding({"role": "attn"}, window=4),
                         {"do": "adapter", "select": {"role": "layer", "layers": 0}, "with": {"size": 4}}],
                r"encoder\.layer\.0\.attention\.output\.dense: bottleneck adapter.*cannot be merged.*--format surgeon"),
    "gpt2": ("gpt2", [_sliding({"role": "attn"}, window=4)], r"GPT2LMHeadModel \(gpt2\) has no transformers architecture"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_name_modules_reason_and_way_out(tmp_path, case):
    family, rules, match = REFUSED[case]
    base = save_base(family, str(tmp_path / "base"))
    diff = make_diff(base, str(tmp_path / "diff"), {"surgeon": 1, "rules": rules})
    out = str(tmp_path / "out")
    with pytest.raises(SurgeonError, match=match) as error:
        export_merged(diff, out, progress=False)
    assert all("--format surgeon" in line for line in str(error.value).splitlines())
    assert not os.path.exists(out) and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    result = CliRunner().invoke(export_cmd, [diff, "-o", out, "--no-progress"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert all(line.startswith("surgeon: error: ") for line in result.output.strip().splitlines())
