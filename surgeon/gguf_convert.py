"""GGUF files as plain checkpoints: dequantise once to an fp32 safetensors directory, cached.

surgeon works on Hugging Face directories (config.json + safetensors). A GGUF file (llama.cpp's
single-file format, often quantised) is read with transformers' own GGUF support
(`from_pretrained(folder, gguf_file=...)`, which needs the `gguf` package and dequantises every
tensor to float32) and saved with `save_pretrained`: config, weights, tokenizer, generation
config. That takes a minute or two for a 135M-parameter model, so it is done once per GGUF file
into a cache directory:

    $SURGEON_CACHE/gguf/<file stem>-<key>/      (SURGEON_CACHE defaults to ~/.cache/surgeon)

The key is a hash of the file's name, size and modification time: a replaced file converts again.
The directory appears atomically (`fsutil.atomic_dir`); a lock file beside it makes a second
process that asks for the same file wait for the first one's result instead of converting too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import struct
import sys

from .errors import CheckpointError, SurgeonError
from .fsutil import atomic_dir, check_output

CACHE_ENV = "SURGEON_CACHE"
MARKER = "surgeon-gguf.json"  # written last inside the converted directory: what it came from


def cache_root() -> str:
    """`$SURGEON_CACHE`, else `~/.cache/surgeon`."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "surgeon")
    return os.path.abspath(os.path.expanduser(root))


def _check_gguf(path: str) -> os.stat_result:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: GGUF file not found")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
    return os.stat(path)


def cache_key(path: str) -> str:
    """`<stem>-<16 hex>` from the file's name, size and mtime (no content hashing: files are large)."""
    stat = _check_gguf(path)
    name = os.path.basename(path)
    digest = hashlib.sha256(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
    return f"{stem}-{digest}"


def cached_dir(path: str) -> str:
    """Where the conversion of `path` lives in the cache (whether or not it exists yet)."""
    return os.path.join(cache_root(), "gguf", cache_key(path))


def is_converted(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MARKER))


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader imports it; fail here with a clear line)
    except ImportError:
        raise SurgeonError("reading GGUF files needs the `gguf` package: pip install gguf") from None


def convert(path: str, out_dir: str, *, overwrite: bool = False, progress: bool = True) -> str:
    """Dequantise the GGUF file `path` into a Hugging Face directory `out_dir` (fp32 safetensors,
    config, tokenizer, generation config), atomically. Returns `out_dir`."""
    stat = _check_gguf(path)
    _require_gguf_package()
    check_output(out_dir, [path], overwrite=overwrite)  # before the slow part: refuse a bad OUT now
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    folder, name = os.path.split(os.path.abspath(path))
    if progress:
        print(f"surgeon: converting {name} ({stat.st_size / 2**20:.1f} MiB GGUF) to an fp32 safetensors "
              f"checkpoint in {out_dir} (once; about a minute for 100 MB)", file=sys.stderr)
    with atomic_dir(out_dir, [path], overwrite=overwrite, kind="gguf-import") as tmp:
        try:
            # dequantize=True: every weight unpacked into a plain dense model, and the quantizer
            # detached afterwards (save_pretrained refuses a model that still has one)
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32, local_files_only=True,
                quantization_config=transformers.GgufConfig(dequantize=True),
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                folder, gguf_file=name, local_files_only=True
            )
        except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError, EOFError, IndexError,
                struct.error) as exc:  # what a truncated, corrupt or unsupported file raises in the reader
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: transformers cannot read this GGUF file: {first}") from None
        model.save_pretrained(tmp)  # safetensors, config.json and generation_config.json
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as handle:
            record = {"gguf": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                      "transformers": transformers.__version__, "dtype": "float32"}  # fmt: skip
            json.dump(record, handle, indent=1)
            handle.write("\n")
    if progress:
        print(f"surgeon: wrote {out_dir}", file=sys.stderr)
    return out_dir


@contextlib.contextmanager
def _locked(lock_path: str, *, progress: bool):
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"surgeon: waiting for another process to finish {lock_path[:-5]}", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def converted(path: str, *, progress: bool = True) -> str:
    """The cached Hugging Face directory for the GGUF file `path`, converting it first if needed.

    Safe to call from several processes at once: one converts, the others wait on the lock and
    then use its result."""
    directory = cached_dir(path)
    if is_converted(directory):
        return directory
    with _locked(directory + ".lock", progress=progress):
        if not is_converted(directory):  # another process may have finished while we waited
            convert(path, directory, overwrite=True, progress=progress)
    return directory
