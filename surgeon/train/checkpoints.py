"""The step checkpoints of a training run, in one directory (default `OUT.checkpoints/`).

    step-00000050/
      state.json              format marker, step, trained tensor names, the run's identity
      trainable.safetensors   every trained tensor (a scaffold head's too)
      optimizer.pt            AdamW state
      scheduler.pt            learning-rate schedule position
      diff/                   a complete surgeon diff of the student at that step, usable alone

Each step directory is written atomically; the older one is removed only after the newer is in
place. The directory is surgeon's only while it holds nothing but such step directories (and
the temp directories of their atomic writes): anything else in it — or a directory that is an
input of the run — is never deleted; a run refuses to start on it.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch

from ..errors import SurgeonError
from ..fs_marker import MARKER, write_marker
from ..fsutil import atomic_dir

FORMAT = "surgeon-train-checkpoint"
VERSION = 1
STATE = "state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
DIFF = "diff"
_STEP = re.compile(r"^step-(\d{8,})$")
_ATOMIC_LEFTOVER = re.compile(r"^\.step-\d{8,}\.(tmp|old)-[A-Za-z0-9_.-]+$")  # fsutil.atomic_dir's temp names
KIND = "train-checkpoints"  # the marker that makes the directory surgeon's (fs_marker)


def non_finite(tensors: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(name, what) of the first tensor holding inf or NaN, else None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            what = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
            return name, what
    return None


def _read_state(path: str) -> dict | None:
    try:
        with open(os.path.join(path, STATE), encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        return None
    if (
        isinstance(state, dict)
        and isinstance(state.get("step"), int)
        and isinstance(state.get("names"), list)
    ):
        return state
    return None


class CheckpointDir:
    """One run's checkpoint directory: list, check, write, prune, read and remove its steps."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def steps(self) -> list[tuple[int, str]]:
        """(step, path) of every complete step checkpoint, oldest first."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            match = _STEP.match(name)
            path = os.path.join(self.root, name)
            if match and os.path.isdir(path) and _read_state(path) is not None:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def foreign(self) -> list[str]:
        """Names in the directory that surgeon did not write (it must never delete them)."""
        if not os.path.isdir(self.root):
            return []
        ours = {os.path.basename(path) for _, path in self.steps()} | {MARKER}
        return sorted(n for n in os.listdir(self.root) if n not in ours and not _ATOMIC_LEFTOVER.match(n))

    def check_usable(self) -> None:
        """Refuse a checkpoint directory that holds anything but surgeon's step checkpoints (its
        place among the inputs is `fsutil.check_paths`' to check)."""
        strangers = self.foreign()
        if strangers:
            shown = ", ".join(strangers[:3]) + (
                f" and {len(strangers) - 3} more" if len(strangers) > 3 else ""
            )
            raise SurgeonError(
                f"train: the checkpoint directory {self.root} holds files surgeon did not write ({shown}); "
                "surgeon would remove it at the end of the run — move them, or pass --checkpoint-dir"
            )

    def path(self, step: int) -> str:
        return os.path.join(self.root, f"step-{step:08d}")

    def write(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        optimizer_state: dict,
        scheduler_state: dict,
        state: dict,
        write_diff,
        inputs: list[str],
    ) -> str:
        """Write step `step` atomically (`write_diff(dir)` saves the diff), then prune older steps."""
        from safetensors.torch import save_file

        if not os.path.isdir(self.root):
            os.makedirs(self.root)
            write_marker(self.root, KIND, whole_tree=True)
        target = self.path(step)
        with atomic_dir(target, inputs) as tmp:
            save_file(
                {n: t.detach().cpu().contiguous() for n, t in tensors.items()}, os.path.join(tmp, TRAINABLE)
            )
            torch.save(optimizer_state, os.path.join(tmp, OPTIMIZER))
            torch.save(scheduler_state, os.path.join(tmp, SCHEDULER))
            write_diff(os.path.join(tmp, DIFF))
            with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as handle:
                json.dump({"format": FORMAT, "version": VERSION, "step": step, **state}, handle, indent=1)
        for old_step, path in self.steps():
            if old_step != step:
                shutil.rmtree(path, ignore_errors=True)
        return target

    def read(self, path: str) -> tuple[dict, dict[str, torch.Tensor], dict, dict]:
        """(state, trained tensors, optimizer state, scheduler state) of one step checkpoint."""
        from safetensors.torch import load_file

        state = _read_state(path)
        if state is None or state.get("format") != FORMAT:
            raise SurgeonError(
                f"train: --resume: {path} is not a checkpoint this surgeon can resume (written by an earlier "
                "version, or damaged); delete the checkpoint directory to start over"
            )
        if state.get("version") != VERSION:
            raise SurgeonError(
                f"train: --resume: {path} is checkpoint format version {state.get('version')}, this surgeon "
                f"reads version {VERSION}"
            )
        try:
            tensors = load_file(os.path.join(path, TRAINABLE))
            optimizer = torch.load(os.path.join(path, OPTIMIZER), weights_only=True)
            scheduler = torch.load(os.path.join(path, SCHEDULER), weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SurgeonError(f"train: --resume: cannot read the checkpoint in {path}: {first}") from None
        return state, tensors, optimizer, scheduler

    def remove(self) -> str | None:
        """Remove the step checkpoints and then the directory, if nothing else is in it. Returns
        why the directory was left in place, or None."""
        if not os.path.isdir(self.root):
            return None
        for _, path in self.steps():
            shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.root):
            if _ATOMIC_LEFTOVER.match(name):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        strangers = self.foreign()
        marker = os.path.join(self.root, MARKER)
        if os.path.isfile(marker):
            # unmarked, the directory is no longer claimed as surgeon's: what is left in it is not ours
            os.remove(marker)
        if strangers:
            shown = ", ".join(strangers[:3])
            return f"left {self.root} in place: it holds files surgeon did not write ({shown})"
        try:
            os.rmdir(self.root)
        except OSError as exc:
            return f"left {self.root} in place: {exc.strerror}"
        return None
