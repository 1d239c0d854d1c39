"""Per-rank memory of `surgeon train` in 2 processes: --strategy ddp (the whole model in every
process) against --strategy fsdp (FSDP2: each rank holds its shard), on a random Llama of a few
hundred MB.

    python benchmarks/fsdp_memory.py                  # ~320 MB fp32 base, 3 steps
    python benchmarks/fsdp_memory.py --quick          # a ~20 MB base (the smoke test)

The base (hidden 768, 8 layers, MLP 2048, vocab 16000, untied head: 81 M parameters, fp32) is
written once to a temporary directory with a LoRA r=8 diff on q/v. Each strategy runs under
`torch.distributed.run --standalone --nproc-per-node 2` (gloo, CPU), objective clm; every rank
runs `Trainer.setup()` (loading the base is its memory) and then the steps, and reports
- `setup_mib`: its peak RSS during setup above its RSS before (what loading the model costs it);
- `train_mib`: its peak RSS over the whole run above the same starting point;
- `seconds_per_step`: the median step time (fsdp gathers each layer's weights for the forward
  and again for the backward: more communication than ddp's one gradient all-reduce).
The two strategies run one after the other (not interleaved: each is one 2-process launch), so on
a loaded machine the times are noisy; the memory is not. Prints fsdp/ddp ratios and writes
benchmarks/results/fsdp_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import write_json

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "fsdp_memory.json")
FULL = dict(hidden_size=768, num_hidden_layers=8, intermediate_size=2048, vocab_size=16000, num_attention_heads=12)
QUICK = dict(hidden_size=256, num_hidden_layers=4, intermediate_size=512, vocab_size=4000, num_attention_heads=4)


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(spec_path: str) -> None:
    """One rank: setup, then the steps; writes its numbers beside the spec."""
    import torch

    torch.set_num_threads(1)
    from surgeon.train import Trainer
    from surgeon.train.config import make_config

    with open(spec_path) as handle:
        spec = json.load(handle)
    before = _rss_mib()
    trainer = Trainer(make_config(spec["options"]))
    trainer.setup()
    setup = _peak_mib() - before
    times, peaks = [], []
    for step in range(trainer.config.steps):
        start = time.perf_counter()
        trainer.backward(step)
        trainer.optimizer_step()
        times.append(time.perf_counter() - start)
        peaks.append(_peak_mib() - before)
    trainer.accelerator.wait_for_everyone()
    record = {"setup_mib": setup, "train_mib": _peak_mib() - before, "seconds_per_step": statistics.median(times),
              "peak_after_step_mib": peaks}  # fmt: skip
    with open(f"{spec_path}.rank-{trainer.rank}.json", "w") as handle:
        json.dump(record, handle)


def make_inputs(root: str, sizes: dict) -> tuple[str, str, str]:
    import torch
    import transformers

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from trainkit import TEXT, byte_tokenizer

    import surgeon

    tokenizer = byte_tokenizer()
    config = transformers.LlamaConfig(**sizes, num_key_value_heads=sizes["num_attention_heads"],
                                      max_position_embeddings=256, tie_word_embeddings=False,
                                      bos_token_id=len(tokenizer) - 1, eos_token_id=len(tokenizer) - 1)  # fmt: skip
    torch.manual_seed(0)
    base = os.path.join(root, "base")
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    model, _ = surgeon.load_model(base)
    rules = [{"do": "lora", "select": {"role": ["attn.q", "attn.v"]}, "with": {"r": 8}}]
    surgeon.patch(model, {"surgeon": 1, "base": "frozen", "rules": rules})
    diff = os.path.join(root, "diff")
    surgeon.save_diff(model, diff, base_dir=base)
    data = os.path.join(root, "data.txt")
    with open(data, "w", encoding="utf-8") as handle:
        handle.write(TEXT * 100)
    return base, diff, data


def run_strategy(root: str, strategy: str, diff: str, data: str, steps: int) -> list[dict]:
    spec = os.path.join(root, f"spec-{strategy}.json")
    options = {"diff_dir": diff, "data": [data], "out_dir": os.path.join(root, f"out-{strategy}"),
               "strategy": strategy, "objective": "clm", "steps": steps, "seq_len": 64, "batch_size": 2,
               "dropout": False, "progress": False}  # fmt: skip
    with open(spec, "w") as handle:
        json.dump({"options": options}, handle)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.abspath(__file__), "--worker", spec]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{strategy} run failed:\n{done.stderr[-3000:]}")
    out = []
    for rank in range(2):
        with open(f"{spec}.rank-{rank}.json") as handle:
            out.append({"rank": rank, **json.load(handle)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~20 MB base (smoke test)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as root:
        base, diff, data = make_inputs(root, sizes)
        base_mib = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base) if f.endswith(".safetensors"))
        base_mib /= 2**20
        results = {s: run_strategy(root, s, diff, data, args.steps) for s in args.strategies}
    load = open("/proc/loadavg").read().split()[:3]
    summary = {"base_mib": base_mib, "sizes": sizes, "steps": args.steps, "loadavg": load, "ranks": results}
    both = len(results) == 2
    for key in ("setup_mib", "train_mib", "seconds_per_step") if both else ():
        ddp, fsdp = (max(r[key] for r in results[s]) for s in ("ddp", "fsdp"))
        summary[f"{key}_ratio"] = fsdp / ddp
    print(f"base: {base_mib:.0f} MiB fp32 safetensors; 2 processes (gloo); load average {' '.join(load)}")
    print(f"{'strategy':<8} {'rank':>4} {'setup peak MiB':>15} {'run peak MiB':>13} {'s/step':>8}")
    for strategy, ranks in results.items():
        for r in ranks:
            print(f"{strategy:<8} {r['rank']:>4} {r['setup_mib']:>15.0f} {r['train_mib']:>13.0f} "
                  f"{r['seconds_per_step']:>8.3f}")  # fmt: skip
    if both:
        print(f"fsdp/ddp (worst rank): setup {summary['setup_mib_ratio']:.2f}, run {summary['train_mib_ratio']:.2f}, "
              f"step time {summary['seconds_per_step_ratio']:.2f}")  # fmt: skip
    write_json(args.out, summary)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
