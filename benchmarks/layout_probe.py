"""Does an encoder's probe read where things are in the image, or only what is there? A finished
run's encoder and the same encoder at its initialisation (the seed's first draw, as
``small_budget.py`` probes it) are probed with the run's probe settings three ways on the same
shards (RESULTS.md, "Small budgets"):

- ``as is``;
- ``no position``: the position embedding zeroed (the patches' content alone, mixed by attention);
- ``shuffled patches``: every image's patches put in a random order of its own before encoding (a
  bag of patches: what a mean-pooled probe can still read when the layout is gone).

The drop from ``as is`` to ``shuffled patches`` is how much the probe relies on the layout; the
``shuffled patches`` figure itself, how well the patches' content alone tells the labels apart.

    python benchmarks/layout_probe.py --data fmnist/train --val-data fmnist/test RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def shuffle_patches(images: torch.Tensor, patch: int, gen: torch.Generator) -> torch.Tensor:
    """``images`` [B, C, H, W] with each image's ``patch`` x ``patch`` tiles in a random order of its own."""
    B, C, H, W = images.shape
    gh, gw = H // patch, W // patch
    tiles = images.reshape(B, C, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C, patch, patch)
    order = torch.argsort(torch.rand(B, gh * gw, generator=gen), dim=1)
    tiles = torch.gather(tiles, 1, order[:, :, None, None, None].expand_as(tiles))
    return tiles.reshape(B, gh, gw, C, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


class ShuffledPatches(nn.Module):
    """``encoder`` reading images whose patches are shuffled per image (a fixed seed: repeatable)."""

    def __init__(self, encoder: nn.Module, seed: int = 0):
        super().__init__()
        self.encoder, self.gen = encoder, torch.Generator().manual_seed(seed)
        self.embed_dim, self.patch_size = encoder.embed_dim, encoder.patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(shuffle_patches(images, self.patch_size, self.gen))


def without_position(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` whose (fixed sin-cos) position embedding is zero."""
    encoder = copy.deepcopy(encoder)
    encoder.pos_embed.zero_()
    return encoder


def layout_probe(run: Path, train: str, val: str) -> dict:
    from patch_stats import init_and_trained
    from small_budget import probe_top1

    out: dict = {"run": str(run), "data": [train, val]}
    for name, encoder in init_and_trained(run)[1].items():
        for how, read in (("as is", encoder), ("no position", without_position(encoder)),
                          ("shuffled patches", ShuffledPatches(encoder))):
            out[f"{name}, {how}"] = probe_top1(run, Path(train), Path(val), read)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--data", required=True, help="shards the probe is fitted on")
    p.add_argument("--val-data", required=True, help="shards the probe is scored on")
    args = p.parse_args(argv)
    for run in args.runs:
        print(json.dumps(layout_probe(run, args.data, args.val_data)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
