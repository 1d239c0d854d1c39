"""Stopping a run at a step boundary: Ctrl-C / SIGTERM set a flag the loop reads between steps.

A second signal stops at once (KeyboardInterrupt). With several processes every rank must agree
to stop at the same step (a lone rank leaving would hang the others' all-reduce), so the flag
and the time limit are max-reduced across ranks before each step.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

import torch

from ..errors import Interrupted


class TrainingInterrupted(Interrupted):
    """Ctrl-C / SIGTERM: the run stopped at a step boundary; the last checkpoint is intact."""


class StopFlag:
    """SIGINT/SIGTERM set a flag checked at step boundaries; a second signal stops at once."""

    def __init__(self):
        self.signal_number = 0

    def handler(self, number, frame):
        if self.signal_number:
            raise KeyboardInterrupt
        self.signal_number = number

    @contextmanager
    def installed(self):
        previous = {}
        try:
            for number in (signal.SIGINT, signal.SIGTERM):
                previous[number] = signal.signal(number, self.handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield self
        finally:
            for number, old in previous.items():
                signal.signal(number, old)

    def agreed(self, accelerator, out_of_time: bool) -> tuple[bool, bool]:
        """(interrupted, out of time), agreed by every rank."""
        if accelerator.num_processes == 1:
            return bool(self.signal_number), out_of_time
        mine = torch.tensor([float(self.signal_number), float(out_of_time)], device=accelerator.device)
        agreed = accelerator.reduce(mine, "max").tolist()
        if agreed[0] and not self.signal_number:
            self.signal_number = int(agreed[0])
        return bool(agreed[0]), bool(agreed[1])

    def error(self, step: int | None, last_checkpoint: tuple[int, str] | None, save_every: int | None):
        """The TrainingInterrupted to raise: where the run stopped and how to continue."""
        number = self.signal_number or signal.SIGINT
        what = signal.Signals(number).name
        where = f" before step {step + 1}" if step is not None else ""
        if last_checkpoint:
            tail = (f"the last checkpoint (step {last_checkpoint[0]}) is intact in {last_checkpoint[1]}; "
                    "rerun with --resume to continue")  # fmt: skip
        elif save_every:
            tail = f"no checkpoint was written yet (the first comes at step {save_every}); nothing to resume"
        else:
            tail = "no checkpoints were requested (--save-every); nothing to resume"
        return TrainingInterrupted(f"train: interrupted by {what}{where}; {tail}", number)
