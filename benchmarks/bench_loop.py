"""Images/s of the real training loop (``tcjepa.train``: loader workers, DeepSpeed engine, EMA,
logging), eager against ``train.compile: true`` or fp32 against bf16 (``--variants``), on whatever
device ``train`` picks (CUDA when present). ``bench_train_step.py`` / ``bench_gpu.py`` time a bare step beside the official code;
this is what a user's run gets.

Each variant trains ``--warmup + --steps`` steps with ``train.log_every=1``; the ``img_per_s`` of
the steps after the warm-up (which holds start-up and compilation) are collected. ``--rounds``
interleave the variants so machine noise hits both alike. Data: synthetic captioned scenes at the
encoder's image size, written once to a temporary directory (or ``--data SHARDS``).

    python benchmarks/bench_loop.py --encoder vit_base_16 --batch-size 256 --precision bf16 --json loop.json  # GPU
    python benchmarks/bench_loop.py --variants fp32,bf16 --rounds 2                                            # CPU precision
    python benchmarks/bench_loop.py --quick                                                                  # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tcjepa.config import load_config, project_root

# each variant's overrides, applied after --precision
VARIANTS = {"eager": ["train.compile=false"], "compiled": ["train.compile=true"],
            "fp32": ["train.precision=fp32"], "bf16": ["train.precision=bf16"]}


def run_variant(recipe: Path, data: str, out: Path, overrides: list[str], args: argparse.Namespace) -> list[float]:
    """The per-step images/s after the warm-up, for one training run."""
    from tcjepa.train import train

    cfg = load_config(recipe, [
        f"data.train={data}", f"model.encoder={args.encoder}", "model.depth=null", f"model.image_size={args.image_size}",
        f"model.predictor_depth={args.pred_depth}", f"model.predictor_width={args.pred_width}",
        f"train.batch_size={args.batch_size}", f"train.steps={args.warmup + args.steps}", "train.log_every=1",
        f"train.precision={args.precision}", f"mask.policy={args.policy}",
        "checkpoint.every=0", f"data.workers={args.workers}", *overrides, *args.set,
    ])
    train(cfg, out, progress=False)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return [r["img_per_s"] for r in recs[args.warmup:]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=project_root() / "recipes/ijepa_quickstart.yaml")
    p.add_argument("--encoder", default="vit_small_16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pred-depth", type=int, default=6, help="as bench_train_step.py and bench_gpu.py")
    p.add_argument("--pred-width", type=int, default=384)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--policy", choices=("pad", "official"), default="pad", help="mask.policy")
    p.add_argument("--warmup", type=int, default=3, help="steps per run left out (start-up, compilation)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="data.workers")
    p.add_argument("--data", help="training SHARDS (default: synthetic scenes written here)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--quick", action="store_true", help="vit_micro_8 at 64 px, batch 8, predictor 2 x 48, 2+3 steps: a smoke run")
    p.add_argument("--variants", default="eager,compiled",
                   help=f"comma-separated, the first is the reference: {', '.join(VARIANTS)}")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        p.error(f"--variants: unknown {unknown}, expected some of {', '.join(VARIANTS)}")
    if args.quick:
        args.encoder, args.image_size, args.batch_size, args.warmup, args.steps = "vit_micro_8", 64, 8, 2, 3
        args.pred_depth, args.pred_width = 2, 48

    tmp = Path(tempfile.mkdtemp(prefix="bench_loop_"))
    try:
        data = args.data
        if data is None:
            from data_pipelines.synthetic import write_synthetic_shards

            samples = max(args.batch_size * (args.warmup + args.steps + 2), 200)
            write_synthetic_shards(tmp / "data", samples=samples, image_size=args.image_size)
            data = str(tmp / "data")
        speeds: dict[str, list[float]] = {v: [] for v in variants}
        wall: dict[str, float] = {v: 0.0 for v in variants}
        for r in range(args.rounds):
            for name in variants:
                t = time.perf_counter()
                speeds[name] += run_variant(args.recipe, data, tmp / f"{name}_{r}", VARIANTS[name], args)
                wall[name] += time.perf_counter() - t
                print(f"round {r}: {name} {statistics.median(speeds[name]):.2f} img/s so far "
                      f"({wall[name]:.0f} s of runs, start-up and compilation included)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'unknown'})"
    ref = statistics.median(speeds[variants[0]])
    print(f"\n{device}, torch {torch.__version__}, {args.encoder} at {args.image_size} px, batch {args.batch_size}, "
          f"predictor {args.pred_depth} x {args.pred_width}, {args.precision}, mask.policy={args.policy}, "
          f"{args.rounds} round(s) of {args.warmup}+{args.steps} steps")
    print(f"\n| variant | img/s (median of steps) | vs {variants[0]} | wall s (all runs) |\n|---|---:|---:|---:|")
    for name, v in speeds.items():
        print(f"| {name} | {statistics.median(v):.2f} | {statistics.median(v) / ref:.2f}x | {wall[name]:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "torch": torch.__version__, "settings": vars(args) | {
            "recipe": str(args.recipe), "json": str(args.json)}, "img_per_s": speeds, "wall_s": wall}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
