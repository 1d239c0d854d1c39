"""A shard index may only name files inside its own checkpoint directory.

transformers joins each `weight_map` entry to the directory as it stands, so an absolute path or
`../x` reads outside it — and `surgeon export` once wrote `os.path.join(tmp, entry)`, which for an
absolute entry is the base shard itself (truncated to a header). Every entry is resolved inside
the directory or refused, naming the index file, the tensor and the entry; nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import surgeon
from surgeon.checkpoint import INDEX, inspect_checkpoint
from surgeon.errors import CheckpointError
from surgeon.export import export_merged

LORA_Q = {"surgeon": 1, "rules": [{"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 2}}]}


def _digests(directory: str) -> dict[str, str]:
    """sha256 of every file under `directory` (links followed: what a reader would get)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, directory)] = hashlib.sha256(handle.read()).hexdigest()
    return out


@pytest.fixture
def sharded(tmp_path):
    """(base dir, diff dir): a tiny Llama in 20 KB shards and a LoRA diff of it."""
    base = str(tmp_path / "base")
    tiny_model("llama").save_pretrained(base, max_shard_size="20KB")
    model, _ = surgeon.load_model(base)
    surgeon.patch(model, LORA_Q)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)  # a non-zero delta, so the merged weights differ from the base
    diff = str(tmp_path / "diff")
    surgeon.save_diff(model, diff, base_dir=base)
    return base, diff


def _read_json(path: str):
    with open(path) as handle:
        return json.load(handle)


def _write_json(path: str, data) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle)


def _read_index(base: str) -> dict:
    return _read_json(os.path.join(base, INDEX))


def _write_index(base: str, index) -> None:
    _write_json(os.path.join(base, INDEX), index)


def _edit_index(base: str, edit) -> str:
    """Rewrite the weight_map entry of the first shard with `edit(entry)`; return that shard."""
    index = _read_index(base)
    first = min(index["weight_map"].values())
    index["weight_map"] = {k: (edit(v) if v == first else v) for k, v in index["weight_map"].items()}
    _write_index(base, index)
    return first


def test_absolute_entry_into_the_directory_is_read_there_and_never_written(sharded, tmp_path):
    """The entry that once made export truncate the base shard: the base's own absolute path."""
    base, diff = sharded
    plain = str(tmp_path / "plain")
    export_merged(diff, plain, progress=False)
    first = _edit_index(base, lambda entry: os.path.join(base, entry))
    before = _digests(base)
    out = str(tmp_path / "out")
    export_merged(diff, out, progress=False)
    assert _digests(base) == before  # the base shard is intact
    assert first in _read_index(out)["weight_map"].values()  # written back as a relative name
    assert _digests(out) == _digests(plain)


@pytest.mark.parametrize(
    "kind", ["absolute elsewhere", "parent", "parent via subdir", "linked folder out"]
)
def test_entry_leaving_the_directory_is_refused(sharded, tmp_path, kind):
    base, diff = sharded
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    index = _read_index(base)
    first = min(index["weight_map"].values())
    shutil.copy(os.path.join(base, first), elsewhere / first)  # a real shard outside: reads would succeed
    if kind == "linked folder out":
        os.symlink(str(elsewhere), os.path.join(base, "shards"))
    entry = {
        "absolute elsewhere": str(elsewhere / first),
        "parent": f"../elsewhere/{first}",
        "parent via subdir": f"sub/../../elsewhere/{first}",
        "linked folder out": f"shards/{first}",
    }[kind]
    _edit_index(base, lambda _: entry)
    tensor = next(k for k, v in index["weight_map"].items() if v == first)
    with pytest.raises(CheckpointError) as caught:
        inspect_checkpoint(base)
    message = str(caught.value)
    assert INDEX in message and repr(entry) in message and "inside" in message and len(message.splitlines()) == 1
    assert f"tensor {tensor}:" in message
    before, outside = _digests(base), _digests(str(elsewhere))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="inside"):
        export_merged(diff, str(out), progress=False)
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert _digests(base) == before and _digests(str(elsewhere)) == outside


def test_refusal_names_the_tensor(sharded):
    base, _ = sharded
    index = _read_index(base)
    name = min(index["weight_map"])
    index["weight_map"][name] = "/etc/passwd"
    _write_index(base, index)
    with pytest.raises(CheckpointError, match=rf"tensor {name}: shard '/etc/passwd' is not a file inside"):
        inspect_checkpoint(base)


def test_linked_shard_files_are_read_through_like_the_hf_cache(sharded, tmp_path):
    """The Hugging Face cache keeps every snapshot file as a link into blobs/: the *file* may be a
    link out of the directory (only folders leading out are refused)."""
    base, diff = sharded
    plain = str(tmp_path / "plain")
    export_merged(diff, plain, progress=False)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for name in os.listdir(base):
        if name.endswith(".safetensors"):
            shutil.move(os.path.join(base, name), blobs / name)
            os.symlink(str(blobs / name), os.path.join(base, name))
    before = _digests(str(blobs))
    out = str(tmp_path / "out")
    export_merged(diff, out, progress=False)
    assert _digests(str(blobs)) == before
    assert not any(os.path.islink(os.path.join(out, n)) for n in os.listdir(out))
    assert _digests(out) == _digests(plain)


def test_shards_in_a_subfolder_are_exported_into_the_same_subfolder(sharded, tmp_path):
    base, diff = sharded
    model_before, _ = surgeon.load_model(base)
    os.mkdir(os.path.join(base, "shards"))
    index = _read_index(base)
    for file in set(index["weight_map"].values()):
        shutil.move(os.path.join(base, file), os.path.join(base, "shards", file))
    index["weight_map"] = {k: f"shards/{v}" for k, v in index["weight_map"].items()}
    _write_index(base, index)
    out = str(tmp_path / "out")
    export_merged(diff, out, progress=False)
    assert sorted(os.listdir(os.path.join(out, "shards"))) == sorted({os.path.basename(f) for f in index["weight_map"].values()})
    merged, _ = surgeon.load_model(out)
    patched = surgeon.load(base, diff)
    inputs = tiny_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, patched(**inputs).logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(merged(**inputs).logits, model_before(**inputs).logits)


@pytest.mark.parametrize(
    "index, fragment",
    [
        ([1, 2], "not an object"),
        ({"metadata": {}}, "weight_map must be an object of tensor name -> shard file (missing)"),
        ({"weight_map": ["model-00001-of-00007.safetensors"]}, "weight_map must be an object of tensor name -> shard file (a JSON list)"),
        ({"weight_map": {"lm_head.weight": 3}}, "the shard must be a file name, not 3"),
        ({"weight_map": {"lm_head.weight": None}}, "not None"),
        ({"weight_map": {"lm_head.weight": ""}}, "shard '' is not a file inside"),
        ({"weight_map": {"lm_head.weight": "."}}, "shard '.' is not a file inside"),
        ({"weight_map": {"lm_head.weight": "a\0b"}}, "is not a file inside"),
        ({"metadata": [], "weight_map": {}}, "metadata must be an object"),
    ],
)
def test_index_json_types_are_checked(sharded, index, fragment):
    base, _ = sharded
    _write_index(base, index)
    with pytest.raises(CheckpointError) as caught:
        inspect_checkpoint(base)
    assert fragment in str(caught.value) and INDEX in str(caught.value)


def test_manifest_recipe_entries_stay_in_the_diff_dir(sharded, tmp_path):
    """A diff's manifest names its recipe files; one outside the diff dir is refused, not read."""
    base, diff = sharded
    manifest_path = os.path.join(diff, "manifest.json")
    manifest = _read_json(manifest_path)
    outside = tmp_path / "other.yaml"
    shutil.copy(os.path.join(diff, "recipe.yaml"), outside)
    for entry in (str(outside), "../other.yaml", 7):
        manifest["recipes"] = [entry]
        _write_json(manifest_path, manifest)
        with pytest.raises(CheckpointError, match="recipes: .* is not a file name in"):
            surgeon.load(base, diff)
