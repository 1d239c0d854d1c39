"""What binds a diff to its exact base, and to its own bytes.

`save_diff` records in manifest.json (diff format 2):
- `base.tensors` / `base.listing_sha256`: every base tensor's name, dtype and shape;
- `base.tensor_sha256`: sha256 of every base tensor's bytes as its safetensors file stores them
  (`base.file_sha256`, of each weight file, for a pickle base) — so a diff made on one
  checkpoint is refused on another of the same architecture, whichever tensors the diff replaces;
- `diff_header_sha256` and `tensors.<name>.sha256`: the header of `diff.safetensors` and each
  tensor stored in it. The header and the tensors' bytes tile the whole file
  (`surgeon.safetensors_header`), so any flipped bit in it is caught.

Loading (`surgeon.load`, `verify`, `export`, `train`) checks all of them. `trust_base=True`
(`--trust-base`) skips the base's content — only its listing is compared — and says so in one
warning. Diffs written before format 2 carry only the listing and the digests of the base
tensors they replace; they load, with a warning that their binding is weaker.
"""

from __future__ import annotations

import os
import warnings

from .base_digests import base_digests
from .checkpoint import CheckpointInfo
from .digest import Span, digest_spans
from .errors import CheckpointError
from .safetensors_header import TORCH_NAMES, Layout, read_layout

TRUST_HINT = "to load it anyway, pass --trust-base (Python: trust_base=True)"


def _spec(dtype: str, shape) -> str:
    """("F32", [384, 512]) -> "F32[384,512]": one short line per tensor in the manifest."""
    return f"{dtype}[{','.join(str(int(x)) for x in shape)}]"


def base_record(info: CheckpointInfo) -> dict:
    """The manifest's `base` fields describing the base's tensors and content."""
    record = {
        "listing_sha256": info.listing_digest() if info.tensors else None,
        "tensors": {n: _spec(d, s) for n, (d, s) in sorted(info.tensors.items())},
    }
    key = "file_sha256" if info.format == "pickle" else "tensor_sha256"
    record[key] = dict(sorted(base_digests(info).items()))
    return record


def diff_file_record(path: str, layout: Layout | None = None) -> tuple[str, dict[str, str]]:
    """(sha256 of the header, name -> sha256 of each tensor) of a written diff.safetensors."""
    layout = layout or read_layout(path)
    spans = [Span(name, path, begin, end) for name, (begin, end) in layout.spans.items()]
    digests = digest_spans([Span(None, path, 0, layout.header_end), *spans], desc="hashing the diff")
    return digests.pop(None), digests


def fully_bound(manifest: dict) -> bool:
    base = manifest["base"]
    return base.get("tensor_sha256") is not None or base.get("file_sha256") is not None


def check_listing(manifest: dict, info: CheckpointInfo, diff_dir: str) -> None:
    """Refuse a base whose tensor listing (names, dtypes, shapes) differs from the diff's base."""
    expected = manifest["base"].get("tensors") or {}
    if not expected or not info.tensors:
        return  # pickle bases have no header listing
    if info.listing_digest() == manifest["base"].get("listing_sha256"):
        return
    for name, spec in expected.items():
        if name not in info.tensors:
            raise CheckpointError(
                f"{diff_dir} was made on another base: {info.directory} has no tensor {name}"
            )
        got = _spec(*info.tensors[name])
        if got != spec:
            raise CheckpointError(
                f"{diff_dir} was made on another base: tensor {name} is {got} in {info.directory}, expected {spec}"
            )
    extra = sorted(set(info.tensors) - set(expected))
    if extra:
        raise CheckpointError(
            f"{diff_dir} was made on another base: {info.directory} has an extra tensor {extra[0]}"
        )


def check_base(manifest: dict, info: CheckpointInfo, diff_dir: str, *, trust_base: bool = False) -> None:
    """Refuse a base that is not the exact checkpoint the diff was made on: its listing always,
    its content unless `trust_base` (then one warning says what went unchecked)."""
    check_listing(manifest, info, diff_dir)
    base = manifest["base"]
    if trust_base:
        count = len(info.tensors) or len(info.files)
        what = "tensors" if info.tensors else "weight files"
        warnings.warn(
            f"trust_base: the content of {info.directory} ({count} {what}) was not compared with the base "
            f"{diff_dir} was made on; only tensor names, dtypes and shapes were",
            stacklevel=3,
        )
        return
    if not fully_bound(manifest):
        warnings.warn(
            f"{diff_dir} was written by surgeon {manifest.get('surgeon_version', '?')} (diff format "
            f"{manifest.get('format_version', 1)}), which recorded no digest of its base's content or its own "
            f"tensors: only the tensor listing and the {len(base.get('replaced_sha256') or {})} base tensors it "
            "replaces bind it to its base; save it again (e.g. surgeon train, or load and save_diff) to bind it fully",
            stacklevel=3,
        )
        return
    if (info.format == "pickle") != (base.get("file_sha256") is not None):
        made = "pickle" if base.get("file_sha256") is not None else "safetensors"
        raise CheckpointError(
            f"{diff_dir} was made on a {made} checkpoint and {info.directory} holds {info.format} weights: "
            f"their content cannot be compared; {TRUST_HINT}"
        )
    expected = base.get("file_sha256") or base["tensor_sha256"]
    got = base_digests(info)
    differ = sorted(name for name in expected if got.get(name) != expected[name])
    if not differ:
        return
    first = differ[0]
    where = os.path.join(info.directory, info.weight_map.get(first, first))
    what = f"weight file {first}" if info.format == "pickle" else f"tensor {first} in {where}"
    more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
    raise CheckpointError(
        f"{diff_dir} was made on another base: the content of {what}{more} differs from the base it was made on; "
        f"{TRUST_HINT}"
    )


def check_diff_file(manifest: dict, path: str) -> None:
    """The diff's own bytes: each stored tensor's dtype and sha256, and the header's sha256."""
    records = manifest["tensors"]
    layout = read_layout(path)
    for name, tag in sorted(layout.dtypes.items()):
        recorded = records.get(name, {}).get("dtype")
        if recorded is not None and TORCH_NAMES.get(tag, tag) != recorded:
            raise CheckpointError(
                f"{path}: tensor {name} is stored as {TORCH_NAMES.get(tag, tag)}, the manifest records {recorded}"
            )
    header = manifest.get("diff_header_sha256")
    if header is None:
        return  # format 1: check_base has warned that the diff carries no digests
    got_header, got = diff_file_record(path, layout)
    for name in sorted(records):
        if got.get(name) != records[name].get("sha256"):
            raise CheckpointError(
                f"{path}: tensor {name} does not match its sha256 in the manifest: the file was corrupted or "
                "changed after surgeon wrote it"
            )
    if got_header != header:
        raise CheckpointError(
            f"{path}: its header does not match its sha256 in the manifest: the file was corrupted or "
            "changed after surgeon wrote it"
        )
