"""`surgeon import-gguf` on a tiny Llama written to GGUF here (float32 tensors), so the conversion,
the cache, its key and its lock are tested in seconds without the 94 MB SmolLM2 file."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch
import transformers
from click.testing import CliRunner
from test_train import make_base, one_thread  # noqa: F401  (one_thread: autouse fixture)

from surgeon import gguf_convert
from surgeon.cli import cli
from surgeon.errors import SurgeonError

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
TEXT = "Return the number of items in a container."


def _to_gguf_layout(weight, heads: int):
    """llama.cpp stores q and k with each head's two rotary halves interleaved; transformers'
    GGUF reader undoes exactly this when loading."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, tokenizer, path: str) -> str:
    c = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    vocab = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([1] * len(vocab))
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_token_merges([])
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        writer.add_tensor(blk + "attn_norm.weight", state[hf + "input_layernorm.weight"])
        writer.add_tensor(blk + "attn_q.weight", _to_gguf_layout(state[hf + "self_attn.q_proj.weight"],
                                                                  c.num_attention_heads))  # fmt: skip
        writer.add_tensor(blk + "attn_k.weight", _to_gguf_layout(state[hf + "self_attn.k_proj.weight"],
                                                                  c.num_key_value_heads))  # fmt: skip
        for ours, theirs in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"),
                             ("ffn_norm", "post_attention_layernorm"), ("ffn_gate", "mlp.gate_proj"),
                             ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):  # fmt: skip
            writer.add_tensor(f"{blk}{ours}.weight", state[f"{hf}{theirs}.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """(original model, its tokenizer, the GGUF file); the cache is a fresh tmp dir."""
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    base = make_base(tmp_path / "llama", "llama")
    model = transformers.LlamaForCausalLM.from_pretrained(base).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    os.makedirs(tmp_path / "files")
    return model, tokenizer, write_gguf(model, tokenizer, str(tmp_path / "files" / "tiny.gguf"))


def test_conversion_gives_the_same_model_and_tokenizer(tiny, tmp_path):
    model, tokenizer, path = tiny
    out = gguf_convert.convert(path, str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(out)) == [
        ".surgeon-output.json", "config.json", "generation_config.json", "model.safetensors", "surgeon-gguf.json", "tokenizer.json",
        "tokenizer_config.json",
    ]  # fmt: skip
    converted = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert type(converted) is transformers.LlamaForCausalLM and converted.dtype == torch.float32
    assert getattr(converted, "hf_quantizer", None) is None and "quantization_config" not in converted.config
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    assert again(TEXT)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, model(ids).logits)  # float32 in, float32 out: exact


def test_the_cache_converts_once_per_file_version(tiny, tmp_path, monkeypatch):
    _, _, path = tiny
    first = gguf_convert.converted(path, progress=False)
    assert first.startswith(str(tmp_path / "cache" / "gguf" / "tiny-"))  # $SURGEON_CACHE
    monkeypatch.setattr(gguf_convert, "convert", lambda *a, **k: pytest.fail("converted again"))
    assert gguf_convert.converted(path, progress=False) == first
    monkeypatch.undo()
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed: a new key
    second = gguf_convert.converted(path, progress=False)
    assert second != first and gguf_convert.is_converted(second) and gguf_convert.is_converted(first)


def test_two_callers_at_once_convert_once(tiny, monkeypatch):
    _, _, path = tiny
    calls, real = [], gguf_convert.convert
    started = threading.Event()

    def counted(*args, **kwargs):
        calls.append(args)
        started.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_convert, "convert", counted)
    results = []
    first = threading.Thread(target=lambda: results.append(gguf_convert.converted(path, progress=False)))
    first.start()
    assert started.wait(60)  # the first caller holds the lock and is converting
    results.append(gguf_convert.converted(path, progress=False))  # waits on the lock, then reuses
    first.join()
    assert len(calls) == 1 and len(set(results)) == 1 and gguf_convert.is_converted(results[0])


def test_import_gguf_command(tiny, tmp_path):
    _, _, path = tiny
    runner = CliRunner()
    result = runner.invoke(cli, ["import-gguf", path])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == gguf_convert.cached_dir(path)
    out = tmp_path / "out"
    assert runner.invoke(cli, ["import-gguf", path, "-o", str(out)]).exit_code == 0
    again = runner.invoke(cli, ["import-gguf", path, "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    assert runner.invoke(cli, ["import-gguf", path, "-o", str(out), "--force"]).exit_code == 0  # surgeon's own
    holds = runner.invoke(cli, ["import-gguf", path, "-o", os.path.dirname(path), "--force"])
    assert holds.exit_code == 2 and "contains the input" in holds.output and os.path.isfile(path)


@pytest.mark.parametrize("content, message", [
    (b"not a gguf at all", "not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00", "transformers cannot read this GGUF file"),  # the magic, then nothing
])  # fmt: skip
def test_bad_files_are_one_line_errors_and_leave_nothing(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    result = CliRunner().invoke(cli, ["import-gguf", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("surgeon: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]  # no OUT, no temp dir beside it


def test_missing_file_and_missing_gguf_package(tmp_path, monkeypatch):
    with pytest.raises(SurgeonError, match="GGUF file not found"):
        gguf_convert.convert(str(tmp_path / "nope.gguf"), str(tmp_path / "out"))
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(SurgeonError, match="pip install gguf"):
        gguf_convert.convert(str(path), str(tmp_path / "out"))
