"""Tiny trained runs and hand-written shards for the evaluation tests (tests/test_eval_*.py).

Each test module trains its own checkpoint once (module-scoped fixtures): two steps of a
micro-sized ViT are enough to exercise every evaluation end to end in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tcjepa.config import load_config, project_root
from tests.conftest import png_bytes, write_tar

COLOURS = ("red", "green", "blue")
RGB = ((200, 30, 30), (30, 200, 30), (30, 30, 200))
TINY = ["model.encoder=vit_micro_8", "model.depth=1", "model.predictor_depth=2", "model.predictor_width=48",
        "train.batch_size=8", "train.steps=2", "train.log_every=1", "data.workers=0", "data.shuffle_buffer=10",
        "checkpoint.every=0"]
TINY_TEXT = ["conditioner.context_length=16", "conditioner.text_width=32", "conditioner.text_depth=1"]


def colour_members(start: int, n: int, size: int = 64, shuffle_labels_seed: int | None = None
                   ) -> list[tuple[str, bytes]]:
    """Solid squares of three colours: ``label`` is the colour (trivially separable) unless
    ``shuffle_labels_seed`` draws labels independent of the image; each caption is unique
    ("a red square, number 7") and ``label_name`` names the label."""
    rng = np.random.default_rng(start)
    shuffled = np.random.default_rng(shuffle_labels_seed) if shuffle_labels_seed is not None else None
    members = []
    for i in range(start, start + n):
        colour = i % 3
        rgb = tuple(int(c + rng.integers(-20, 20)) for c in RGB[colour])
        label = int(shuffled.integers(0, 3)) if shuffled is not None else colour
        key = f"{i:06d}"
        members += [
            (f"{key}.png", png_bytes(rgb, size)),
            (f"{key}.txt", f"a {COLOURS[colour]} square, number {i}".encode()),
            (f"{key}.json", json.dumps({"label": label, "label_name": COLOURS[label]}).encode()),
        ]
    return members


def write_colour_shards(d: Path, n: int, start: int = 0, per_shard: int = 40, **kw) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for s, i in enumerate(range(start, start + n, per_shard)):
        write_tar(d / f"{s:06d}.tar", colour_members(i, min(per_shard, start + n - i), **kw))
    return d


def train_tiny(shards: Path, out: Path, text: bool = False, *extra: str) -> Path:
    """Two training steps of a micro I-JEPA (``text``: TC-JEPA) on ``shards``; returns the run dir."""
    from tcjepa.train import train

    recipe = "recipes/tcjepa_quickstart.yaml" if text else "recipes/ijepa_quickstart.yaml"
    cfg = load_config(project_root() / recipe, [f"data.train={shards}", *TINY, *(TINY_TEXT if text else []), *extra])
    return train(cfg, out, progress=False)
