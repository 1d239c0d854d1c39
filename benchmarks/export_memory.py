"""Peak memory of a merged export: `surgeon export` (streamed) vs PEFT merge_and_unload + save.

    flock /tmp/surgeon-cpu.lock python benchmarks/export_memory.py [--workdir /tmp/surgeon-export-bench]

Builds a sharded Llama-style checkpoint of ~1.3 GB (fp32, random init, from a config), a LoRA
diff on it (r=16 on q, k, v, o, gate, up, down, random B so the merge is not a no-op), the same
adapter as a PEFT directory, then runs each exporter in its own process and reads that child's
peak RSS from `wait4`. Target (issue 3 §5): surgeon's peak RSS ≤ 2 × the largest tensor + 200 MB.
A second surgeon case adds LoRA on `lm_head` (as large as the largest tensor), so a tensor of
the largest size goes through the fp32 merge. "fixed cost" is a process that only imports the
libraries, builds the model on the meta device and loads the LoRA tensors: what surgeon export
pays before streaming a single byte.
Writes benchmarks/results/export_memory.json; removes the big files afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "export_memory.json")
MB = 2**20

CONFIG = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
    num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
)  # fmt: skip
SHARD = "300MB"
ROLES = ["attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"]


def _recipe(with_head: bool) -> dict:
    rules = [{"do": "lora", "select": {"role": ROLES}, "with": {"r": 16, "alpha": 32, "init": "random"}}]
    if with_head:
        rules.append({"do": "lora", "select": {"path": "lm_head"}, "with": {"r": 16, "alpha": 32, "init": "random"}})
    return {"surgeon": 1, "rules": rules}


# ---- children: each runs in its own process --------------------------------------------------
def child_build(work: str) -> None:
    import torch
    import transformers

    import surgeon
    from surgeon.peft_io import export_peft

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**CONFIG)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(os.path.join(work, "base"), max_shard_size=SHARD)
    del model
    for case, with_head in (("lora", False), ("lora_head", True)):
        model, _ = surgeon.load_model(os.path.join(work, "base"))
        surgeon.patch(model, _recipe(with_head))
        surgeon.save_diff(model, os.path.join(work, f"diff_{case}"), base_dir=os.path.join(work, "base"))
        del model
    export_peft(os.path.join(work, "diff_lora"), os.path.join(work, "peft_lora"))


def child_idle(work: str) -> None:
    """The fixed cost: imports, the model built on the meta device, the recipe applied, LoRA loaded."""
    from surgeon.export import open_meta_diff

    open_meta_diff(os.path.join(work, "diff_lora"))


def child_surgeon(work: str, case: str) -> None:
    from surgeon.export import export_merged

    export_merged(os.path.join(work, f"diff_{case}"), os.path.join(work, f"out_surgeon_{case}"), progress=False)


def child_peft(work: str) -> None:
    import transformers
    from peft import PeftModel

    base = transformers.LlamaForCausalLM.from_pretrained(os.path.join(work, "base"))
    model = PeftModel.from_pretrained(base, os.path.join(work, "peft_lora"))
    merged = model.merge_and_unload()
    merged.save_pretrained(os.path.join(work, "out_peft"), max_shard_size=SHARD)


# ---- parent ------------------------------------------------------------------------------
def run_child(*args: str) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one child process running this script with `args`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {args} failed with status {status}")
    return usage.ru_maxrss * 1024 / MB, wall  # ru_maxrss is in KiB on Linux


def largest_tensor_mb(base: str) -> tuple[str, float]:
    from surgeon.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(base)
    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    name, (dtype, shape) = max(info.tensors.items(), key=lambda kv: _numel(kv[1][1]) * sizes.get(kv[1][0], 4))
    return name, _numel(shape) * sizes.get(dtype, 4) / MB


def _numel(shape) -> int:
    out = 1
    for size in shape:
        out *= size
    return out


def dir_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files) / MB


def compare_outputs(a: str, b: str) -> float:
    """Max |a - b| over all tensors of two exports, one tensor at a time."""
    from surgeon.checkpoint import inspect_checkpoint
    from surgeon.export import ShardReader

    ia, ib = inspect_checkpoint(a), inspect_checkpoint(b)
    if set(ia.tensors) != set(ib.tensors):
        raise SystemExit(f"exports differ in tensor names: {sorted(set(ia.tensors) ^ set(ib.tensors))[:3]}")
    worst = 0.0
    for name in ia.tensors:
        ra = ShardReader(os.path.join(a, ia.weight_map[name]))
        rb = ShardReader(os.path.join(b, ib.weight_map[name]))
        ta, tb = ra.read(name), rb.read(name)
        ra.close()
        rb.close()
        worst = max(worst, float((ta.double() - tb.double()).abs().max()))
        del ta, tb
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/surgeon-export-bench")
    parser.add_argument("--keep", action="store_true", help="keep the big files")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        {"build": child_build, "idle": child_idle, "surgeon": child_surgeon, "peft": child_peft}[kind](*rest)
        return

    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        build_rss, build_s = run_child("build", work)
        base = os.path.join(work, "base")
        shards = sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))
        checkpoint_mb = dir_mb(base)
        name, largest = largest_tensor_mb(base)
        target = 2 * largest + 200
        rows = []
        idle_rss, idle_s = run_child("idle", work)
        rows.append(("fixed cost (imports + meta model + LoRA)", idle_rss, idle_s, None))
        for case, label in (("lora", "surgeon export"), ("lora_head", "surgeon export (+LoRA on lm_head)")):
            rss, wall = run_child("surgeon", work, case)
            rows.append((label, rss, wall, rss <= target))
        rss, wall = run_child("peft", work)
        rows.append(("PEFT merge_and_unload + save_pretrained", rss, wall, rss <= target))
        max_diff = compare_outputs(os.path.join(work, "out_surgeon_lora"), os.path.join(work, "out_peft"))
        same_layout = sorted(  # the marker that lets a later --force replace the export is surgeon's own
            f for f in os.listdir(os.path.join(work, "out_surgeon_lora")) if f != ".surgeon-output.json"
        ) == sorted(os.listdir(base))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"base: {checkpoint_mb:.0f} MB, Llama {CONFIG['num_hidden_layers']} layers, hidden {CONFIG['hidden_size']}, fp32, "
          f"{len(shards)} shards of ≤ {SHARD}; largest tensor {name} = {largest:.0f} MB; "
          f"target ≤ 2×{largest:.0f} + 200 = {target:.0f} MB")
    print(f"{'exporter':42s} {'peak RSS (MB)':>14s} {'wall (s)':>9s}  target")
    for label, rss, wall, ok in rows:
        mark = "-" if ok is None else ("met" if ok else "MISSED")
        print(f"{label:42s} {rss:14.0f} {wall:9.1f}  {mark}")
    print(f"max |surgeon − PEFT| over all merged tensors: {max_diff:.2e}; "
          f"surgeon output keeps the base's files: {same_layout}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as handle:
        json.dump(
            {
                "config": CONFIG, "shard": SHARD, "shards": len(shards), "checkpoint_mb": round(checkpoint_mb), "largest_tensor": name,
                "largest_tensor_mb": round(largest, 1), "target_mb": round(target, 1),
                "build_rss_mb": round(build_rss), "build_s": round(build_s, 1),
                "rows": [{"exporter": l, "peak_rss_mb": round(r), "wall_s": round(w, 1), "target_met": ok}
                         for l, r, w, ok in rows],
                "max_abs_diff_surgeon_vs_peft": max_diff, "same_files_as_base": same_layout,
                "python": sys.version.split()[0], "ru_maxrss_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            },
            handle, indent=1,
        )  # fmt: skip
        handle.write("\n")


if __name__ == "__main__":
    main()
