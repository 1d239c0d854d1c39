"""Helpers the export tests share: a stand-in for training, and a child process that loads an
export with plain transformers while `import surgeon` is blocked, so "loads without surgeon
installed" is checked, not assumed."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from conftest import tiny_model

import surgeon

PLAIN_LOADER = r"""
import importlib.abc, json, sys
class NoSurgeon(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "surgeon" or name.startswith("surgeon."):
            raise ImportError("surgeon is not installed here")
sys.meta_path.insert(0, NoSurgeon())
import torch, transformers
transformers.utils.logging.set_verbosity_error()
AUTO = ("AutoModel", "AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
        "AutoModelForTokenClassification")
cases, results = torch.load(sys.argv[1]), {}
for key, (directory, inputs) in cases.items():
    arch = json.load(open(directory + "/config.json"))["architectures"][0]
    for auto in AUTO:  # the Auto class that gives arch
        try:
            model, info = getattr(transformers, auto).from_pretrained(directory, output_loading_info=True)
        except ValueError:  # this Auto class has no entry for the config
            continue
        if type(model).__name__ == arch:
            break
    assert type(model).__name__ == arch, (type(model).__name__, arch)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        out = model.eval()(**inputs)
    results[key] = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    if "generate" in key:
        prompt = inputs["input_ids"][:1, :6]
        results[key + ":tokens"] = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                                                  do_sample=False, pad_token_id=0)
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
    """Outputs of the exported dirs loaded by plain transformers, in a process without surgeon.
    A case whose key contains "generate" also gets its greedy tokens under "KEY:tokens"."""
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
