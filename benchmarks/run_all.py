"""Regenerate the performance figures of ``benchmarks/RESULTS.md`` in one command.

Runs, one after another (never two at once: the figures are ratios measured side by side, and
a second job would skew them), each writing its JSON into ``--out``:

1. ``bench_masks.py``: our mask sampler against the official ``MaskCollator`` (masks/s at batch
   256, block and context statistics with KS distances);
2. ``bench_train_step.py``: one I-JEPA training step, ours (``pad``, ``official`` and ``pad`` with
   activation checkpointing, and both policies in bf16) against the official code (fp32): images/s,
   model FLOP utilisation against the matmul peak measured in the same run, activation memory per
   image; ViT-S/16 and ViT-B/16;
3. ``bench_loader.py``: loader throughput against a plain PIL loop and open_clip_train;
4. ``bench_gpu.py`` when a CUDA device is present: bf16 images/s and MFU, flash SDPA, compile;
5. ``bench_loop.py``: the real training loop's images/s, eager and with ``train.compile``, and on
   the CPU the quickstart recipe in fp32 and bf16;
6. ``bench_conditioner.py``: the TC-JEPA conditioners' step time against I-JEPA's;
7. ``bench_sharing.py``: two trainings (and a training beside ``eval probe``) sharing the machine,
   each one's share of its solo images/s, before and after the toolkit's OpenMP wait policy.

    python benchmarks/run_all.py --official /path/to/ijepa            # ~1 h on 2 CPU cores
    python benchmarks/run_all.py --official /path/to/ijepa --quick    # smoke run, ~3 min

The official checkout is imported at run time from the path given; nothing of it is copied.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench_loop.py at the I-JEPA quickstart's size (configs/model/vit_quickstart.yaml, batch 64)
QUICKSTART_LOOP = ["--encoder", "vit_tiny_8", "--image-size", "64", "--batch-size", "64", "--pred-depth", "4",
                   "--pred-width", "96", "--set", "model.depth=6", "--warmup", "5", "--steps", "30"]


def jobs(args: argparse.Namespace, out: Path) -> list[tuple[str, list[str]]]:
    off = ["--official", str(args.official)]
    if args.quick:
        return [
            ("masks", ["bench_masks.py", *off, "--quick", "--json", str(out / "masks.json")]),
            ("train_step", ["bench_train_step.py", *off, "--models", "vit_tiny_16", "--batch-size", "4", "--steps", "1",
                            "--rounds", "1", "--warmup", "1", "--checkpointing", "--bf16", "--json", str(out / "train_step.json")]),
            ("loader", ["bench_loader.py", "--quick", "--json", str(out / "loader.json")]),
            ("loop", ["bench_loop.py", "--quick", "--json", str(out / "loop.json")]),
            ("loop_precision", ["bench_loop.py", "--quick", "--variants", "fp32,bf16", "--json",
                                str(out / "loop_precision.json")]),
            ("conditioner", ["bench_conditioner.py", "--quick", "--json", str(out / "conditioner.json")]),
            ("sharing", ["bench_sharing.py", "--steps", "20", "--samples", "200", "--out", str(out / "sharing")]),
        ]
    out_jobs = [
        ("masks", ["bench_masks.py", *off, "--json", str(out / "masks.json")]),
        ("train_step", ["bench_train_step.py", *off, "--models", "vit_small_16,vit_base_16", "--batch-size", "16",
                        "--steps", "3", "--rounds", "3", "--checkpointing", "--bf16", "--json", str(out / "train_step.json")]),
        ("loader", ["bench_loader.py", "--json", str(out / "loader.json")]),
        ("conditioner", ["bench_conditioner.py", "--preset", "vits16", "--steps", "4",
                         "--json", str(out / "conditioner.json")]),
        ("sharing", ["bench_sharing.py", "--steps", "60", "--probe", "--out", str(out / "sharing"),
                     "--arm", "before: libgomp default spin=GOMP_SPINCOUNT=300000", "--arm", "toolkit default="]),
    ]
    try:
        import torch

        if torch.cuda.is_available():
            out_jobs.append(("gpu", ["bench_gpu.py", *off, "--json", str(out / "gpu.json")]))
            out_jobs.append(("loop", ["bench_loop.py", "--encoder", "vit_base_16", "--batch-size", "256",
                                      "--precision", "bf16", "--json", str(out / "loop.json")]))
        else:
            out_jobs.append(("loop", ["bench_loop.py", "--json", str(out / "loop.json")]))
            out_jobs.append(("loop_precision", ["bench_loop.py", *QUICKSTART_LOOP, "--variants", "fp32,bf16",
                                                "--rounds", "2", "--json", str(out / "loop_precision.json")]))
    except ImportError:
        pass
    return out_jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, required=True, help="checkout of facebookresearch/ijepa")
    p.add_argument("--out", type=Path, default=None, help="folder for the JSON results (default: benchmarks/results/DATE)")
    p.add_argument("--quick", action="store_true", help="smoke run of every benchmark")
    p.add_argument("--only", default="", help="comma-separated subset: masks,train_step,loader,gpu,loop,conditioner,sharing")
    args = p.parse_args(argv)
    if not (args.official / "src" / "masks" / "multiblock.py").is_file():
        print(f"error: --official {args.official}: not a facebookresearch/ijepa checkout (no src/masks/multiblock.py)",
              file=sys.stderr)
        return 2
    out = args.out or HERE / "results" / time.strftime("%Y-%m-%d") / ("quick" if args.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    only = {s for s in args.only.split(",") if s}
    failed = []
    for name, cmd in jobs(args, out):
        if only and name not in only:
            continue
        print(f"== {name}: python benchmarks/{' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, str(HERE / cmd[0]), *cmd[1:]])
        print(f"== {name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        if rc:
            failed.append(name)
    print(f"results in {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
