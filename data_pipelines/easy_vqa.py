"""easy-VQA (the ``easy-vqa`` pip package: 64 px shape images, 13 answers) as shards.

Each image becomes one sample whose ``KEY.json`` holds all its question/answer pairs (``qa``, with
a ``type`` of ``shape``, ``color`` or ``yes/no``), probe labels (``label`` = the shape,
``labels.color``) and whose caption is built from those answers ("a blue rectangle."). This gives
the VQA evaluation a real, external data set, written by the same code as the user's data.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

from data_pipelines.loader import DataError
from data_pipelines.write import Row, WriteOptions, summary_line, write_rows

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
_NEGATED = re.compile(r"\b(not|no)\b")


def question_type(answer: str) -> str:
    return "shape" if answer in SHAPES else "color" if answer in COLORS else "yes/no"


def _attributes(qa: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """The image's shape and colour: from the what-questions, else from the yes/no ones."""
    shape = next((a for _, a in qa if a in SHAPES), None)
    color = next((a for _, a in qa if a in COLORS), None)
    absent_shapes, absent_colors = set(), set()
    for q, a in qa:
        if a not in ("yes", "no"):
            continue
        present = (a == "yes") != bool(_NEGATED.search(q))  # "is there not a red shape?" -> "no" = present
        words = set(re.findall(r"[a-z]+", q))
        named_shape = next((s for s in SHAPES if s in words), None)
        named_color = next((c for c in COLORS if c in words), None)
        if present:
            shape, color = shape or named_shape, color or named_color
        else:
            absent_shapes.add(named_shape)
            absent_colors.add(named_color)
    # each image holds one shape: ruling out all but one names it
    if shape is None and len(set(SHAPES) - absent_shapes) == 1:
        shape = (set(SHAPES) - absent_shapes).pop()
    if color is None and len(set(COLORS) - absent_colors) == 1:
        color = (set(COLORS) - absent_colors).pop()
    return shape, color


def caption_for(shape: str | None, color: str | None) -> str:
    return f"a {color or 'coloured'} {shape or 'shape'}."


def easy_vqa_rows(split: str) -> tuple[list[Row], Path]:
    """One row per image of ``split`` ("train" | "test") and the package's data directory."""
    try:
        import easy_vqa
    except ImportError as e:
        raise DataError("data easy-vqa needs the easy-vqa package (pip install easy-vqa)") from e
    texts, answers, image_ids = (easy_vqa.get_train_questions() if split == "train" else easy_vqa.get_test_questions())
    paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
    per_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for q, a, i in zip(texts, answers, image_ids):
        per_image[int(i)].append((q, a))
    rows = []
    for index, image_id in enumerate(sorted(paths)):
        qa = per_image.get(image_id, [])
        shape, color = _attributes(qa)
        extra: dict[str, Any] = {
            "image_id": image_id,
            "qa": [{"question": q, "answer": a, "type": question_type(a)} for q, a in qa],
        }
        if shape is not None:
            extra["label"], extra["label_name"] = SHAPES.index(shape), shape
        if color is not None:
            extra["labels"] = {"color": COLORS.index(color)}
        rows.append(Row(index, f"easy-vqa/{split}/{image_id}", paths[image_id], caption_for(shape, color), extra))
    return rows, Path(easy_vqa.__file__).parent


def convert_easy_vqa(out: str | Path, shard_size: int = 1000, workers: int = 1, overwrite: bool = False,
                     progress: bool = True) -> dict[str, dict[str, Any]]:
    """Write ``out/train`` and ``out/test`` shards (+ stats) and ``out/answers.json``."""
    out = Path(out)
    opts = WriteOptions(shard_size=shard_size, workers=workers, overwrite=overwrite)
    stats = {}
    for split in ("train", "test"):
        rows, root = easy_vqa_rows(split)
        stats[split] = write_rows(rows, root, out / split, opts, total=len(rows), source=f"easy-vqa {split}",
                                  fmt="easy-vqa", progress=progress)
    import easy_vqa

    (out / "answers.json").write_text(json.dumps({"answers": easy_vqa.get_answers(), "shapes": SHAPES,
                                                  "colors": COLORS}, indent=1))
    return stats


def summary(stats: dict[str, dict[str, Any]]) -> Iterator[str]:
    for split, s in stats.items():
        yield f"{split}: {summary_line(s)}"
