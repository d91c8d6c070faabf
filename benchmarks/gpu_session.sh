#!/usr/bin/env bash
# Every GPU check of the performance work in one call on a lent GPU machine, so that no GPU time
# goes to setting up or debugging: the real training loop (DeepSpeed, loader, EMA) eager and
# compiled, the bare step beside the official code with MFU, and the profile of what remains.
#
#     bash benchmarks/gpu_wheels.sh                    # here, once: .whl/ (DeepSpeed and friends)
#     bash benchmarks/gpu_session.sh                   # there: from the repo root, carry .whl and official_ijepa
#     bash benchmarks/gpu_session.sh --dry-run         # here, on the CPU: the same steps at smoke sizes
#
# The official I-JEPA checkout is read from $OFFICIAL (default official_ijepa, which git ignores).
# Results and one log per step go to $OUT (the device tool's output folder; default
# runs/gpu_session). Each step has its own time limit and a failed step does not stop the next;
# steps.tsv lists each step's exit status and seconds. The limits sum to 540 s, inside the
# device tool's 600 s a call.
set -uo pipefail
dry=0
[ "${1:-}" = "--dry-run" ] && dry=1
OUT=${OUT:-runs/gpu_session}
OFFICIAL=${OFFICIAL:-official_ijepa}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c "import deepspeed, webdataset, open_clip" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "error: deepspeed / webdataset / open_clip missing and no .whl/ to install them from (bash benchmarks/gpu_wheels.sh)" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [ ! -f "$OFFICIAL/src/models/vision_transformer.py" ]; then
    echo "error: no facebookresearch/ijepa checkout at $OFFICIAL (set OFFICIAL=PATH)" >&2
    exit 2
fi

printf 'step\texit\tseconds\n' > "$OUT/steps.tsv"
step() {  # step NAME LIMIT_S COMMAND...: run it, log to $OUT/NAME.log, record status and time
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
    tail -n 12 "$OUT/$name.log"
}

step env 30 python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'deepspeed', deepspeed.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
if [ "$dry" = 1 ]; then  # smoke sizes on the CPU: the same scripts, arguments and outputs
    step loop 240 python3 benchmarks/bench_loop.py --quick --variants eager,compiled --json "$OUT/loop.json"
    step gpu 150 python3 benchmarks/bench_gpu.py --official "$OFFICIAL" --device cpu --quick --json "$OUT/gpu.json"
    echo "== profile: skipped in a dry run (CUDA profiler and sync checks)"
else
    # the loop as users run it: ViT-B/16, batch 256, bf16, pad (varlen eager; whole rows compiled)
    step loop 200 python3 benchmarks/bench_loop.py --encoder vit_base_16 --batch-size 256 --precision bf16 \
        --variants eager,compiled --warmup 5 --steps 15 --workers 8 --json "$OUT/loop.json"
    # the bare step beside the official code (fused AdamW since the last GPU figures)
    step gpu 240 python3 benchmarks/bench_gpu.py --official "$OFFICIAL" --models vit_base_16 \
        --variants official,ours/official,ours/pad,ours/pad+compile --time-budget 200 --compile-reserve 80 \
        --json "$OUT/gpu.json"
    step profile 100 python3 benchmarks/profile_gpu.py --official "$OFFICIAL" --also ours/pad --steps 10 \
        --json "$OUT/profile.json"
fi
cat "$OUT/steps.tsv"
