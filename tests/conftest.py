"""Shared fixtures: tiny shards written by hand (independent of the synthetic generator)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def stock_linear():
    """A ZeRO-3 engine replaces ``torch.nn.functional.linear`` process-wide (DeepSpeed's
    ``zero3_linear_wrap``, which saves other tensors for backward) and never puts it back; put
    it back after each test, so later tests in the same process see stock torch."""
    import torch.nn.functional as F

    linear = F.linear
    yield
    F.linear = linear


def png_bytes(color: tuple[int, int, int], size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def labelled_members(start: int, n: int, size: int = 32) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(start)
    members = []
    for i in range(start, start + n):
        label = i % 3
        color = [(200, 30, 30), (30, 200, 30), (30, 30, 200)][label]
        color = tuple(int(c + rng.integers(-20, 20)) for c in color)
        key = f"{i:06d}"
        members += [
            (f"{key}.png", png_bytes(color, size)),
            (f"{key}.txt", f"a {['red', 'green', 'blue'][label]} square".encode()),
            (f"{key}.json", json.dumps({"label": label}).encode()),
        ]
    return members


@pytest.fixture
def tiny_shards(tmp_path: Path) -> Path:
    """Two shards of 12 labelled 32 px images each."""
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "000000.tar", labelled_members(0, 12))
    write_tar(d / "000001.tar", labelled_members(12, 12))
    return d


@pytest.fixture(scope="session")
def shards64(tmp_path_factory) -> Path:
    """Three shards of 40 labelled 64 px images (for short training runs)."""
    d = tmp_path_factory.mktemp("shards64")
    for i in range(3):
        write_tar(d / f"{i:06d}.tar", labelled_members(i * 40, 40, size=64))
    return d
