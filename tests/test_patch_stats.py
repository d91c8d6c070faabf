"""benchmarks/patch_stats.py: how much of the patch features is position and how much the image
(RESULTS.md, "Small budgets"), told apart on encoders that are one or the other by construction."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.conftest import load_benchmark, write_tar


class PositionOnly(nn.Module):
    """Each patch's feature is a code of its position, the same in every image."""

    def __init__(self):
        super().__init__()
        self.code = torch.randn(1, 16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.code.expand(len(x), -1, -1)


class ImageOnly(nn.Module):
    """Every patch carries the same description of the whole image."""

    def __init__(self):
        super().__init__()
        self.proj = torch.randn(3, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.std((2, 3)) @ self.proj)[:, None].expand(-1, 16, -1)


def test_patch_stats_tell_position_from_image(tmp_path: Path):
    rng = np.random.default_rng(0)
    members = []
    for i in range(16):  # 32 px: the left half black, the right half noise -> half of the 8 px patches are flat
        a = np.zeros((32, 32, 3), np.uint8)
        a[:, 16:] = rng.integers(0, 256, (32, 16, 3))
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        members += [(f"{i:06d}.png", buf.getvalue()), (f"{i:06d}.txt", b"noise")]
    write_tar(tmp_path / "000000.tar", members)
    script = load_benchmark("patch_stats")
    torch.manual_seed(0)
    pos = script.patch_stats(PositionOnly(), str(tmp_path), 32, 8)
    img = script.patch_stats(ImageOnly(), str(tmp_path), 32, 8)
    assert pos["flat_patches"] == img["flat_patches"] == 0.5
    assert pos["pos_share"] == pytest.approx(1.0, abs=1e-3) and pos["flat_var"] == pos["object_var"] == 0
    assert img["pos_share"] == pytest.approx(0.0, abs=1e-3)
    assert img["flat_var"] == img["object_var"] == pytest.approx(1.0, abs=1e-3)
