"""PEFT interoperability: surgeon LoRA diff -> PEFT adapter -> surgeon, same outputs both ways."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from conftest import first_output, tiny_inputs, tiny_model
from safetensors.torch import load_file

import surgeon
from surgeon.cli_export import export_cmd, import_peft_cmd
from surgeon.errors import SurgeonError
from surgeon.fs_marker import MARKER
from surgeon.peft_io import export_peft, import_peft

peft = pytest.importorskip("peft")

TOL = 1e-5
# surgeon recipes that PEFT can express: whole modules, ranks/alphas/rsLoRA varying per rule
RECIPES = {
    "bert": [
        {"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 4, "alpha": 8}},
        {"do": "lora", "select": {"role": "mlp.down"}, "with": {"r": 2, "alpha": 3, "rslora": True}},
    ],
    "gpt2": [  # Conv1D (fan_in_fan_out) incl. the fused c_attn as a whole, and the tied wte
        {"do": "lora", "select": {"role": ["attn.qkv", "mlp.up"]}, "with": {"r": 4}},
        {"do": "lora", "select": {"path": "transformer.wte"}, "with": {"r": 2, "alpha": 4}},
    ],
    "llama": [
        {"do": "lora", "select": {"role": ["attn.q", "attn.k", "attn.v", "attn.o"]}, "with": {"r": 4, "alpha": 16}},
        {"do": "lora", "select": {"role": ["mlp.gate", "mlp.up", "mlp.down"]}, "with": {"r": 8, "alpha": 8, "rslora": True}},
        {"do": "lora", "select": {"path": "model.embed_tokens"}, "with": {"r": 2}},
    ],
    "minilm": [{"do": "lora", "select": {"role": ["attn.q", "attn.k", "attn.v", "attn.o"]}, "with": {"r": 8, "alpha": 16}}],
}  # fmt: skip
# PEFT configs made by PEFT itself (init_lora_weights=False: B is random, so the adapter matters)
PEFT_CONFIGS = {
    "bert": dict(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"]),
    "gpt2": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True),
    "llama": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                  rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}),
    "minilm": dict(r=8, lora_alpha=16, target_modules=["query", "key", "value", "output.dense"]),
}  # fmt: skip


def _base(family: str, tmp_path, minilm_dir) -> str:
    if family == "minilm":
        return minilm_dir
    directory = str(tmp_path / f"{family}-base")
    tiny_model(family).save_pretrained(directory)
    return directory


def _inputs(family: str) -> dict:
    return tiny_inputs("bert" if family == "minilm" else family, seq=12)


def _output(model, family) -> torch.Tensor:
    with torch.no_grad():
        return first_output(model.eval()(**_inputs(family)))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item())


def make_diff(base_dir: str, out_dir: str, rules: list, seed: int = 5) -> str:
    model, _ = surgeon.load_model(base_dir)
    surgeon.patch(model, {"surgeon": 1, "rules": rules})
    torch.manual_seed(seed)
    with torch.no_grad():  # stand-in for training; B starts at zero
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    surgeon.save_diff(model, out_dir, base_dir=base_dir)
    return out_dir


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "minilm"])
def test_surgeon_to_peft_same_outputs(family, tmp_path, minilm_dir):
    base = _base(family, tmp_path, minilm_dir)
    diff = make_diff(base, str(tmp_path / "diff"), RECIPES[family])
    out = str(tmp_path / "peft")
    config = export_peft(diff, out)
    # the marker lets a later --force replace this directory (and nothing else)
    assert sorted(os.listdir(out)) == [MARKER, "adapter_config.json", "adapter_model.safetensors"]
    assert config["fan_in_fan_out"] == (family == "gpt2")
    keys = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and "surgeon" not in k for k in keys)
    want = _output(surgeon.load(base, diff), family)
    model, _ = surgeon.load_model(base)
    before = _output(model, family)
    got = _output(peft.PeftModel.from_pretrained(model, out), family)
    assert _close(got, want)
    assert not _close(before, want)  # the adapter changes the outputs


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "minilm"])
def test_peft_to_surgeon_same_outputs(family, tmp_path, minilm_dir):
    base = _base(family, tmp_path, minilm_dir)
    model, _ = surgeon.load_model(base)
    torch.manual_seed(11)
    config = peft.LoraConfig(init_lora_weights=False, **PEFT_CONFIGS[family])
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():  # PEFT's random init of embedding LoRA leaves A at zero: move it
        for name, param in peft_model.named_parameters():
            if "lora_embedding_A" in name:
                param.normal_()
    peft_dir = str(tmp_path / "peft")
    peft_model.save_pretrained(peft_dir)
    want = _output(peft_model, family)

    diff = str(tmp_path / "diff")
    manifest = import_peft(peft_dir, diff, base)
    assert manifest["format"] == "surgeon-diff"
    got = _output(surgeon.load(base, diff), family)
    assert _close(got, want)
    fresh, _ = surgeon.load_model(base)
    assert not _close(_output(fresh, family), want)

    # and back: the same tensors PEFT wrote, the same outputs in PEFT
    again = str(tmp_path / "peft-again")
    export_peft(diff, again)
    original = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    original = {k: v for k, v in original.items() if ".lora_" in k}  # not PEFT's copy of the embedding
    exported = load_file(os.path.join(again, "adapter_model.safetensors"))
    assert set(original) == set(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
    model, _ = surgeon.load_model(base)
    assert _close(_output(peft.PeftModel.from_pretrained(model, again), family), want)


def test_import_uses_base_from_adapter_config_and_cli(tmp_path):
    base = _base("bert", tmp_path, None)
    diff = make_diff(base, str(tmp_path / "diff"), RECIPES["bert"])
    runner = CliRunner()
    result = runner.invoke(export_cmd, [diff, "-o", str(tmp_path / "peft"), "--format", "peft"])
    assert result.exit_code == 0, result.output
    assert json.load(open(tmp_path / "peft" / "adapter_config.json"))["base_model_name_or_path"] == base
    result = runner.invoke(import_peft_cmd, [str(tmp_path / "peft"), "-o", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    assert _close(_output(surgeon.load(base, str(tmp_path / "back")), "bert"), _output(surgeon.load(base, diff), "bert"))


# ---- bad input: a clear error naming the problem, nothing written ----------------------------
@pytest.mark.parametrize(
    "rules, match",
    [
        ([{"do": "bitfit", "select": {"role": "model"}}], r"rule 1 \(bitfit\).*only LoRA maps to PEFT"),
        ([{"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 2}},
          {"do": "unfreeze", "select": {"role": "layer", "layers": "-1:"}}], r"unfreeze.*only LoRA"),
        ([{"do": "adapter", "select": {"role": "layer"}, "with": {"size": 4}}], r"adapter.*only LoRA"),
    ],
)  # fmt: skip
def test_export_refuses_what_peft_cannot_hold(rules, match, tmp_path):
    base = _base("bert", tmp_path, None)
    diff = make_diff(base, str(tmp_path / "diff"), rules)
    out = str(tmp_path / "peft")
    with pytest.raises(SurgeonError, match=match):
        export_peft(diff, out)
    assert not os.path.exists(out)


def test_export_refuses_lora_on_a_fused_slice(tmp_path):
    base = _base("gpt2", tmp_path, None)
    rules = [{"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 2}}]
    diff = make_diff(base, str(tmp_path / "diff"), rules)
    out = str(tmp_path / "peft")
    with pytest.raises(SurgeonError, match=r"q slice of the fused projection transformer\.h\.0\.attn\.c_attn"):
        export_peft(diff, out)
    assert not os.path.exists(out)


def test_export_needs_an_adapter_choice_when_several(tmp_path):
    base = _base("bert", tmp_path, None)
    rules = [
        {"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 2, "name": "task_a"}},
        {"do": "lora", "select": {"role": "attn.v"}, "with": {"r": 2, "name": "task_b"}},
    ]
    diff = make_diff(base, str(tmp_path / "diff"), rules)
    with pytest.raises(SurgeonError, match="task_a, task_b"):
        export_peft(diff, str(tmp_path / "peft"))
    config = export_peft(diff, str(tmp_path / "peft"), adapter="task_b")
    assert all(m.endswith("attention.self.value") for m in config["target_modules"])


@pytest.mark.parametrize(
    "change, match",
    [
        ({"use_dora": True}, "use_dora"),
        ({"bias": "all"}, "bias"),
        ({"modules_to_save": ["pooler"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "only LORA"),
    ],
)
def test_import_refuses_what_surgeon_lora_does_not_compute(change, match, tmp_path):
    base = _base("bert", tmp_path, None)
    model, _ = surgeon.load_model(base)
    peft_dir = str(tmp_path / "peft")
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["query"])).save_pretrained(peft_dir)
    path = os.path.join(peft_dir, "adapter_config.json")
    config = json.load(open(path))
    config.update(change)
    json.dump(config, open(path, "w"))
    out = str(tmp_path / "diff")
    with pytest.raises(SurgeonError, match=match):
        import_peft(peft_dir, out, base)
    assert not os.path.exists(out)


def test_import_refuses_unknown_module_and_missing_base(tmp_path):
    bert = _base("bert", tmp_path, None)
    llama = _base("llama", tmp_path, None)
    model, _ = surgeon.load_model(llama)
    peft_dir = str(tmp_path / "peft")
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(peft_dir)
    with pytest.raises(SurgeonError, match=r"module model\.layers\.0\.self_attn\.q_proj .* does not exist"):
        import_peft(peft_dir, str(tmp_path / "diff"), bert)
    path = os.path.join(peft_dir, "adapter_config.json")
    config = json.load(open(path))
    config["base_model_name_or_path"] = "meta-llama/not-a-local-dir"
    json.dump(config, open(path, "w"))
    result = CliRunner().invoke(import_peft_cmd, [peft_dir, "-o", str(tmp_path / "diff")])
    assert result.exit_code == 2 and "pass --base MODEL_DIR" in result.output
    assert not os.path.exists(tmp_path / "diff")


def test_import_checks_peft_copy_of_the_embedding(tmp_path):
    """PEFT saves the whole embedding beside embedding LoRA; an unchanged copy is accepted
    (see the llama round trip), a changed one (resized or trained vocabulary) is refused."""
    from safetensors.torch import save_file

    base = _base("llama", tmp_path, None)
    model, _ = surgeon.load_model(base)
    peft_dir = str(tmp_path / "peft")
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["embed_tokens"])).save_pretrained(peft_dir)
    path = os.path.join(peft_dir, "adapter_model.safetensors")
    tensors = load_file(path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key] + 1
    save_file(tensors, path)
    out = str(tmp_path / "diff")
    with pytest.raises(SurgeonError, match=r"own copy of model\.embed_tokens\.weight that differs"):
        import_peft(peft_dir, out, base)
    assert not os.path.exists(out)
