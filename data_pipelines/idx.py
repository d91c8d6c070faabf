"""IDX files (the MNIST family's format: Fashion-MNIST, MNIST, KMNIST) -> PNG images and a JSONL
manifest that ``tcjepa data write`` turns into shards, the path any labelled image set takes.

Each manifest row is ``{"image": "images/000042.png", "caption": "a photo of a trouser.",
"label": 1, "label_name": "trouser"}``: the caption names the class (so zero-shot and TC-JEPA
have text), ``label`` / ``label_name`` are what the probe and zero-shot read.

Format (big-endian): two zero bytes, a type byte (0x08: unsigned byte), the number of dimensions,
then one uint32 per dimension, then the data. ``.gz`` files are read as they are shipped.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.loader import DataError

CLASS_NAMES = {  # --classes presets: index = label
    "fashion-mnist": ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                      "ankle boot"),
    "mnist": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array of its shape."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such IDX file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (it must start with two zero bytes)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX type 0x{raw[2]:02x}; only unsigned bytes (0x08) are supported")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes), file holds {data.size}")
    return data.reshape(shape)


def write_idx_manifest(images: str | Path, labels: str | Path, out: str | Path, class_names: tuple[str, ...],
                       caption: str = "a photo of a {}.", limit: int = 0) -> dict[str, Any]:
    """Write ``out/images/NNNNNN.png`` and ``out/manifest.jsonl`` (one row per image, the first
    ``limit`` when > 0); returns a summary. Every check runs before ``out`` is created."""
    from PIL import Image

    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{images}, {labels}: expected N images [N, H, W] and N labels [N], got {x.shape} and {y.shape}")
    if "{}" not in caption:
        raise DataError(f"--caption {caption!r}: needs a {{}} for the class name")
    if int(y.max()) >= len(class_names):
        raise DataError(f"{labels}: label {int(y.max())} but only {len(class_names)} class names")
    n = min(limit, len(x)) if limit > 0 else len(x)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (out / "manifest.jsonl").open("w") as f:
        for i in range(n):
            name = f"images/{i:06d}.png"
            Image.fromarray(x[i], "L").save(out / name)
            label = int(y[i])
            f.write(json.dumps({"image": name, "caption": caption.format(class_names[label]), "label": label,
                                "label_name": class_names[label]}) + "\n")
    return {"images": n, "classes": len(class_names), "manifest": str(out / "manifest.jsonl")}
