"""`surgeon generate` on a tiny Llama with a byte-level tokenizer: the command prints exactly what
transformers' `generate` produces for the checkpoint or for the diff loaded on its base."""

from __future__ import annotations

import pytest
import torch
import transformers
from click.testing import CliRunner

import surgeon
from surgeon.cli import cli
from surgeon.generation import generate_text, load_generator
from test_train import make_base, one_thread  # noqa: F401  (one_thread: autouse fixture)

PROMPT = "Return the number"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def reference(model_dir: str, model, prompt: str, n: int) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=tok.eos_token_id)  # fmt: skip
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture
def llama_dir(tmp_path):
    return make_base(tmp_path / "llama", "llama")


def test_generate_on_a_model_prints_what_generate_gives(llama_dir):
    result = invoke("generate", llama_dir, "--prompt", PROMPT, "--greedy", "-n", 12)
    assert result.exit_code == 0, result.output
    model, _ = surgeon.load_model(llama_dir)
    expected = reference(llama_dir, model, PROMPT, 12)
    assert expected  # a random model still emits 12 byte tokens
    assert result.stdout.rstrip("\n") == expected


def test_generate_on_a_diff_uses_the_patched_model(llama_dir, tmp_path):
    model, _ = surgeon.load_model(llama_dir)
    recipe = {"surgeon": 1, "rules": [{"do": "lora", "select": {"role": ["attn.q", "attn.v", "mlp.down"]},
                                       "with": {"r": 4, "init": "random"}}]}  # fmt: skip
    surgeon.patch(model, recipe)
    diff = tmp_path / "diff"
    surgeon.save_diff(model, str(diff), base_dir=llama_dir)
    result = invoke("generate", diff, "--prompt", PROMPT, "--greedy", "-n", 12)
    assert result.exit_code == 0, result.output
    patched = reference(llama_dir, surgeon.load(llama_dir, str(diff)), PROMPT, 12)
    plain = reference(llama_dir, surgeon.load_model(llama_dir)[0], PROMPT, 12)
    assert result.stdout.rstrip("\n") == patched
    assert patched != plain  # the random LoRA changed the model, so the diff really was applied


def test_sampling_is_seeded(llama_dir):
    generator = load_generator(llama_dir)
    first = generate_text(generator, PROMPT, max_new_tokens=16, seed=3, temperature=1.5)
    again = generate_text(generator, PROMPT, max_new_tokens=16, seed=3, temperature=1.5)
    others = {generate_text(generator, PROMPT, max_new_tokens=16, seed=s, temperature=1.5)
              for s in range(4, 8)}  # fmt: skip
    assert first == again
    assert others - {first}  # other seeds draw other text


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", PROMPT, "-n", 60], "exceeds the model's 64 positions"),
    (["--prompt", PROMPT, "--chat"], "no chat template"),
    (["--prompt", PROMPT, "--base", "."], "--base applies to diffs only"),
])  # fmt: skip
def test_bad_input_is_one_line(llama_dir, args, message):
    result = invoke("generate", llama_dir, *args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()  # stdout and stderr: no weights were loaded, no bar
    assert len(lines) == 1 and lines[0].startswith("surgeon: error: ") and message in lines[0], lines


def test_a_model_without_lm_head_is_refused(tmp_path):
    bert = make_base(tmp_path / "bert", "bert-headless")
    result = invoke("generate", bert, "--prompt", "abc")
    assert result.exit_code == 2
    assert "BertModel has no language-modelling head" in result.output
    assert "Traceback" not in result.output


def test_generate_on_a_sliding_window_diff_uses_a_window_sized_cache(llama_dir, tmp_path):
    model, _ = surgeon.load_model(llama_dir)
    surgeon.patch(model, {"surgeon": 1, "rules": [{"do": "sliding_window", "select": {"role": "attn"},
                                                   "with": {"window": 4}}]})  # fmt: skip
    diff = tmp_path / "diff"
    surgeon.save_diff(model, str(diff), base_dir=llama_dir)
    result = invoke("generate", diff, "--prompt", PROMPT, "--greedy", "-n", 20)
    assert result.exit_code == 0, result.output
    generator = load_generator(str(diff))
    tok = generator.tokenizer
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    options = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 20, "do_sample": False,
               "pad_token_id": tok.eos_token_id, "return_dict_in_generate": True}
    with torch.no_grad():
        windowed = generator.model.generate(input_ids=ids, **options)
        full = generator.model.generate(input_ids=ids, cache=transformers.DynamicCache(), **options)
    assert [layer.keys.shape[2] for layer in windowed.cache.layers] == [3] * len(windowed.cache.layers)
    assert torch.equal(windowed.sequences, full.sequences)
    assert result.stdout.rstrip("\n") == tok.decode(full.sequences[0, ids.shape[1]:], skip_special_tokens=True)
