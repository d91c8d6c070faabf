"""Synthetic captioned scenes: coloured shapes on a dull background, with captions, labels and QA.

The data set exists to test text-conditioned feature prediction end to end on a laptop: a model
that sees an image with regions masked cannot know what is under the mask, but the caption names
every object's size, colour, shape and coarse position, so the text carries exactly the missing
information. Each sample also has probe labels (``KEY.json``: ``label`` is the shape of the
largest object, ``labels`` holds more attributes), unambiguous question/answer pairs, and dense
labels drawn with the image's own geometry: ``KEY.seg.png`` (each pixel's class, ids of
``SEG_CLASSES``, named in KEY.json ``seg_classes``) and ``KEY.inst.png`` (each pixel's object:
``objects[i]`` of KEY.json is instance i + 1, 0 = background).

Everything is a pure function of ``(seed, index)``: one ``random.Random(f"{seed}-{index}")`` per
sample, so shards are byte-identical across runs whatever the shard size.

QA answer conventions (lower case, exact match): colours and shapes are the names in
``COLOR_NAMES`` / ``SHAPE_NAMES`` (shape singular), counts are English words ``"zero"`` to
``"four"``, positions are one of ``POSITION_NAMES``, yes/no questions answer ``"yes"`` or ``"no"``
with probability 1/2 each.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.labels import encode_label
from data_pipelines.shards import write_shards

SHAPE_NAMES = ("circle", "square", "triangle", "diamond", "star")
COLOR_NAMES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
COLOR_RGB = {
    "red": (220, 40, 40), "orange": (245, 145, 30), "yellow": (240, 220, 40), "green": (50, 180, 70),
    "cyan": (40, 200, 220), "blue": (45, 85, 225), "purple": (145, 60, 205), "pink": (245, 110, 190),
}
BACKGROUND_NAMES = ("grey", "beige", "brown", "olive", "slate")
BACKGROUND_RGB = {
    "grey": (128, 128, 128), "beige": (196, 186, 160), "brown": (122, 82, 58),
    "olive": (108, 118, 64), "slate": (72, 84, 104),
}
TEXTURE_NAMES = ("plain", "gradient", "noise")
SIZE_NAMES = ("small", "large")
POSITION_NAMES = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # index = 3 * row + col of the 3x3 grid cell holding the object's centre
COUNT_WORDS = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = 4

LABEL_NAMES = SHAPE_NAMES  # classes of the main probe label: the shape of the largest object
SEG_CLASSES = ("background", *SHAPE_NAMES)  # ids of KEY.seg.png (KEY.json "seg_classes")
ATTRIBUTE_NAMES: dict[str, tuple[str, ...]] = {  # classes of each entry of KEY.json "labels"
    "shape": SHAPE_NAMES,  # largest object
    "color": COLOR_NAMES,  # largest object
    "count": COUNT_WORDS[1:],  # number of objects - 1
    "bg": BACKGROUND_NAMES,
    "texture": TEXTURE_NAMES,
}
QA_TYPES = ("color", "shape", "count", "position", "yes/no")

# Sizes are bounding-box sides as fractions of the image side (x64 = pixels at 64 px).
_MAIN_SIZE = (24 / 64, 28 / 64)
_SMALL_SIZE = (12 / 64, 16 / 64)
_LARGE_MIN = 19 / 64
_LARGE_GAP = 4 / 64  # other large objects are at least this much smaller than the main one
_P_LARGE = 0.4
_P_REPEAT = 0.15  # chance that an object repeats an earlier one's colour and shape ("two red circles")
_COLOR_JITTER = 12
_BG_JITTER = 8
_PLACE_TRIES = 100


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str  # "small" | "large"
    px: int  # bounding-box side in pixels
    x: int  # centre, pixels
    y: int
    position: str  # one of POSITION_NAMES
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # objects[0] is the largest
    background: str
    texture: str
    bg_rgb: tuple[int, int, int]
    texture_seed: int

    @property
    def main(self) -> SceneObject:
        return self.objects[0]


# ----------------------------------------------------------------------------- sampling


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int = _COLOR_JITTER) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _place(rng: random.Random, px: int, size: int, free: list[int], placed: list[SceneObject]) -> tuple[int, int, int] | None:
    """Random centre in a free grid cell, inside the image, clear of ``placed``; None if none found."""
    cell = size / 3
    half = px / 2
    for _ in range(_PLACE_TRIES):
        idx = rng.choice(free)
        row, col = divmod(idx, 3)
        x = (col + 0.5 + rng.uniform(-0.25, 0.25)) * cell
        y = (row + 0.5 + rng.uniform(-0.25, 0.25)) * cell
        x = round(min(max(x, half + 1), size - half - 1))
        y = round(min(max(y, half + 1), size - half - 1))
        if all(math.hypot(x - o.x, y - o.y) >= 0.55 * (px + o.px) + 1 for o in placed):
            return idx, x, y
    return None


def sample_scene(rng: random.Random, image_size: int = 64) -> Scene:
    """Draw a scene's content: 1-4 mostly non-overlapping shapes, one per 3x3 grid cell.

    The first object is the largest, by a visible margin, so its shape is a clean probe label;
    its shape is uniform over ``SHAPE_NAMES``. Objects that cannot be placed without overlap
    after many tries are shrunk, then dropped (rare), so ``len(objects)`` is the true count.
    """
    s = image_size
    n = rng.randint(1, MAX_OBJECTS)
    background = rng.choice(BACKGROUND_NAMES)
    texture = rng.choice(TEXTURE_NAMES)
    bg_rgb = _jitter(rng, BACKGROUND_RGB[background], _BG_JITTER)
    main_px = round(rng.uniform(*_MAIN_SIZE) * s)
    large_hi = max(main_px - round(_LARGE_GAP * s), round(_LARGE_MIN * s))
    placed: list[SceneObject] = []
    free = list(range(9))
    for i in range(n):
        if i > 0 and rng.random() < _P_REPEAT:
            ref = rng.choice(placed)
            shape, color = ref.shape, ref.color
        else:
            shape, color = rng.choice(SHAPE_NAMES), rng.choice(COLOR_NAMES)
        if i == 0:
            size_name, px = "large", main_px
        elif rng.random() < _P_LARGE:
            size_name, px = "large", rng.randint(round(_LARGE_MIN * s), large_hi)
        else:
            size_name, px = "small", round(rng.uniform(*_SMALL_SIZE) * s)
        spot = _place(rng, px, s, free, placed)
        if spot is None and size_name == "large":
            size_name, px = "small", round(_SMALL_SIZE[0] * s)
            spot = _place(rng, px, s, free, placed)
        if spot is None:
            continue
        idx, x, y = spot
        free.remove(idx)
        placed.append(SceneObject(shape, color, size_name, px, x, y, POSITION_NAMES[idx], _jitter(rng, COLOR_RGB[color])))
    return Scene(tuple(placed), background, texture, bg_rgb, rng.getrandbits(63))


# ----------------------------------------------------------------------------- drawing


def _shape_points(shape: str, x: float, y: float, px: float) -> list[tuple[float, float]]:
    h = px / 2
    if shape == "square":
        h *= 0.85  # a full-box square looks much bigger than a circle of the same box
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        return [(x, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "diamond":
        return [(x, y - h), (x + h, y), (x, y + h), (x - h, y)]
    if shape == "star":
        pts = []
        for k in range(10):
            r = h if k % 2 == 0 else 0.5 * h
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((x + r * math.cos(a), y + r * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPE_NAMES}")


def draw_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Render ``scene`` as an RGB image: textured background, then the shapes in order."""
    s = image_size
    gen = np.random.default_rng(scene.texture_seed)
    img = np.empty((s, s, 3), np.float32)
    img[:] = scene.bg_rgb
    if scene.texture == "gradient":
        angle = gen.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / (s - 1) - 0.5
        img += (25.0 * 2 * (xx * math.cos(angle) + yy * math.sin(angle)))[..., None]
    elif scene.texture == "noise":
        img += gen.normal(0.0, 10.0, (s, s, 1)).astype(np.float32)
    image = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    _draw_objects(image, scene.objects, [o.rgb for o in scene.objects])
    return image


def _draw_objects(canvas: Image.Image, objects: tuple[SceneObject, ...], fills: list[Any]) -> None:
    """Fill each object's shape on ``canvas`` with its entry of ``fills``, in order (later ones
    over earlier ones). The image and its label maps are drawn by this one function, so a label
    covers exactly the pixels of its object."""
    draw = ImageDraw.Draw(canvas)
    for o, fill in zip(objects, fills):
        if o.shape == "circle":
            h = o.px / 2
            draw.ellipse([o.x - h, o.y - h, o.x + h, o.y + h], fill=fill)
        else:
            draw.polygon(_shape_points(o.shape, o.x, o.y, o.px), fill=fill)


def draw_labels(scene: Scene, image_size: int = 64) -> tuple[Image.Image, Image.Image]:
    """The scene's label maps, mode "L": ``(seg, inst)``. ``seg`` holds each pixel's class id
    (index in :data:`SEG_CLASSES`, 0 = background), ``inst`` its object's instance id
    (``objects[i]`` -> i + 1, 0 = background)."""
    size = (image_size, image_size)
    seg, inst = Image.new("L", size, 0), Image.new("L", size, 0)
    _draw_objects(seg, scene.objects, [SEG_CLASSES.index(o.shape) for o in scene.objects])
    _draw_objects(inst, scene.objects, list(range(1, len(scene.objects) + 1)))
    return seg, inst


# ----------------------------------------------------------------------------- captions


def _position_phrase(rng: random.Random, pos: str) -> str:
    if pos == "center":
        options = ["in the center", "in the middle", "at the center"]
    elif " " in pos:  # corners
        options = [f"in the {pos}", f"at the {pos}", f"in the {pos} corner", f"near the {pos}"]
    elif pos in ("top", "bottom"):
        options = [f"at the {pos}", f"near the {pos}", f"along the {pos}"]
    else:
        options = [f"on the {pos}", f"on the {pos} side", f"at the {pos}"]
    return rng.choice(options)


def _size_word(rng: random.Random, size: str) -> str:
    return rng.choice(("small", "little") if size == "small" else ("large", "big"))


def _group_phrase(rng: random.Random, group: list[SceneObject]) -> str:
    """'a large red circle in the top left', or 'two red circles (a big one ..., a small one ...)'."""
    first = group[0]
    if len(group) == 1:
        return f"a {_size_word(rng, first.size)} {first.color} {first.shape} {_position_phrase(rng, first.position)}"
    num = COUNT_WORDS[len(group)]
    if len({o.size for o in group}) == 1:
        head = f"{num} {_size_word(rng, first.size)} {first.color} {first.shape}s"
        parts = [f"one {_position_phrase(rng, o.position)}" for o in group]
    else:
        head = f"{num} {first.color} {first.shape}s"
        parts = [f"a {_size_word(rng, o.size)} one {_position_phrase(rng, o.position)}" for o in group]
    return f"{head} ({_join(parts)})"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _background_phrase(rng: random.Random, scene: Scene) -> str:
    c = scene.background
    options = {
        "plain": [f"{c} background", f"plain {c} background"],
        "gradient": [f"shaded {c} background", f"{c} gradient background"],
        "noise": [f"speckled {c} background", f"grainy {c} background", f"noisy {c} background"],
    }[scene.texture]
    phrase = rng.choice(options)
    return f"{_article(phrase)} {phrase}"


def caption_scene(scene: Scene, rng: random.Random) -> str:
    """One sentence naming every object's size, colour, shape and position, and the background.

    Objects sharing colour and shape are grouped with a count ("two red circles (...)"); groups
    appear in random order and the sentence template, size and position wording vary.
    """
    groups: dict[tuple[str, str], list[SceneObject]] = {}
    for o in scene.objects:
        groups.setdefault((o.color, o.shape), []).append(o)
    ordered = list(groups.values())
    rng.shuffle(ordered)
    items = _join([_group_phrase(rng, g) for g in ordered])
    bg = _background_phrase(rng, scene)
    there = "there are" if len(ordered[0]) > 1 else "there is"
    n = len(scene.objects)
    templates = [
        f"{items}, on {bg}.",
        f"{items}, against {bg}.",
        f"{bg} with {items}.",
        f"{there} {items} on {bg}.",
        f"{COUNT_WORDS[n]} {'shape' if n == 1 else 'shapes'} on {bg}: {items}.",
        f"an image of {items} against {bg}.",
        f"on {bg}, {there} {items}.",
    ]
    text = rng.choice(templates)
    return text[0].upper() + text[1:]


def partial_caption(scene: Scene, rng: random.Random) -> str:
    """A caption naming only some of the objects (a random non-empty subset, in random order,
    with random wording), sometimes with the background: one of several captions per image, so
    that max-pooling over captions has different descriptions to choose from."""
    objects = list(scene.objects)
    rng.shuffle(objects)
    chosen = objects[: rng.randint(1, len(objects))]
    groups: dict[tuple[str, str], list[SceneObject]] = {}
    for o in chosen:
        groups.setdefault((o.color, o.shape), []).append(o)
    items = _join([_group_phrase(rng, g) for g in groups.values()])
    there = "there are" if len(next(iter(groups.values()))) > 1 else "there is"
    templates = [f"{items}.", f"{there} {items}.", f"the image shows {items}.", f"{items} can be seen."]
    if rng.random() < 0.5:
        bg = _background_phrase(rng, scene)
        templates += [f"{items}, on {bg}.", f"{bg} with {items}."]
    text = rng.choice(templates)
    return text[0].upper() + text[1:]


def scene_captions(scene: Scene, first: str, rng: random.Random, n: int) -> list[str]:
    """``n`` different captions of ``scene``: ``first`` (the full caption), then partial ones
    (redrawn until they differ from those before, within a bounded number of tries)."""
    captions = [first]
    for _ in range(20 * n):
        if len(captions) == n:
            break
        c = partial_caption(scene, rng) if rng.random() < 0.75 else caption_scene(scene, rng)
        if c not in captions:
            captions.append(c)
    return captions


# ----------------------------------------------------------------------------- questions


def _count_questions(rng: random.Random, scene: Scene) -> list[tuple[str, str]]:
    objs = scene.objects
    qs = [(rng.choice(["How many shapes are there?", "How many objects are in the image?"]), COUNT_WORDS[len(objs)])]
    for color in sorted({o.color for o in objs}):
        qs.append((f"How many {color} shapes are there?", COUNT_WORDS[sum(o.color == color for o in objs)]))
    present = sorted({o.shape for o in objs})
    absent = [s for s in SHAPE_NAMES if s not in present]
    asked_shapes = present + ([rng.choice(absent)] if absent else [])
    for shape in asked_shapes:
        qs.append((f"How many {shape}s are there?", COUNT_WORDS[sum(o.shape == shape for o in objs)]))
    return qs


def _yes_no_question(rng: random.Random, scene: Scene) -> tuple[str, str]:
    """'Is there a <color> <shape>?', answered yes or no with probability 1/2 each."""
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        answer = "yes"
    else:
        candidates = [(c, s) for c in COLOR_NAMES for s in SHAPE_NAMES if (c, s) not in present]
        near = [(c, s) for c, s in candidates if any(c == pc or s == ps for pc, ps in present)]
        color, shape = rng.choice(near if near and rng.random() < 0.5 else candidates)
        answer = "no"
    template = rng.choice(["Is there {a} {c} {s}?", "Does the image contain {a} {c} {s}?", "Is there {a} {c} {s} in the picture?"])
    return template.format(a=_article(color), c=color, s=shape), answer


def qa_for_scene(scene: Scene, rng: random.Random) -> list[dict[str, str]]:
    """3-6 unambiguous question/answer pairs: always one count and one yes/no question.

    A question is asked only if exactly one object fits its description (positions are unique:
    one object per grid cell). Each entry is ``{"question", "answer", "type"}``.
    """
    objs = scene.objects
    shape_n = {s: sum(o.shape == s for o in objs) for s in SHAPE_NAMES}
    color_n = {c: sum(o.color == c for o in objs) for c in COLOR_NAMES}
    pair_n = {(o.color, o.shape): 0 for o in objs}
    for o in objs:
        pair_n[(o.color, o.shape)] += 1
    pools: dict[str, list[tuple[str, str]]] = {t: [] for t in QA_TYPES}
    for o in objs:
        where = _position_phrase(rng, o.position)
        pools["color"].append((f"What color is the shape {where}?", o.color))
        pools["shape"].append((f"What shape is {where}?", o.shape))
        if shape_n[o.shape] == 1:
            pools["color"].append((f"What color is the {o.shape}?", o.color))
            pools["position"].append((f"Where is the {o.shape}?", o.position))
        if color_n[o.color] == 1:
            pools["shape"].append((f"What shape is the {o.color} object?", o.shape))
            pools["position"].append((f"Where is the {o.color} object?", o.position))
        if pair_n[(o.color, o.shape)] == 1:
            pools["position"].append((f"Where is the {o.color} {o.shape}?", o.position))
    pools["count"] = _count_questions(rng, scene)

    chosen: list[tuple[str, str, str]] = []
    asked: set[str] = set()

    def take(kind: str) -> bool:
        if kind == "yes/no":
            for _ in range(10):
                q, a = _yes_no_question(rng, scene)
                if q not in asked:
                    break
            else:
                return False
        else:
            pool = [qa for qa in pools[kind] if qa[0] not in asked]
            if not pool:
                return False
            q, a = rng.choice(pool)
        asked.add(q)
        chosen.append((q, a, kind))
        return True

    take("count")
    take("yes/no")
    target = rng.randint(3, 6)
    for _ in range(50):
        if len(chosen) >= target:
            break
        take(rng.choice(QA_TYPES))
    rng.shuffle(chosen)
    return [{"question": q, "answer": a, "type": t} for q, a, t in chosen]


# ----------------------------------------------------------------------------- samples and shards


def scene_metadata(scene: Scene) -> dict[str, Any]:
    """The ``KEY.json`` content without QA: probe labels, attributes and the object list."""
    main = scene.main
    return {
        "label": SHAPE_NAMES.index(main.shape),
        "label_name": main.shape,
        "labels": {
            "shape": SHAPE_NAMES.index(main.shape),
            "color": COLOR_NAMES.index(main.color),
            "count": len(scene.objects) - 1,
            "bg": BACKGROUND_NAMES.index(scene.background),
            "texture": TEXTURE_NAMES.index(scene.texture),
        },
        "background": {"color": scene.background, "texture": scene.texture},
        "objects": [
            {"shape": o.shape, "color": o.color, "size": o.size, "px": o.px, "x": o.x, "y": o.y, "position": o.position}
            for o in scene.objects
        ],
    }


def render_scene(rng: random.Random, image_size: int = 64) -> tuple[Image.Image, str, dict[str, Any]]:
    """Sample and render one scene: ``(image, caption, metadata)``; metadata is the KEY.json dict."""
    return _render(rng, image_size)[1:]


def _render(rng: random.Random, image_size: int) -> tuple[Scene, Image.Image, str, dict[str, Any]]:
    scene = sample_scene(rng, image_size)
    image = draw_scene(scene, image_size)
    caption = caption_scene(scene, rng)
    meta = scene_metadata(scene)
    meta["qa"] = qa_for_scene(scene, rng)
    meta["seg_classes"] = list(SEG_CLASSES)
    return scene, image, caption, meta


def synthetic_sample(index: int, seed: int = 0, image_size: int = 64, captions_per_image: int = 1) -> dict[str, Any]:
    """Shard sample ``index`` of the data set ``seed``: ``{"__key__", "png", "seg.png", "inst.png",
    "txt", "json"}`` (the label maps of :func:`draw_labels`, as PNG).

    With ``captions_per_image`` N > 1, KEY.json also holds ``"captions"``: the KEY.txt caption
    then N - 1 others, drawn from their own RNG stream, so the image, KEY.txt and the rest of
    KEY.json are the same whatever N is."""
    scene, image, caption, meta = _render(random.Random(f"{seed}-{index}"), image_size)
    if captions_per_image > 1:
        meta["captions"] = scene_captions(scene, caption, random.Random(f"{seed}-{index}-captions"), captions_per_image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    seg, inst = draw_labels(scene, image_size)
    return {"__key__": f"{index:09d}", "png": buf.getvalue(), "seg.png": encode_label(seg),
            "inst.png": encode_label(inst), "txt": caption, "json": json.dumps(meta)}


def iter_synthetic_samples(samples: int, seed: int = 0, image_size: int = 64,
                           captions_per_image: int = 1) -> Iterator[dict[str, Any]]:
    for index in range(samples):
        yield synthetic_sample(index, seed, image_size, captions_per_image)


def write_synthetic_shards(
    out_dir: str | Path,
    samples: int = 2000,
    shard_size: int = 500,
    seed: int = 0,
    image_size: int = 64,
    progress: bool = False,
    captions_per_image: int = 1,
) -> dict[str, Any]:
    """Write ``samples`` synthetic scenes as shards in ``out_dir``; return a summary.

    The summary holds ``samples``, ``shards`` (paths as str), ``label_names`` (classes of
    ``label``), ``attributes`` (classes of each ``labels`` entry) and ``seg_classes`` (ids of
    the KEY.seg.png maps).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 so shapes stay recognisable, got {image_size}")
    from tqdm.auto import tqdm

    stream = tqdm(iter_synthetic_samples(samples, seed, image_size, captions_per_image), total=samples, desc=f"scenes -> {out_dir}",
                  unit="img", disable=not progress)
    shards = write_shards(stream, out_dir, shard_size=shard_size)
    return {
        "samples": samples,
        "shards": [str(sh.path) for sh in shards],
        "label_names": list(LABEL_NAMES),
        "attributes": {k: list(v) for k, v in ATTRIBUTE_NAMES.items()},
        "seg_classes": list(SEG_CLASSES),
    }
