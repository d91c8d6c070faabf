"""Mask sampler speed and statistics: ours (``tcjepa.masks.sample_masks``, policies ``pad`` and
``official``) against the official facebookresearch/ijepa ``MaskCollator``, at the I-JEPA ViT
settings (224 px, patch 16: a 14 x 14 grid; 4 targets of scale 0.15-0.2, aspect 0.75-1.5; one
context of scale 0.85-1.0; min_keep 10).

Speed: masks/s (samples per second) for whole batches, interleaved rounds, median over rounds.
The official collator also collates the batch it is handed; it gets a list of 0-d tensors so
that this costs nothing beside the masks.

Statistics, over many batches: each target block's height, width, area, top row and left column
and each sample's context size (kept patches), with means, quantiles and the largest distance
between the empirical CDFs (Kolmogorov-Smirnov statistic) against the official collator. Ours
with ``policy: official`` should match it (apart from the documented redraw of too-small
contexts); ``pad`` differs on purpose: per-block sizes, corners that reach the last row and
column, and no truncation of the context.

    python benchmarks/bench_masks.py --official /path/to/ijepa --json masks.json
    python benchmarks/bench_masks.py --quick --official /path/to/ijepa
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

GRID = (14, 14)
SETTINGS = dict(num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0),
                context_aspect=(1.0, 1.0), min_context=10)


def ours_sampler(policy: str, batch: int, seed: int) -> Callable[[], Any]:
    from tcjepa.masks import sample_masks

    g = torch.Generator().manual_seed(seed)
    return lambda: sample_masks(batch, GRID, g, policy=policy, **SETTINGS)


def official_sampler(repo: Path, batch: int, seed: int) -> Callable[[], Any]:
    sys.path.insert(0, str(repo))
    from src.masks.multiblock import MaskCollator  # noqa: E402 - the user's checkout, imported at run time

    torch.manual_seed(seed)  # the official collator draws corners from the global RNG
    collator = MaskCollator(input_size=(224, 224), patch_size=16, enc_mask_scale=SETTINGS["context_scale"],
                            pred_mask_scale=SETTINGS["target_scale"], aspect_ratio=SETTINGS["target_aspect"],
                            nenc=1, npred=4, min_keep=SETTINGS["min_context"], allow_overlap=False)
    items = [torch.zeros(())] * batch
    return lambda: collator(items)


def blocks_from_indices(idx: torch.Tensor, valid: torch.Tensor) -> dict[str, list[float]]:
    """Per block (rows of ``idx`` [N, K] with ``valid``): height, width, area, top, left."""
    W = GRID[1]
    out: dict[str, list[float]] = {k: [] for k in ("height", "width", "area", "top", "left")}
    rows, cols = idx // W, idx % W
    big = torch.iinfo(idx.dtype).max
    top = torch.where(valid, rows, big).min(1).values
    left = torch.where(valid, cols, big).min(1).values
    bottom = torch.where(valid, rows, -1).max(1).values
    right = torch.where(valid, cols, -1).max(1).values
    out["top"] = top.tolist()
    out["left"] = left.tolist()
    out["height"] = (bottom - top + 1).tolist()
    out["width"] = (right - left + 1).tolist()
    out["area"] = valid.sum(1).tolist()
    return out


def stats_ours(masks: Any) -> dict[str, list[float]]:
    B, T, Nt = masks.target_idx.shape
    s = blocks_from_indices(masks.target_idx.reshape(B * T, Nt), masks.target_valid.reshape(B * T, Nt))
    s["context"] = masks.context_valid.sum(1).tolist()
    return s


def stats_official(out: Any) -> dict[str, list[float]]:
    _, enc, pred = out
    idx = torch.cat(pred, 0)  # [4 * B, K]
    s = blocks_from_indices(idx, torch.ones_like(idx, dtype=torch.bool))
    s["context"] = [enc[0].shape[1]] * enc[0].shape[0]  # truncated to the batch minimum
    return s


def ks(a: list[float], b: list[float]) -> float:
    """Largest distance between the two empirical CDFs (discrete values: evaluated at every value)."""
    ta, tb = torch.tensor(a, dtype=torch.float64).sort().values, torch.tensor(b, dtype=torch.float64).sort().values
    points = torch.cat([ta, tb]).unique()
    fa = torch.searchsorted(ta, points, right=True).double() / len(ta)
    fb = torch.searchsorted(tb, points, right=True).double() / len(tb)
    return float((fa - fb).abs().max())


def summary(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"mean": float(t.mean()), "p05": q[0], "p50": q[1], "p95": q[2], "max": float(t.max())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, required=True, help="checkout of facebookresearch/ijepa")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=4, help="batches per variant per round (speed)")
    p.add_argument("--stat-batches", type=int, default=40, help="batches per sampler for the statistics")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.batches, args.stat_batches = 2, 1, 4
    torch.set_num_threads(args.threads)

    samplers = {
        "ours/pad": ours_sampler("pad", args.batch_size, 0),
        "ours/official": ours_sampler("official", args.batch_size, 0),
        "official": official_sampler(args.official, args.batch_size, 0),
    }
    times: dict[str, list[float]] = {k: [] for k in samplers}
    for _ in range(args.rounds):  # interleaved: the machine's noise hits every variant alike
        for name, draw in samplers.items():
            draw()  # warm
            t0 = time.perf_counter()
            for _ in range(args.batches):
                draw()
            times[name].append(args.batches * args.batch_size / (time.perf_counter() - t0))
    speed = {k: statistics.median(v) for k, v in times.items()}

    stats: dict[str, dict[str, list[float]]] = {}
    for name, draw in samplers.items():
        acc: dict[str, list[float]] = {}
        for _ in range(args.stat_batches):
            s = stats_official(draw()) if name == "official" else stats_ours(draw())
            for k, v in s.items():
                acc.setdefault(k, []).extend(v)
        stats[name] = acc

    keys = ["height", "width", "area", "top", "left", "context"]
    print(f"masks/s at batch {args.batch_size} ({args.threads} thread(s)), median of {args.rounds} rounds:")
    for name, v in speed.items():
        print(f"  {name:14s} {v:10.0f}   {v / speed['official']:.1f}x official")
    print("\nstatistics (mean [p05, p50, p95]) and KS distance to the official collator:")
    for k in keys:
        cells = []
        for name in samplers:
            sm = summary(stats[name][k])
            d = "" if name == "official" else f" KS {ks(stats[name][k], stats['official'][k]):.3f}"
            cells.append(f"{name}: {sm['mean']:.2f} [{sm['p05']:.0f}, {sm['p50']:.0f}, {sm['p95']:.0f}]{d}")
        print(f"  {k:8s} " + " | ".join(cells))
    if args.json:
        out = {"batch_size": args.batch_size, "threads": args.threads, "masks_per_s": speed, "rounds": times,
               "stats": {n: {k: summary(v) for k, v in s.items()} for n, s in stats.items()},
               "ks_vs_official": {n: {k: ks(stats[n][k], stats["official"][k]) for k in keys}
                                  for n in samplers if n != "official"},
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
