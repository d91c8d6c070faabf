"""Dense labels in shards: per-pixel class and instance maps beside the image.

A sample may hold ``KEY.seg.png`` (each pixel the class id of what covers it, 0 = background;
``KEY.json`` may name the classes under ``seg_classes``, index = id) and ``KEY.inst.png`` (each
pixel the instance id, 0 = background). Both are single-channel 8-bit images of the image's size,
so ids go up to 254: 255 is :data:`IGNORE`, what a batch holds for a sample that has no map.

One decoder serves the shard writer, the loader and ``data inspect``, so that what ``data
write`` accepts is exactly what training reads.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from PIL import Image

LABEL_MEMBERS = (("seg.png", "seg"), ("inst.png", "inst"))  # shard member -> batch key
IGNORE = 255  # the id of pixels without a label (a sample without a map, in a batch with some)
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L")  # 16/32-bit grey: accepted when every id is < 256


class LabelError(ValueError):
    """A label map that cannot be used: it does not decode, has channels, ids over 255 or another size."""


def decode_label(data: bytes, image_size: tuple[int, int] | None = None) -> Image.Image:
    """Label map bytes -> a mode "L" image whose pixel values are the ids; raises :class:`LabelError`.

    Accepted: "L", "P" (the palette indices are the ids, not the colours they stand for) and
    16/32-bit grey with all ids < 256. Colour maps are refused: their ids would be guesses.
    With ``image_size`` (width, height) the map must have that size.
    """
    if not data:
        raise LabelError("the label map is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            label = _as_ids(img)
    except LabelError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise LabelError(f"the label map does not decode: {e!r}") from None
    if image_size is not None and label.size != tuple(image_size):
        raise LabelError(f"the label map is {label.width}x{label.height} but the image is "
                         f"{image_size[0]}x{image_size[1]}; a label map must cover the image pixel for pixel")
    return label


def _as_ids(img: Image.Image) -> Image.Image:
    if img.mode == "L":
        return img.copy()
    if img.mode == "P":
        return Image.fromarray(np.asarray(img), "L")
    if img.mode in WIDE_MODES:
        ids = np.asarray(img)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high > 255:
            raise LabelError(f"the {img.mode} label map holds ids {low}..{high}; ids must be 0..255 (8-bit)")
        return Image.fromarray(ids.astype(np.uint8), "L")
    raise LabelError(f"the label map is mode {img.mode!r}; it must be single-channel 8-bit (L or P, or 16-bit "
                     "grey with ids < 256), each pixel a class id, not a colour")


def encode_label(label: Image.Image) -> bytes:
    """A mode "L" id map -> PNG bytes (lossless; what shards store)."""
    buf = io.BytesIO()
    label.save(buf, format="PNG")
    return buf.getvalue()


def is_missing(value: Any) -> bool:
    """A manifest cell with no label map: None, an empty string, or a NaN from a dataframe export."""
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))
