"""Minimal diffs: exactly the trainable set, bit-exact round trip, strict and fingerprinted."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import first_output, output_of, tiny_inputs
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import surgeon
from surgeon.errors import CheckpointError, SurgeonError

RECIPE = {"surgeon": 1, "rules": [
    {"do": "bitfit", "select": {"role": "model"}},
    {"do": "unfreeze", "select": {"role": "layer", "layers": "-1:"}},
]}  # fmt: skip


def patched(model_dir, recipe=RECIPE, seed=7):
    model, _ = surgeon.load_model(model_dir)
    surgeon.patch(model, recipe)
    torch.manual_seed(seed)
    with torch.no_grad():  # stand-in for training: change every trainable tensor
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.mark.parametrize("family", ["bert", "gpt2", "bart", "vit", "qwen2"])
def test_roundtrip_bit_exact_and_diff_holds_exactly_trainable(family, tiny_model_dir, tmp_path):
    base = tiny_model_dir(family)
    model = patched(base)
    out = tmp_path / "diff"
    manifest = surgeon.save_diff(model, str(out))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    stored = load_file(out / "diff.safetensors")
    assert set(stored) == trainable == set(manifest["tensors"])
    for name, param in model.named_parameters():
        if name in stored:
            assert torch.equal(stored[name], param.detach())
    loaded = surgeon.load(base, str(out))
    inputs = tiny_inputs(family)
    with torch.no_grad():
        assert torch.equal(first_output(loaded(**inputs)), first_output(model(**inputs)))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable


def test_minilm_roundtrip(minilm_dir, tmp_path):
    model = patched(minilm_dir, "recipes/minilm-bitfit.yaml")
    surgeon.save_diff(model, str(tmp_path / "d"), base_dir=minilm_dir)
    loaded = surgeon.load(minilm_dir, str(tmp_path / "d"))
    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    text = (tmp_path / "d" / "recipe.yaml").read_text()
    assert text == open("recipes/minilm-bitfit.yaml").read()  # the recipe is kept verbatim


def test_fingerprint_rejects_another_base(tiny_model_dir, tmp_path):
    base = tiny_model_dir("bert", seed=0)
    surgeon.save_diff(patched(base), str(tmp_path / "d"))
    # same architecture, different weights: the content of the base's tensors differs
    other = tmp_path / "other"
    import conftest

    conftest.tiny_model("bert", seed=1).save_pretrained(other)
    with pytest.raises(CheckpointError, match=r"made on another base: the content of tensor \S+ in .*other/model.safetensors \(and \d+ more\) differs"):
        surgeon.load(str(other), str(tmp_path / "d"))
    # different shapes: named tensor and both shapes
    wide = tmp_path / "wide"
    import transformers

    transformers.BertModel(transformers.BertConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                                   intermediate_size=48, vocab_size=96,
                                                   max_position_embeddings=64)).save_pretrained(wide)  # fmt: skip
    with pytest.raises(CheckpointError, match=r"tensor embeddings\.LayerNorm\.bias is F32\[48\] in .*expected F32\[32\]"):
        surgeon.load(str(wide), str(tmp_path / "d"))


def _rewrite_diff(path, mutate):
    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda t: t.pop("pooler.dense.bias"), "missing tensor pooler.dense.bias"),
        (lambda t: t.__setitem__("embeddings.word_embeddings.weight", torch.zeros(96, 32)),
         "unexpected tensor embeddings.word_embeddings.weight"),
        (lambda t: t.__setitem__("pooler.dense.bias", torch.zeros(5)), r"tensor pooler.dense.bias has shape \(5,\)"),
    ],
)  # fmt: skip
def test_strict_loading(mutate, message, tiny_model_dir, tmp_path):
    base = tiny_model_dir("bert")
    surgeon.save_diff(patched(base), str(tmp_path / "d"))
    _rewrite_diff(str(tmp_path / "d" / "diff.safetensors"), mutate)
    with pytest.raises(CheckpointError, match=message):
        surgeon.load(base, str(tmp_path / "d"))


def test_output_inside_model_dir_refused_and_nothing_written(tiny_model_dir):
    base = tiny_model_dir("bert")
    model = patched(base)
    before = sorted(os.listdir(base))
    for out in (base, os.path.join(base, "sub")):
        with pytest.raises(SurgeonError, match="inside the input"):
            surgeon.save_diff(model, out)
    assert sorted(os.listdir(base)) == before


def test_existing_output_needs_overwrite(tiny_model_dir, tmp_path):
    base = tiny_model_dir("bert")
    model = patched(base)
    out = tmp_path / "d"
    surgeon.save_diff(model, str(out))
    with pytest.raises(SurgeonError, match="already exists"):
        surgeon.save_diff(model, str(out))
    surgeon.save_diff(model, str(out), overwrite=True)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp dirs left


def test_unpatched_model_has_no_diff(tiny_model_dir, tmp_path):
    model, _ = surgeon.load_model(tiny_model_dir("bert"))
    with pytest.raises(SurgeonError, match="not been patched"):
        surgeon.save_diff(model, str(tmp_path / "d"))


def test_sharded_base(tiny_model_dir, tmp_path):
    base = tiny_model_dir("llama", max_shard_size="20KB")
    assert os.path.exists(os.path.join(base, "model.safetensors.index.json"))
    info = surgeon.checkpoint.inspect_checkpoint(base)
    assert info.sharded and len(info.files) > 2
    recipe = {"surgeon": 1, "rules": [{"do": "unfreeze", "select": {"role": "norm"}}]}
    model = patched(base, recipe)
    surgeon.save_diff(model, str(tmp_path / "d"))
    loaded = surgeon.load(base, str(tmp_path / "d"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_corrupt_and_truncated_safetensors(tiny_model_dir):
    base = tiny_model_dir("bert")
    weights = os.path.join(base, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors"):
        surgeon.load_model(base)
    open(weights, "wb").write(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors"):
        surgeon.load_model(base)


def test_stale_index_entry(tiny_model_dir):
    base = tiny_model_dir("llama", max_shard_size="20KB")
    index_path = os.path.join(base, "model.safetensors.index.json")
    index = json.load(open(index_path))
    name = next(iter(index["weight_map"]))
    index["weight_map"]["model.ghost.weight"] = index["weight_map"][name]
    json.dump(index, open(index_path, "w"))
    with pytest.raises(CheckpointError, match="model.ghost.weight is listed in .* but not stored there"):
        surgeon.load_model(base)


def test_missing_tensor_is_an_error(tiny_model_dir):
    base = tiny_model_dir("bert")
    path = os.path.join(base, "model.safetensors")
    tensors = load_file(path)
    tensors.pop("pooler.dense.weight")
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor pooler.dense.weight"):
        surgeon.load_model(base)


def test_pickle_weights_refused_unless_allowed(tiny_model_dir, tmp_path):
    import conftest

    base = tmp_path / "pickled"  # an old-style checkpoint: config.json + pytorch_model.bin
    base.mkdir()
    model = conftest.tiny_model("bert")
    model.config.save_pretrained(base)
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle .bin"):
        surgeon.load_model(str(base))
    model, info = surgeon.load_model(str(base), allow_pickle=True)
    assert info.format == "pickle"
    reference = conftest.tiny_model("bert")
    for (n, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), n


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        surgeon.load_model(str(tmp_path))
    with pytest.raises(CheckpointError, match="not found"):
        surgeon.load_model(str(tmp_path / "absent"))


def test_manifest_contents(tiny_model_dir, tmp_path):
    base = tiny_model_dir("bert")
    manifest = surgeon.save_diff(patched(base), str(tmp_path / "d"))
    assert manifest["base"]["path"] == os.path.abspath(base)
    assert manifest["surgeon_version"] == surgeon.__version__
    assert manifest["base"]["tensors"]["pooler.dense.bias"] == "F32[32]"
    assert set(manifest["base"]["tensor_sha256"]) == set(manifest["base"]["tensors"])
    assert manifest["format_version"] == 2 and "replaced_sha256" not in manifest["base"]
    assert all(len(record["sha256"]) == 64 for record in manifest["tensors"].values())
    assert manifest["tensors"]["pooler.dense.bias"]["by"] == "rule 1 (bitfit)"
    with safe_open(str(tmp_path / "d" / "diff.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "surgeon-diff"}


def test_a_diff_loads_with_the_parameters_it_was_saved_with(tiny_model_dir, tmp_path):
    # a surgeon with other defaults must rebuild the function the tensors were trained in: the
    # manifest records every rule's parameters with the defaults filled in, and load uses them
    base = tiny_model_dir("bert")
    inputs = tiny_inputs("bert")
    recipe = {"surgeon": 1, "rules": [{"do": "latent", "select": {"role": "attn"}, "with": {"m": 4}}]}
    model = patched(base, recipe).eval()
    default = model.encoder.layer[0].attention.self.surgeon_attention.summary_keys
    other = {"latent": "attended", "attended": "latent"}[default]
    manifest = surgeon.save_diff(model, str(tmp_path / "d"))
    assert manifest["rules"][0] == {"do": "latent", "with": {"m": 4, "init": "random", "seed": 0,
                                                             "summary_keys": default, "local_window": 0,
                                                             "kernel": "auto"}}  # fmt: skip
    assert torch.equal(output_of(surgeon.load(base, str(tmp_path / "d")), inputs), output_of(model, inputs))
    # as if saved by a surgeon whose default was the other one (the recipe omits the field)
    path = tmp_path / "d" / "manifest.json"
    manifest["rules"][0]["with"]["summary_keys"] = other
    path.write_text(json.dumps(manifest))
    loaded = surgeon.load(base, str(tmp_path / "d"))
    assert loaded.encoder.layer[0].attention.self.surgeon_attention.summary_keys == other
    explicit = {"surgeon": 1, "rules": [{"do": "latent", "select": {"role": "attn"},
                                         "with": {"m": 4, "summary_keys": other}}]}  # fmt: skip
    reference, _ = surgeon.load_model(base)
    surgeon.patch(reference, explicit)
    reference.load_state_dict(model.state_dict())  # the saved tensors, in the other function
    assert torch.equal(output_of(loaded, inputs), output_of(reference.eval(), inputs))
    assert not torch.allclose(output_of(loaded, inputs), output_of(model, inputs))
    # a recorded value this surgeon does not accept: one line naming the rule and the field
    manifest["rules"][0]["with"]["summary_keys"] = "values"
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"rule 1 \(do: latent\) was saved by surgeon .* with summary_keys = 'values'"):
        surgeon.load(base, str(tmp_path / "d"))
    manifest["rules"][0]["with"]["summary_keys"] = other
    manifest["rules"][0]["do"] = "linformer"
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"rule 1 is 'latent' in the recipe but 'linformer' in the manifest"):
        surgeon.load(base, str(tmp_path / "d"))
    del manifest["rules"]  # diffs saved before the record existed: the recipe as it reads now
    path.write_text(json.dumps(manifest))
    assert torch.equal(output_of(surgeon.load(base, str(tmp_path / "d")), inputs), output_of(model, inputs))
