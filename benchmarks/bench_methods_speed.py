"""Training speed of every method's quickstart recipe through the one loop, side by side.

Each recipe trains ``--steps`` steps (same encoder, batch, data, fp32, one process) and its
``img_per_s`` windows after the first are collected; rounds interleave the methods so machine
noise hits all alike. Reported: the median images/s per method and its ratio to I-JEPA's.

    python benchmarks/bench_methods_speed.py --data runs/methods/data/train --teacher runs/methods/salt_stage_1_s0
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from tcjepa.config import load_config, project_root

METHODS = {
    "I-JEPA": "ijepa_quickstart", "TC-JEPA": "tcjepa_quickstart", "SALT stage 1": "salt_stage1_quickstart",
    "SALT stage 2": "salt_stage2_quickstart", "CLIP": "clip_quickstart", "SigLIP": "siglip_quickstart",
}


def main(argv: list[str] | None = None) -> int:
    from tcjepa.train import train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training SHARDS")
    p.add_argument("--teacher", required=True, help="a finished SALT stage-1 run (the stage-2 teacher)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    speeds: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for name, recipe in METHODS.items():
            out = Path(tempfile.mkdtemp(prefix="speed_"))
            try:
                cfg = load_config(project_root() / f"recipes/{recipe}.yaml",
                                  [f"data.train={args.data}", f"train.steps={args.steps}", "checkpoint.every=0",
                                   "train.log_every=10", f"teacher.checkpoint={args.teacher}"])
                train(cfg, out / "run", progress=False)
                recs = [json.loads(l) for l in (out / "run" / "metrics.jsonl").read_text().splitlines() if l]
                speeds[name] += [r["img_per_s"] for r in recs[1:]]  # the first window holds start-up
            finally:
                shutil.rmtree(out, ignore_errors=True)
            print(f"{name}: {statistics.median(speeds[name]):.1f} img/s so far", flush=True)
    ref = statistics.median(speeds["I-JEPA"])
    print("\n| method | img/s (median of windows) | vs I-JEPA |\n|---|---:|---:|")
    for name, v in speeds.items():
        print(f"| {name} | {statistics.median(v):.1f} | {statistics.median(v) / ref:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "rounds": args.rounds, "img_per_s": speeds}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
