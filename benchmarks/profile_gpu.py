"""Why is our eager I-JEPA step slower than the official one on a GPU? Profile and try the obvious fixes.

Uses ``bench_gpu.py``'s runners (same step, masks, batch 256, bf16) at one encoder and prints:
1. step time of: official; ours (mask.policy=official) as is; with SDPA forced to flash; with flash
   and a fused AdamW -- each the median of ``--steps`` steps after warm-up, in one run;
2. the host syncs one step of ours makes (``torch.cuda.set_sync_debug_mode``), by source line;
3. a ``torch.profiler`` table (top kernels by CUDA time) for official and ours.

    python3 benchmarks/profile_gpu.py --official official_ijepa --json out.json
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import bench_gpu  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(runner, images, batches) -> float:
    steps, _, _ = bench_gpu.time_steps(runner, images, batches)
    return statistics.median(steps)


def fused_adamw(runner) -> None:
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in runner.opt.param_groups]
    g0 = runner.opt.param_groups[0]
    runner.opt = torch.optim.AdamW(groups, lr=g0["lr"], betas=g0["betas"], eps=g0["eps"], fused=True)


def host_syncs(runner, images, masks) -> list[tuple[str, int]]:
    """Source lines (outside torch) of every synchronising CUDA call in one step."""
    where: collections.Counter[str] = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runner.step(images, masks)
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        where[f"{Path(w.filename).name}:{w.lineno}"] += 1
    return where.most_common(20)


def profile_table(runner, images, batches, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for masks in batches:
            runner.step(images, masks)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", type=Path, required=True)
    p.add_argument("--encoder", default="vit_base_16")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--also", default="", help="more bench_gpu.py variants to time and profile, e.g. ours/pad")
    args = p.parse_args(argv)
    bargs = bench_gpu.parse_args(["--official", str(args.official), "--batch-size", str(args.batch_size)])
    device = torch.device("cuda")
    mods = bench_gpu.import_official(args.official)
    images = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    out: dict = {"encoder": args.encoder, "batch": args.batch_size, "device": torch.cuda.get_device_name()}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    runners = {}
    extra = [v for v in args.also.split(",") if v]
    for name in ("official", "ours/official", *extra):
        r = bench_gpu.make_runner(name, args.encoder, bargs, mods, device)
        warm, _, _ = r.prepare(args.warmup)
        batches, _, _ = r.prepare(args.steps)
        for m in warm:
            r.step(images, m)
        runners[name] = (r, batches)
    times: dict[str, float] = {}
    r, batches = runners["official"]
    times["official"] = timed(r, images, batches)
    r, batches = runners["ours/official"]
    times["ours (default SDPA)"] = timed(r, images, batches)
    for name in extra:
        times[name] = timed(runners[name][0], images, runners[name][1])
    for label, backend in (("ours, SDPA flash", SDPBackend.FLASH_ATTENTION),
                           ("ours, SDPA efficient", SDPBackend.EFFICIENT_ATTENTION),
                           ("ours, SDPA math", SDPBackend.MATH)):
        try:
            with sdpa_kernel([backend]):
                r.step(images, batches[0])
                times[label] = timed(r, images, batches)
        except Exception as e:  # noqa: BLE001 - record and go on
            times[label] = float("nan")
            log(f"{label}: failed: {e!r}"[:300])
    try:
        fused_adamw(r)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            r.step(images, batches[0])
            times["ours, SDPA flash + fused AdamW"] = timed(r, images, batches)
    except Exception as e:  # noqa: BLE001
        log(f"fused AdamW: failed: {e!r}"[:300])
    for k, v in times.items():
        log(f"{k:<34} {v * 1e3:7.1f} ms/step  {args.batch_size / v:6.0f} img/s  x{times['official'] / v:.2f} official img/s")
    out["step_s"] = times

    try:
        out["syncs_ours"] = host_syncs(r, images, batches[0])
        out["syncs_official"] = host_syncs(runners["official"][0], images, runners["official"][1][0])
        log(f"host syncs in one step, ours: {out['syncs_ours']}")
        log(f"host syncs in one step, official: {out['syncs_official']}")
    except Exception as e:  # noqa: BLE001
        log(f"sync check failed: {e!r}")

    for name, (runner, batches) in runners.items():
        table = profile_table(runner, images, batches[:3], args.rows)
        out[f"profile_{name}"] = table
        print(f"\n== {name}: 3 steps, top {args.rows} by CUDA time\n{table}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
