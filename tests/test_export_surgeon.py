"""`surgeon export --format surgeon`: one directory that `surgeon.load(OUT)` turns back into the
patched model with no base — for every action kind — and that refuses tampered content."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import first_output, tiny_inputs
from export_support import make_diff, save_base

import surgeon
from surgeon.cli_export import export_cmd
from surgeon.errors import CheckpointError, SurgeonError
from surgeon.export.self_contained import ADDED_FILE, export_self_contained

LORA_QV = {"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 4, "alpha": 8}}
# key -> (family, rules, LoRA merged, LoRA kept, rules re-applied on load)
CASES = {
    "lora_bitfit": ("bert", [LORA_QV, {"do": "bitfit", "select": {"role": "model"}}], ["default"], [], ["bitfit"]),
    "freeze_unfreeze": ("bert", [{"do": "unfreeze", "select": {"role": "layer", "layers": "-1:"}},
                                 {"do": "freeze", "select": {"role": "norm"}}], [], [], ["unfreeze", "freeze"]),
    "lora_tied_kept": ("gpt2", [{"do": "lora", "select": {"path": "lm_head"}, "with": {"r": 2, "name": "head"}},
                                {"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 2}}],
                       ["default"], ["head"], ["lora"]),
    "adapter": ("bert", [LORA_QV, {"do": "adapter", "select": {"role": "layer"}, "with": {"size": 4}}],
                ["default"], [], ["adapter"]),
    "sliding_dilated": ("bert", [LORA_QV, {"do": "sliding_window", "select": {"role": "attn"},
                                           "with": {"window": 4, "dilation": [1, 2], "global_tokens": [0]}}],
                        ["default"], [], ["sliding_window"]),
    "blockwise": ("roberta", [{"do": "blockwise", "select": {"role": "attn"}, "with": {"block_size": 4, "permutations": 2}}],
                  [], [], ["blockwise"]),
    "linformer_shared": ("roberta", [LORA_QV, {"do": "linformer", "select": {"role": "attn"},
                                               "with": {"k": 4, "max_length": 66, "share": "layer"}}],
                         ["default"], [], ["linformer"]),
    "latent": ("bert", [{"do": "latent", "select": {"role": "attn"}, "with": {"m": 3, "local_window": 4}}], [], [], ["latent"]),
    "lsh": ("bert", [{"do": "lsh", "select": {"role": "attn"}, "with": {"n_hashes": 2, "bucket_size": 4}}], [], [], ["lsh"]),
    "extend_positions": ("bert", [{"do": "extend_positions", "select": {"role": "embed"}, "with": {"length": 128}}, LORA_QV,
                                  {"do": "sliding_window", "select": {"role": "attn"}, "with": {"window": 8}}],
                         ["default"], [], ["sliding_window"]),
    "llama_sink": ("llama", [LORA_QV, {"do": "sliding_window", "select": {"role": "attn"},
                                       "with": {"window": 4, "global_tokens": [0]}}], ["default"], [], ["sliding_window"]),
}  # fmt: skip


def _inputs(key: str, family: str) -> dict:
    if key == "extend_positions":  # beyond the base's 64 positions
        ids = torch.randint(3, 96, (2, 100), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs = tiny_inputs(family, seq=24)
    inputs["attention_mask"][1, 17:] = 0
    return inputs


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """key -> (base, diff, out, summary); bases saved once per family."""
    tmp = str(tmp_path_factory.mktemp("surgeon-format"))
    bases, out = {}, {}
    for key, (family, rules, *_) in CASES.items():
        if family not in bases:
            bases[family] = save_base(
                family, f"{tmp}/{family}", **({"max_shard_size": "20KB"} if family == "llama" else {})
            )
        diff = make_diff(bases[family], f"{tmp}/{key}-diff", {"surgeon": 1, "rules": rules})
        summary = export_self_contained(diff, f"{tmp}/{key}-out", progress=False)
        out[key] = (bases[family], diff, f"{tmp}/{key}-out", summary)
    return out


@pytest.mark.parametrize("key", list(CASES))
def test_load_without_base_gives_the_patched_model(exports, key):
    family, _, merged, kept, reapplied = CASES[key]
    base, diff, out, summary = exports[key]
    assert summary["lora"] == {"merged": merged, "kept": kept, "left_out": []}
    config = json.load(open(os.path.join(out, "config.json")))
    assert [r["do"] for r in (config["recipe"] or {"rules": []})["rules"]] == reapplied
    inputs = _inputs(key, family)
    want_model = surgeon.load(base, diff)
    got_model = surgeon.load(out)
    with torch.no_grad():
        want, got = first_output(want_model(**inputs)), first_output(got_model(**inputs))
    real = inputs["attention_mask"].bool()
    want, got = want[real], got[real]
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    # what stays trainable: the re-applied rules' tensors (merged LoRA and realised rules are gone)
    expected = {
        n for n in surgeon.surgery_of(want_model).ledger.trainable if ".surgeon_lora.default." not in n
    }
    trainable = {n for n, p in got_model.named_parameters() if p.requires_grad}
    assert trainable == expected


def test_merged_lora_is_in_the_weights_not_in_added(exports):
    from safetensors import safe_open

    _, _, out, summary = exports["lora_tied_kept"]
    with safe_open(os.path.join(out, ADDED_FILE), "pt") as added:
        names = set(added.keys())
    assert names and all(".surgeon_lora.head." in n for n in names)  # only the kept (tied) adapter
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as weights:
        assert not any("surgeon" in n for n in weights.keys())
    assert summary["merged"] > 0


def test_no_base_needed(exports, tmp_path):
    base, diff, out, _ = exports["adapter"]
    moved = str(tmp_path / "moved-out")
    shutil.copytree(out, moved)
    hidden = base + "-hidden"
    os.rename(base, hidden)  # the export must not read the base (or the diff) again
    try:
        model = surgeon.load(moved)
    finally:
        os.rename(hidden, base)
    inputs = _inputs("adapter", "bert")
    with torch.no_grad():
        got, want = first_output(model(**inputs)), first_output(surgeon.load(base, diff)(**inputs))
    assert torch.allclose(got, want, atol=1e-5)


def test_automodel_after_import_surgeon_auto(exports):
    import transformers

    import surgeon.auto  # noqa: F401  (registers model_type "surgeon" with the Auto classes)

    _, _, out, _ = exports["linformer_shared"]
    model = transformers.AutoModelForMaskedLM.from_pretrained(out)
    assert type(model).__name__ == "RobertaForMaskedLM"
    inputs = _inputs("linformer_shared", "roberta")
    with torch.no_grad():
        assert torch.equal(first_output(model(**inputs)), first_output(surgeon.load(out)(**inputs)))


def test_plain_transformers_refuses_instead_of_loading_dense(exports):
    _, _, out, _ = exports["sliding_dilated"]
    code = (
        "import sys, transformers\n"
        "try:\n    transformers.AutoModel.from_pretrained(sys.argv[1])\n"
        "except (ValueError, KeyError) as exc:\n    print('refused:', str(exc)[:200]); sys.exit(0)\n"
        "sys.exit('loaded')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))  # fmt: skip
    assert proc.returncode == 0 and "refused" in proc.stdout and "surgeon" in proc.stdout, (
        proc.stdout + proc.stderr
    )


@pytest.mark.parametrize("file", ["model.safetensors.index.json", "shard", ADDED_FILE])
def test_tampered_content_is_refused(exports, tmp_path, file):
    _, _, out, _ = exports["llama_sink"]
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    if file == "shard":
        file = sorted(f for f in os.listdir(copy) if f.startswith("model-"))[1]
    path = os.path.join(copy, file)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x01  # one bit of tensor data (or of the index's JSON text)
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{file}: content differs from its sha256"):
        surgeon.load(copy)


def test_only_chosen_adapters_are_exported(tmp_path):
    base = save_base("bert", str(tmp_path / "base"))
    rules = [
        dict(LORA_QV, **{"with": {"r": 2, "name": "task_a"}}),
        dict(LORA_QV, **{"with": {"r": 2, "name": "task_b"}}),
    ]
    diff = make_diff(base, str(tmp_path / "diff"), {"surgeon": 1, "rules": rules})
    summary = export_self_contained(diff, str(tmp_path / "out"), progress=False, adapters=["task_a"])
    assert summary["lora"] == {"merged": ["task_a"], "kept": [], "left_out": ["task_b"]}
    only_a = surgeon.load(base, diff)
    surgeon.lora.set_active(only_a, "task_a")
    inputs = _inputs("a", "bert")
    with torch.no_grad():
        assert torch.allclose(first_output(surgeon.load(str(tmp_path / "out"))(**inputs)),
                              first_output(only_a(**inputs)), atol=1e-5)  # fmt: skip
    with pytest.raises(SurgeonError, match="no LoRA adapter named 'task_c'"):
        export_self_contained(diff, str(tmp_path / "out2"), progress=False, adapters=["task_c"])
    assert not os.path.exists(tmp_path / "out2") and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_cli_format_surgeon(exports, tmp_path):
    _, diff, _, _ = exports["latent"]
    out = str(tmp_path / "cli-out")
    result = CliRunner().invoke(export_cmd, [diff, "-o", out, "--format", "surgeon", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "re-applied on load" in result.output and os.path.isfile(os.path.join(out, ADDED_FILE))
    result = CliRunner().invoke(export_cmd, [diff, "-o", out, "--format", "surgeon"])
    assert result.exit_code == 2 and "already exists" in result.output and "Traceback" not in result.output


def test_load_with_one_argument_tells_a_diff_from_an_export(exports):
    base, diff, out, _ = exports["lora_bitfit"]
    inputs = _inputs("lora_bitfit", "bert")
    with torch.no_grad():
        on_recorded_base = first_output(surgeon.load(diff)(**inputs))  # the base the manifest records
        assert torch.equal(on_recorded_base, first_output(surgeon.load(base, diff)(**inputs)))
        assert torch.allclose(first_output(surgeon.load(out)(**inputs)), on_recorded_base, atol=1e-5)


def test_a_diff_against_an_export_is_refused_not_written(exports, tmp_path):
    _, _, out, _ = exports["lora_bitfit"]
    model = surgeon.load(out)
    with pytest.raises(SurgeonError, match="not a base a diff can be loaded onto; keep training from the diff"):
        surgeon.save_diff(model, str(tmp_path / "diff2"), base_dir=out)
    assert not os.path.exists(tmp_path / "diff2")
