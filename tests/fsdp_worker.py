"""One rank of a multi-process training run for the FSDP tests (launched by torchrun).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/fsdp_worker.py SPEC.json

SPEC: {"options": TrainConfig fields, "stop_at": step or null, "record": dir}. Each rank writes
record/rank-R.json: world size, losses, its peak RSS growth over setup (the model load), and the
local (shard) and full sizes of the trained tensors.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Stop(Exception):
    pass


def main(spec_path: str) -> None:
    torch.set_num_threads(1)
    from surgeon.train import Trainer
    from surgeon.train.config import make_config

    with open(spec_path) as handle:
        spec = json.load(handle)
    stop_at = spec.get("stop_at")

    def callback(step, loss):
        if stop_at is not None and step == stop_at:
            raise Stop(f"stopped at step {step}")

    trainer = Trainer(make_config(spec["options"]), callback=callback)
    before = rss_mib()
    trainer.setup()
    setup_peak = peak_rss_mib() - before
    record = {"rank": trainer.rank, "world": trainer.world, "setup_peak_mib": setup_peak}
    params = dict(trainer.task.named_parameters())
    record["local_numel"] = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in params.values())
    record["numel"] = sum(p.numel() for p in params.values())
    try:
        result = trainer.train()
        record["losses"] = result.losses
    except Stop as exc:
        record["stopped"] = str(exc)
    with open(os.path.join(spec["record"], f"rank-{trainer.rank}.json"), "w") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main(sys.argv[1])
