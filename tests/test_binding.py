"""A diff is bound to its exact base (every base tensor's sha256) and to its own bytes (a flipped
bit anywhere in diff.safetensors is refused); --trust-base is the one loud escape; the digests are
read from the files and cached by file stamp; diffs of format 1 still load, with a warning."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from conftest import output_of, tiny_inputs, tiny_model
from safetensors.torch import load_file, save_file
from click.testing import CliRunner
from test_cli import assert_one_line_error

import surgeon
from surgeon import base_digests
from surgeon.checkpoint import inspect_checkpoint
from surgeon.errors import CheckpointError

LORA = {"surgeon": 1, "rules": [{"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 2, "init": "random"}}]}
BITFIT = {"surgeon": 1, "rules": [{"do": "bitfit", "select": {"role": "model"}}]}


def run(*args):
    """The CLI in this process (a subprocess would spend seconds importing torch)."""
    from surgeon.cli import cli

    result = CliRunner().invoke(cli, list(args))
    result.returncode = result.exit_code
    return result


def make_diff(base: str, out: str, recipe=LORA) -> str:
    model, _ = surgeon.load_model(base)
    surgeon.patch(model, recipe)
    surgeon.save_diff(model, out, base_dir=base)
    return out


def rewrite_one_tensor(base: str, name: str) -> None:
    """Change one element of one base tensor, everything else (names, dtypes, shapes) unchanged."""
    path = os.path.join(base, "model.safetensors")
    tensors = load_file(path)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0
    save_file(tensors, path, metadata={"format": "pt"})


def no_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    assert not [w for w in caught if "surgeon" in str(w.filename)], [str(w.message) for w in caught]
    return result


def test_a_lora_diff_is_refused_on_another_checkpoint_of_the_same_architecture(tmp_path):
    # LoRA replaces no base tensor: only the whole-base digest tells the two checkpoints apart
    base, other = str(tmp_path / "base"), str(tmp_path / "other")
    tiny_model("bert", seed=0).save_pretrained(base)
    tiny_model("bert", seed=1).save_pretrained(other)
    diff = make_diff(base, str(tmp_path / "d"))
    manifest = json.load(open(os.path.join(diff, "manifest.json")))
    assert set(manifest["base"]["tensor_sha256"]) == set(inspect_checkpoint(base).tensors)
    with pytest.raises(CheckpointError, match=r"made on another base: the content of tensor \S+ in .*other"):
        surgeon.load(other, diff)
    assert_one_line_error(run("verify", diff, "--base", other), "made on another base", "--trust-base")
    inputs = tiny_inputs("bert")
    assert torch.equal(output_of(no_warnings(lambda: surgeon.load(base, diff)), inputs), output_of(surgeon.load(base, diff), inputs))


def test_the_one_changed_tensor_is_named(tiny_model_dir, tmp_path):
    base = tiny_model_dir("bert")
    diff = make_diff(base, str(tmp_path / "d"))
    rewrite_one_tensor(base, "encoder.layer.1.output.dense.weight")
    with pytest.raises(CheckpointError, match=r"content of tensor encoder\.layer\.1\.output\.dense\.weight in \S+ differs"):
        surgeon.load(base, diff)


def test_trust_base_loads_with_one_warning_naming_what_was_not_checked(tiny_model_dir, tmp_path):
    base = tiny_model_dir("bert")
    diff = make_diff(base, str(tmp_path / "d"))
    rewrite_one_tensor(base, "pooler.dense.weight")
    with pytest.warns(UserWarning) as caught:
        model = surgeon.load(base, diff, trust_base=True)
    messages = [str(w.message) for w in caught if "trust_base" in str(w.message)]
    assert len(messages) == 1 and "was not compared" in messages[0] and "names, dtypes and shapes" in messages[0]
    assert torch.equal(model.pooler.dense.weight, load_file(os.path.join(base, "model.safetensors"))["pooler.dense.weight"])
    result = run("verify", diff, "--trust-base")
    assert result.returncode == 0, result.stderr
    assert [l for l in result.stderr.splitlines() if l.startswith("surgeon: warning:")] == [
        f"surgeon: warning: {messages[0]}"
    ]
    assert "NOT checked (--trust-base)" in result.stdout
    # the listing is still checked: a base of another shape is refused even when trusted
    wide = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(wide)
    with pytest.raises(CheckpointError, match="made on another base"):
        surgeon.load(str(wide), diff, trust_base=True)


def test_the_binding_is_to_content_not_shard_layout(tmp_path):
    # the same tensors saved as one file and as shards: a diff made on one loads on the other
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    tiny_model("llama").save_pretrained(single)
    tiny_model("llama").save_pretrained(sharded, max_shard_size="20KB")
    assert inspect_checkpoint(sharded).sharded
    diff = make_diff(single, str(tmp_path / "d"))
    inputs = tiny_inputs("llama")
    assert torch.equal(output_of(no_warnings(lambda: surgeon.load(sharded, diff)), inputs),
                       output_of(surgeon.load(single, diff), inputs))  # fmt: skip


def flip_bit(path: str, position: int, bit: int = 0) -> None:
    data = bytearray(open(path, "rb").read())
    data[position] ^= 1 << bit
    open(path, "wb").write(bytes(data))


def test_a_flipped_bit_anywhere_in_the_diff_is_refused(tiny_model_dir, tmp_path):
    base = tiny_model_dir("bert")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT)
    path = os.path.join(diff, "diff.safetensors")
    pristine = open(path, "rb").read()
    header_end = 8 + int.from_bytes(pristine[:8], "little")
    metadata = pristine.index(b"surgeon-diff")  # a byte no shape or offset check reads
    data = [header_end, header_end + (len(pristine) - header_end) // 2, len(pristine) - 1]
    for position, bit in [(0, 0), (3, 1), (20, 2), (metadata + 3, 0), (header_end - 1, 0)] + [(p, 5) for p in data]:
        open(path, "wb").write(pristine)
        flip_bit(path, position, bit)
        with pytest.raises(CheckpointError) as refused:
            surgeon.load(base, diff)
        assert "diff.safetensors" in str(refused.value), (position, str(refused.value))
    open(path, "wb").write(pristine)
    flip_bit(path, data[1], 5)
    with pytest.raises(CheckpointError, match=r"tensor \S+ does not match its sha256 in the manifest"):
        surgeon.load(base, diff)
    open(path, "wb").write(pristine)
    flip_bit(path, metadata + 3)
    with pytest.raises(CheckpointError, match="its header does not match its sha256"):
        surgeon.load(base, diff)
    assert_one_line_error(run("verify", diff), "diff.safetensors: its header does not match")
    open(path, "wb").write(pristine)
    surgeon.load(base, diff)  # the restored file loads


def test_a_stored_dtype_other_than_the_manifests_is_refused(tiny_model_dir, tmp_path):
    base = tiny_model_dir("bert")
    diff = make_diff(base, str(tmp_path / "d"), BITFIT)
    path = os.path.join(diff, "diff.safetensors")
    tensors = load_file(path)
    tensors["pooler.dense.bias"] = tensors["pooler.dense.bias"].double()  # same values, same shape
    save_file(tensors, path, metadata={"format": "surgeon-diff"})
    with pytest.raises(CheckpointError, match=r"tensor pooler\.dense\.bias is stored as float64, the manifest records float32"):
        surgeon.load(base, diff)


def as_format_1(diff: str, model) -> None:
    """Rewrite a diff's manifest as surgeon wrote it before format 2: no content digests, only the
    sha256 of each replaced base tensor as the loaded model held it."""
    from surgeon.diff import _tensor_hash

    path = os.path.join(diff, "manifest.json")
    manifest = json.load(open(path))
    manifest["format_version"] = 1
    params = dict(model.named_parameters())
    manifest["base"].pop("tensor_sha256")
    manifest["base"]["replaced_sha256"] = {n: _tensor_hash(params[n]) for n in manifest["tensors"] if n in params}
    manifest.pop("diff_header_sha256")
    for record in manifest["tensors"].values():
        record.pop("sha256")
    json.dump(manifest, open(path, "w"))


def test_format_1_diffs_load_with_a_warning_and_still_check_what_they_recorded(tiny_model_dir, tmp_path):
    base = tiny_model_dir("bert")
    model, _ = surgeon.load_model(base)
    diff = make_diff(base, str(tmp_path / "d"), BITFIT)
    as_format_1(diff, model)
    with pytest.warns(UserWarning, match=r"recorded no digest of its base's content.*bind it fully"):
        surgeon.load(base, diff)
    result = run("verify", diff)
    assert result.returncode == 0 and "an older diff" in result.stdout, result.stderr
    assert len([l for l in result.stderr.splitlines() if l.startswith("surgeon: warning:")]) == 1
    rewrite_one_tensor(base, "pooler.dense.bias")  # a tensor it replaces: format 1 saw that too
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"content of pooler\.dense\.bias in \S+ differs"):
        surgeon.load(base, diff)


def test_a_pickle_base_is_bound_by_its_files(tmp_path):
    base = tmp_path / "pickled"
    base.mkdir()
    model = tiny_model("bert")
    model.config.save_pretrained(base)
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    diff = make_diff_pickle(str(base), str(tmp_path / "d"))
    manifest = json.load(open(os.path.join(diff, "manifest.json")))
    assert list(manifest["base"]["file_sha256"]) == ["pytorch_model.bin"]
    surgeon.load(str(base), diff, allow_pickle=True)
    torch.save(tiny_model("bert", seed=3).state_dict(), base / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="the content of weight file pytorch_model.bin differs"):
        surgeon.load(str(base), diff, allow_pickle=True)
    # a safetensors copy of the same weights has no comparable digests: refused, or trusted
    converted = tmp_path / "converted"
    tiny_model("bert").save_pretrained(converted)
    with pytest.raises(CheckpointError, match="made on a pickle checkpoint .* holds safetensors weights"):
        surgeon.load(str(converted), diff)


def make_diff_pickle(base: str, out: str) -> str:
    model, _ = surgeon.load_model(base, allow_pickle=True)
    surgeon.patch(model, BITFIT)
    surgeon.save_diff(model, out, base_dir=base)
    return out


@pytest.fixture
def hashed(monkeypatch):
    """Bytes read by base_digests' hashing, per call (the diff's own hashing is not counted)."""
    calls = []
    real = base_digests.digest_spans

    def counting(spans, **kwargs):
        calls.append(sum(s.end - s.begin for s in spans))
        return real(spans, **kwargs)

    monkeypatch.setattr(base_digests, "digest_spans", counting)
    return calls


def test_digests_are_cached_by_file_stamp(tiny_model_dir, tmp_path, hashed, monkeypatch):
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    base = tiny_model_dir("bert")
    weights = os.path.join(base, "model.safetensors")
    diff = make_diff(base, str(tmp_path / "d"))
    assert len(hashed) == 1 and hashed[0] > 0.9 * os.path.getsize(weights)  # hashed once, at save
    surgeon.load(base, diff)
    surgeon.load(base, diff)
    assert len(hashed) == 1  # the loads read the cache
    entry = json.load(open(tmp_path / "cache" / "base-digests.json"))["files"][os.path.realpath(weights)]
    assert entry["digests"] == json.load(open(os.path.join(diff, "manifest.json")))["base"]["tensor_sha256"]
    # the same bytes written again with the old mtime: the kernel's ctime changed, so it is hashed again
    stat = os.stat(weights)
    data = open(weights, "rb").read()
    open(weights, "wb").write(data)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    surgeon.load(base, diff)
    assert len(hashed) == 2
    # a poisoned entry for the current stamp would be believed: the cache is the user's own file
    # (documented); a corrupt cache is rebuilt with a warning and the load still checks
    (tmp_path / "cache" / "base-digests.json").write_text("{not json")
    with pytest.warns(UserWarning, match="digest cache .* is corrupt"):
        surgeon.load(base, diff)
    assert len(hashed) == 3
    assert json.load(open(tmp_path / "cache" / "base-digests.json"))["version"] == 1
    surgeon.load(base, diff)
    assert len(hashed) == 3


def test_an_unwritable_cache_only_costs_time(tiny_model_dir, tmp_path, hashed, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("SURGEON_CACHE", str(blocker / "cache"))  # a path under a file: never creatable
    base = tiny_model_dir("bert")
    diff = make_diff(base, str(tmp_path / "d"))
    no_warnings(lambda: surgeon.load(base, diff))
    assert len(hashed) == 2


def test_a_cache_entry_is_not_used_once_its_file_changed(tiny_model_dir, tmp_path, monkeypatch):
    # the cache holds the digests the manifest has; the file changed since, so they are not used
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    base = tiny_model_dir("bert")
    diff = make_diff(base, str(tmp_path / "d"))
    rewrite_one_tensor(base, "pooler.dense.weight")
    with pytest.raises(CheckpointError, match=r"pooler\.dense\.weight"):
        surgeon.load(base, diff)


@pytest.mark.parametrize("fmt", ["hf", "surgeon", "peft"])
def test_every_export_format_is_bound_to_the_base_and_the_diff_file(tiny_model_dir, tmp_path, fmt):
    base = tiny_model_dir("bert")
    diff = make_diff(base, str(tmp_path / "d"))
    rewrite_one_tensor(base, "pooler.dense.weight")
    out = str(tmp_path / "out")
    assert_one_line_error(run("export", diff, "-o", out, "--format", fmt), "made on another base", "--trust-base")
    assert not os.path.exists(out)
    result = run("export", diff, "-o", out, "--format", fmt, "--trust-base", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "--trust-base" in result.stderr or "trust_base" in result.stderr
    # the diff's own bytes are checked too, trusted base or not
    flip_bit(os.path.join(diff, "diff.safetensors"), -5)
    out2 = str(tmp_path / "out2")
    assert_one_line_error(run("export", diff, "-o", out2, "--format", fmt, "--trust-base"), "diff.safetensors")
    assert not os.path.exists(out2)
