"""Training text: UTF-8 files → the checkpoint's tokenizer → packed sequences of seq_len.

Packing (as in RoBERTa's FULL-SENTENCES and GPT-2 pretraining): every file is one document;
documents are tokenized without special tokens, joined with a separator (the tokenizer's
sep/eos token), cut into equal chunks, and each chunk gets the tokenizer's own special tokens
around it (BERT: [CLS] … [SEP]; Llama: <s> …; GPT-2: none). No padding is ever needed, and
position 0 of an encoder chunk is always [CLS] (which global-token recipes rely on).
The tail shorter than a chunk is dropped. Every file is read once and the total is bounded
(`read_corpus`): the whole corpus is tokenized in memory.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass

import torch

from ..errors import SurgeonError
from .config import DEFAULT_MAX_DATA_MB

MiB = 1 << 20
DEFAULT_MAX_BYTES = int(DEFAULT_MAX_DATA_MB * MiB)


def load_tokenizer(base_dir: str, command: str = "train"):
    """The checkpoint's tokenizer; a failure is one error line starting with `command`."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SurgeonError(f"{command}: cannot load the tokenizer of {base_dir}: {first}") from None


@dataclass(frozen=True)
class Document:
    """One data file, read once: its text and the sha256 of its bytes."""

    path: str
    text: str
    sha256: bytes


def _describe(size: int) -> str:
    return f"{size / MiB:.1f} MiB" if size < 1024 * MiB else f"{size / 1024**3:.1f} GiB"


def _read_bounded(path: str, allowed: int, limit: int) -> bytes:
    """At most `allowed` bytes of `path`, refusing more: a regular file by its size, anything else
    (a pipe, /dev/zero) by reading one byte past the allowance."""
    too_much = (
        f"the data exceed the limit of {_describe(limit)} of text per run (max_data_mb; all of it is "
        "tokenized and held in memory); raise --max-data-mb if the machine has the memory, or train on less"
    )
    try:
        with open(path, "rb") as handle:
            info = os.fstat(handle.fileno())
            if stat.S_ISREG(info.st_mode) and info.st_size > allowed:
                raise SurgeonError(f"train: data file {path} is {_describe(info.st_size)}: {too_much}")
            raw = handle.read(allowed + 1)
    except FileNotFoundError:
        raise SurgeonError(f"train: data file {path} not found") from None
    except IsADirectoryError:
        raise SurgeonError(f"train: data file {path} is a directory; pass text files") from None
    except OSError as exc:
        raise SurgeonError(f"train: cannot read data file {path}: {exc.strerror}") from None
    if len(raw) > allowed:
        raise SurgeonError(f"train: data file {path} goes on past {_describe(allowed)}: {too_much}")
    return raw


def _decode(path: str, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SurgeonError(
            f"train: data file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}, line {line}); convert it (e.g. iconv -t utf-8)"
        ) from None
    if not text.strip():
        raise SurgeonError(f"train: data file {path} is empty")
    return text


def read_corpus(paths: list[str], max_bytes: int = DEFAULT_MAX_BYTES) -> list[Document]:
    """Every data file, read once (a pipe can be read only once) and at most `max_bytes` in total;
    empty, missing, non-UTF-8 or too large files are errors naming the file."""
    documents, total = [], 0
    for path in paths:
        raw = _read_bounded(path, max_bytes - total, max_bytes)
        total += len(raw)
        documents.append(Document(path, _decode(path, raw), hashlib.sha256(raw).digest()))
    return documents


def read_text(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """One data file as text (see `read_corpus`)."""
    return read_corpus([path], max_bytes)[0].text


def special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a single sequence (e.g. [CLS], [SEP])."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain) :])
    return [], []


def separator_id(tokenizer) -> int | None:
    for name in ("sep_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None


def pack(tokenizer, files: list[str] | list[Document], seq_len: int) -> torch.Tensor:
    """Token ids of all `files` (paths or read `Document`s), packed: (N, seq_len) long tensor."""
    if not files:
        raise SurgeonError("train: no data files given (--data FILE)")
    documents = [f if isinstance(f, Document) else read_corpus([os.fspath(f)])[0] for f in files]
    prefix, suffix = special_wrap(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise SurgeonError(f"train: seq-len {seq_len} leaves no room for text after the special tokens")
    sep = separator_id(tokenizer)
    pieces: list[torch.Tensor] = []  # one int64 tensor per file (and separator): no giant Python list
    for document in documents:
        ids = tokenizer(document.text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise SurgeonError(f"train: data file {document.path} has no tokens")
        if pieces and sep is not None:
            pieces.append(torch.tensor([sep], dtype=torch.long))
        pieces.append(torch.tensor(ids, dtype=torch.long))
        del ids
    stream = torch.cat(pieces)  # (tokens,)
    count = len(stream) // body
    if count == 0:
        raise SurgeonError(
            f"train: the data has {len(stream)} tokens, fewer than one sequence of seq-len "
            f"{seq_len} needs ({body} + {len(prefix) + len(suffix)} special); add text or lower --seq-len"
        )
    chunks = stream[: count * body].view(count, body)  # (N, body)
    parts = [torch.tensor(prefix, dtype=torch.long).expand(count, -1), chunks,
             torch.tensor(suffix, dtype=torch.long).expand(count, -1)]  # fmt: skip
    return torch.cat(parts, dim=1)  # (N, seq_len)


def fingerprint(documents: list[Document]) -> str:
    """sha256 over the files' sha256 digests (in order): a resumed run must see the same data."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.sha256)
    return digest.hexdigest()


class StepBatches:
    """Batches as a pure function of (seed, step, rank): resuming needs no loader state.

    Each epoch is a fresh permutation of the sequences (seeded by seed + epoch); global step s
    takes the next `batch_size * world` sequences of that stream, and rank r takes its slice.
    """

    def __init__(self, sequences: torch.Tensor, batch_size: int, *, world: int = 1, rank: int = 0, seed: int = 0):
        self.sequences = sequences  # (N, seq_len)
        self.batch_size, self.world, self.rank, self.seed = batch_size, world, rank, seed
        self._epoch, self._order = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.sequences), generator=generator)
        return self._order

    def batch(self, step: int) -> torch.Tensor:  # (batch_size, seq_len)
        n = len(self.sequences)
        per_step = self.batch_size * self.world
        start = step * per_step + self.rank * self.batch_size
        index = [(start + i) for i in range(self.batch_size)]
        rows = [self._permutation(i // n)[i % n] for i in index]
        return self.sequences[torch.stack(rows)]
