"""How much of an encoder's patch features is the patch's position, and how much the image? For a
finished run's encoder and the same encoder at its initialisation (the seed's first draw, as
``small_budget.py`` probes it), on the given shards (RESULTS.md, "Small budgets"):

- ``pos_share``: the variance of the per-position mean feature over all the variance (1: every
  image gives the same feature at a position; 0: position says nothing);
- ``flat_patches``: the share of patches whose pixels are flat (background: every channel's
  standard deviation under 0.02 of the range);
- ``flat_var`` / ``object_var``: the variance across images at a fixed position, on flat and on
  the other patches, relative to the total (what the features say about each image there).

    python benchmarks/patch_stats.py --data fmnist/test runs/sb29/fmnist_ijepa/ijepa_quickstart_300_s0 [RUN ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLAT_STD = 0.02  # of the pixel range: a patch this flat is background


@torch.no_grad()
def patch_stats(encoder: torch.nn.Module, shards: str, image_size: int, patch: int, batch_size: int = 256
                ) -> dict[str, float]:
    from data_pipelines.loader import SkipTracker, normalize
    from tcjepa.eval.common import iter_eval_batches

    feats, flat = [], []
    for batch in iter_eval_batches(shards, image_size, batch_size, "--data", SkipTracker()):
        x = batch["images"]
        feats.append(encoder(normalize(x)).float())
        tiles = (x.float() / 255).unfold(2, patch, patch).unfold(3, patch, patch)  # [B, C, g, g, p, p]
        flat.append(tiles.flatten(4).std(-1).amax(1).flatten(1) < FLAT_STD)  # [B, P]
    h, flat = torch.cat(feats), torch.cat(flat)
    h = h - h.mean((0, 1))
    total = h.pow(2).sum(-1).mean()
    pos = h.mean(0, keepdim=True)
    within = (h - pos).pow(2).sum(-1)  # [N, P]
    ratio = lambda v: round(float(v / total), 3)  # noqa: E731
    return {"pos_share": ratio(pos.pow(2).sum(-1).mean()), "flat_patches": round(float(flat.float().mean()), 3),
            "flat_var": ratio(within[flat].mean()) if flat.any() else float("nan"),
            "object_var": ratio(within[~flat].mean()) if (~flat).any() else float("nan")}


def init_and_trained(run: Path) -> tuple[Any, dict[str, torch.nn.Module]]:
    """A finished run's config, and its evaluated encoder beside the same encoder at initialisation."""
    from tcjepa.checkpoint import initial_encoder, load_encoder, load_run_config

    cfg = load_run_config(run)
    return cfg, {"init": initial_encoder(cfg).eval(), "trained": load_encoder(run, cfg.probe.encoder)}


def run_stats(run: Path, data: str) -> dict:
    cfg, encoders = init_and_trained(run)
    return {"run": str(run), "data": data,
            **{name: patch_stats(enc, data, cfg.model.image_size, enc.patch_size) for name, enc in encoders.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data", required=True, help="shards to read (e.g. the probe's val split)")
    args = p.parse_args(argv)
    for run in args.runs:
        print(json.dumps(run_stats(run, args.data)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
