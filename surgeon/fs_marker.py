"""Recognising a directory surgeon wrote, so `--force` replaces nothing else.

A diff is recognised by its `manifest.json` (`format: surgeon-diff`); every other output kind
(a merged Hugging Face export, a PEFT adapter) carries a small marker file, `.surgeon-output.json`,
listing the files surgeon wrote there (or `files: null` for a directory whose whole tree is
surgeon's, such as a training run's checkpoint folder). A directory is replaceable when it is
empty, or when it is recognised and holds no file surgeon did not write.
"""

from __future__ import annotations

import json
import os

MARKER = ".surgeon-output.json"
MARKER_FORMAT = "surgeon-output"
DIFF_MANIFEST = "manifest.json"
DIFF_FORMAT = "surgeon-diff"
DIFF_FILE = "diff.safetensors"


def tree_files(directory: str) -> set[str]:
    """Relative paths of everything under `directory` but directories (links are not followed:
    a link, to a file or a directory, counts as one entry)."""
    found = set()
    for root, dirs, files in os.walk(directory):
        for name in list(dirs):
            if os.path.islink(os.path.join(root, name)):
                dirs.remove(name)
                files.append(name)
        for name in files:
            found.add(os.path.relpath(os.path.join(root, name), directory))
    return found


def write_marker(directory: str, kind: str, *, whole_tree: bool = False) -> None:
    """Mark `directory` as surgeon's output of `kind`, listing the files in it now."""
    files = None if whole_tree else sorted(tree_files(directory) - {MARKER})
    with open(os.path.join(directory, MARKER), "w", encoding="utf-8") as handle:
        json.dump({"format": MARKER_FORMAT, "kind": kind, "files": files}, handle, indent=1)
        handle.write("\n")


def _read_json(path: str):
    if os.path.islink(path) or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def written_files(directory: str) -> set[str] | None | bool:
    """What surgeon wrote in `directory`: a set of relative paths, True for the whole tree, or
    None when nothing marks the directory as surgeon's."""
    marker = _read_json(os.path.join(directory, MARKER))
    if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT:
        files = marker.get("files")
        if files is None:
            return True
        if isinstance(files, list):
            return {f for f in files if isinstance(f, str)} | {MARKER}
        return None
    manifest = _read_json(os.path.join(directory, DIFF_MANIFEST))
    if isinstance(manifest, dict) and manifest.get("format") == DIFF_FORMAT:
        recipes = manifest.get("recipes")
        recipes = recipes if isinstance(recipes, list) else ["recipe.yaml"]
        return {DIFF_MANIFEST, DIFF_FILE} | {r for r in recipes if isinstance(r, str)}
    return None


def replace_problem(directory: str, shown: str | None = None) -> str | None:
    """Why the existing directory may not be replaced or deleted (None: it may). `shown` is the
    path to name in the message (the directory may have been moved to a temp name)."""
    shown = shown or directory
    if os.path.islink(directory) or not os.path.isdir(directory):
        return f"{shown} is not a directory"
    if not os.listdir(directory):
        return None
    written = written_files(directory)
    if written is None:
        return (
            f"{shown} already exists and was not written by surgeon (it holds no {DIFF_MANIFEST} of a "
            f"surgeon diff and no {MARKER}); surgeon replaces only its own outputs: remove it yourself "
            "or choose another output"
        )
    if written is True:
        return None
    foreign = sorted(tree_files(directory) - written)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        return (
            f"{shown} already exists and holds {foreign[0]}{more}, which surgeon did not write; "
            "remove it yourself or choose another output"
        )
    return None
