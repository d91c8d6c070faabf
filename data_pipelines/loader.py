"""WebDataset loader for image-caption shards, with every stage named and every drop counted.

Training mode: shards are resampled forever from a seeded RNG per (rank, worker), samples pass
a seeded shuffle buffer, are decoded and augmented (random resized crop, flip) and batched.
Evaluation mode: each shard is read once, split over ranks and workers, with a deterministic
resize + centre crop. A sample's dense label maps (``KEY.seg.png``, ``KEY.inst.png``; see
:mod:`data_pipelines.labels`) go through exactly the image's crop, resize and flip, resized with
nearest neighbours so that ids are never blended, and reach the batch as ``seg`` / ``inst``.

A sample that cannot be read is skipped and counted by reason (:data:`SKIP_REASONS`); the
counts travel with each batch (``batch["skipped"]``, the worker's cumulative counts) and
:class:`SkipTracker` sums them over workers for the metrics and enforces a skip-rate limit, so a
data set that is mostly broken stops the run with a clear error instead of quietly training on
what is left.
"""

from __future__ import annotations

import io
import json
import math
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from data_pipelines.labels import IGNORE, LABEL_MEMBERS, LabelError, decode_label
from data_pipelines.tarstream import iter_samples, read_sample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as the official I-JEPA recipes
STD = (0.229, 0.224, 0.225)
# Why a sample was skipped. Every skip is one of these (the catch-all is decode_error).
SKIP_REASONS = (
    "tar_error",        # a truncated or broken tar member (the shard is read on past it)
    "missing_image",    # no .jpg/.jpeg/.png/.webp member
    "empty_image",      # a zero-byte image member
    "bad_image",        # image bytes that do not decode
    "bad_text",         # a caption that is not UTF-8
    "huge_caption",     # a caption over LoaderSpec.max_caption_bytes
    "missing_caption",  # no caption, when captions are required
    "bad_json",         # a .json member that does not parse to an object
    "bad_captions",     # a json "captions" that is not a list of strings (read when max_captions > 1)
    "bad_mask",         # a .seg.png/.inst.png label map that does not decode, has channels or another size
    "decode_error",     # anything else
)
MAX_SKIPS_BEFORE_FIRST = 1000  # a stream that never yields a good sample is an error, not a skip
MAX_CAPTION_BYTES = 65536


class DataError(ValueError):
    """Shards are missing, empty or unreadable; the message names the path."""


class SampleError(ValueError):
    """One sample cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ----------------------------------------------------------------------------- shard lists


def resolve_shards(spec: str, key: str = "data.train") -> list[str]:
    """SHARDS spec -> list of existing ``.tar`` paths: a directory, a brace pattern or a list file."""
    if not spec:
        raise DataError(f"{key} is not set: pass --data SHARDS (a directory of .tar files, a brace pattern or a list file)")
    path = Path(spec)
    if path.is_dir():
        urls = sorted(str(p) for p in path.glob("*.tar"))
        if not urls:
            raise DataError(f"{key}: no .tar shards in directory {spec}")
    elif "{" in spec:
        import braceexpand

        urls = list(braceexpand.braceexpand(spec))
    elif path.is_file() and path.suffix != ".tar":
        urls = read_shard_list(path, key)
    else:
        urls = [spec]
    for url in urls:
        p = Path(url)
        if not p.is_file():
            raise DataError(f"{key}: shard {url} does not exist")
        if p.stat().st_size == 0:
            raise DataError(f"{key}: shard {url} is empty")
    return urls


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # files `data write` reads
MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}  # and its manifests


def read_shard_list(path: Path, key: str) -> list[str]:
    """A list file (one shard per line, relative to the file, ``#`` comments), refusing the files
    people pass by mistake: an image or a caption manifest is named as such, with the command that
    turns it into shards."""
    convert = f"convert it with `tcjepa data write --input {path} --out SHARDS_DIR`, then pass SHARDS_DIR"
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        raise DataError(f"{key}: {path} is an image, not shards; put images and captions in a folder "
                        f"(NAME.jpg + NAME.txt) and convert it with `tcjepa data write --input FOLDER --out SHARDS_DIR`")
    if suffix in MANIFEST_SUFFIXES:
        raise DataError(f"{key}: {path} is a {suffix[1:]} manifest, not shards; {convert}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\0" in text:
        raise DataError(f"{key}: {path} is neither a .tar shard, a directory of shards nor a text list of shards "
                        "(it is a binary file); image-caption data becomes shards with `tcjepa data write`")
    base, urls = path.parent, []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        url = line if Path(line).is_absolute() else str(base / line)
        if not Path(url).is_file() and not line.endswith(".tar"):
            raise DataError(f"{key}: {path} is read as a list of shards, but line {n} ({line[:60]!r}) is not a .tar "
                            f"file; if it is a caption manifest, {convert}")
        urls.append(url)
    if not urls:
        raise DataError(f"{key}: list file {path} names no shards")
    return urls


# ----------------------------------------------------------------------------- counting skips


class SkipCounter:
    """Per-worker counts of skipped samples by reason; doubles as the tar reader's error handler."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()  # kept samples worth a count: captions_over_max
        self.warned = 0
        self.decoded = 0  # samples delivered

    def skip(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if self.warned < 5:  # name the first few samples, then just count
            self.warned += 1
            warnings.warn(f"skipped sample ({reason}): {detail}", stacklevel=2)

    def tar_error(self, exn: Exception) -> bool:
        """Tar-reader error handler: count the broken shard read and go on with the next shard."""
        self.skip("tar_error", str(exn))
        return True


class SkipTracker:
    """Sums the cumulative per-worker counts that ride along with batches."""

    def __init__(self) -> None:
        self.per_worker: dict[int, dict[str, int]] = {}
        self.delivered_per_worker: dict[int, int] = {}
        self.notes_per_worker: dict[int, dict[str, int]] = {}

    def update(self, skipped: dict[str, Any]) -> None:
        self.per_worker[int(skipped["worker"])] = dict(skipped["counts"])
        self.delivered_per_worker[int(skipped["worker"])] = int(skipped.get("delivered", 0))
        self.notes_per_worker[int(skipped["worker"])] = dict(skipped.get("notes", {}))

    @property
    def notes(self) -> dict[str, int]:
        """Counts of kept samples that lost something (``captions_over_max``: more captions
        than ``max_captions``, the first ones kept), summed over workers."""
        total: Counter[str] = Counter()
        for c in self.notes_per_worker.values():
            total.update(c)
        return dict(total)

    @property
    def delivered(self) -> int:
        return sum(self.delivered_per_worker.values())

    def check_rate(self, max_rate: float, min_samples: int, where: str) -> None:
        """Raise :class:`DataError` once at least ``min_samples`` samples were read and more than
        ``max_rate`` of them were skipped (``max_rate >= 1`` disables the check)."""
        skipped = self.total
        seen = skipped + self.delivered
        if max_rate < 1 and seen >= min_samples and skipped > max_rate * seen:
            reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.counts.items(), key=lambda kv: -kv[1]) if n)
            raise DataError(
                f"{where}: {skipped} of {seen} samples ({skipped / seen:.1%}) were skipped, over the limit of "
                f"{max_rate:.1%} (data.max_skip_rate); by reason: {reasons}. Check the shards with "
                "`tcjepa data inspect`, or raise data.max_skip_rate if this is expected"
            )

    @property
    def counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for c in self.per_worker.values():
            total.update(c)
        return dict(total)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ----------------------------------------------------------------------------- stages


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def eval_partition(n_shards: int, rank: int, world_size: int, worker: int, workers: int) -> tuple[slice, int, int]:
    """Which shards and samples one (rank, worker) reads in evaluation mode, so that together
    they read every sample exactly once: ``(shard slice, sample stride, sample offset)``.

    With at least as many shards as readers, each reader takes every C-th shard (C = ranks x
    workers). With fewer, every reader walks all shards and keeps every C-th sample, so no reader
    is idle and none is missed (small data sets, many workers).
    """
    readers, me = world_size * workers, rank * workers + worker
    if n_shards >= readers:
        return slice(me, None, readers), 1, 0
    return slice(None), readers, me


class TrainSource:
    """The raw samples one training reader (rank, role) sees: shards drawn with replacement from a
    seeded RNG, each read in order, through a reservoir shuffle buffer.

    Its position is small, explicit state (:meth:`state`): the two RNGs, the shard being read and
    the byte offset of its next sample, and *where* the buffered samples are (shard, offset), not
    their bytes. A run restored from it continues with exactly the samples, crops and flips the
    uninterrupted run would have seen. ``rng`` also drives augmentation and caption choice, so the
    decode stage shares it.
    """

    def __init__(self, urls: list[str], seed: int, rank: int, role: int, bufsize: int,
                 on_tar_error: Any, state: dict[str, Any] | None = None):
        self.urls, self.bufsize, self.on_tar_error = urls, bufsize, on_tar_error
        self.shard_rng = random.Random(f"shards-{seed}-{rank}-{role}")
        self.rng = random.Random(f"samples-{seed}-{rank}-{role}")
        self.current: tuple[str, int] | None = None  # (shard, offset of its next unread sample)
        self.buffer: list[dict[str, Any]] = []
        if state is not None:
            self.restore(state)

    def _raw(self) -> Iterator[dict[str, Any]]:
        empty_in_a_row = 0
        while True:
            if self.current is None or self.current[1] < 0:  # < 0: the shard ended in an error
                self.current = (self.urls[self.shard_rng.randrange(len(self.urls))], 0)
            url, start = self.current
            got = False
            for sample in iter_samples([url], self.on_tar_error, start=start):
                got = True
                self.current = (url, sample["__next__"])
                yield sample
            self.current = None
            empty_in_a_row = 0 if got else empty_in_a_row + 1
            if empty_in_a_row > max(100, 10 * len(self.urls)):
                raise DataError(f"{empty_in_a_row} shards in a row gave no sample ({url} was the last); "
                                "are these WebDataset tar shards?")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        buf, rng = self.buffer, self.rng
        for sample in self._raw():
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample

    def state(self) -> dict[str, Any]:
        return {
            "shard_rng": self.shard_rng.getstate(), "rng": self.rng.getstate(),
            "current": list(self.current) if self.current is not None else None,
            "buffer": [[b["__url__"], b["__offset__"]] for b in self.buffer],
        }

    def restore(self, state: dict[str, Any]) -> None:
        for rng, saved in ((self.shard_rng, state["shard_rng"]), (self.rng, state["rng"])):
            version, internal, gauss = saved  # a checkpoint round trip may turn the tuple into a list
            rng.setstate((version, tuple(internal), gauss))
        self.current = tuple(state["current"]) if state["current"] is not None else None
        try:
            self.buffer = [read_sample(url, offset) for url, offset in state["buffer"]]
        except (OSError, ValueError) as e:
            raise DataError(f"resuming the data stream: a buffered sample cannot be read again ({e}); "
                            "were the shards changed since the checkpoint?") from e


def _caption(raw: dict[str, Any], meta: dict[str, Any], rng: random.Random | None, max_bytes: int) -> str:
    """The caption: one of ``meta["captions"]`` when the json holds a list (random in training,
    the first in evaluation), else the ``.txt`` member; '' when there is none."""
    options = meta.get("captions")
    if isinstance(options, list) and options and all(isinstance(c, str) for c in options):
        caption = options[rng.randrange(len(options))] if rng is not None else options[0]
        if len(caption.encode("utf-8")) > max_bytes:
            raise SampleError("huge_caption", f"json caption of {len(caption.encode('utf-8'))} bytes > {max_bytes}")
        return caption.strip()
    data = raw.get("txt")
    if data is None:
        return ""
    if len(data) > max_bytes:
        raise SampleError("huge_caption", f"txt of {len(data)} bytes > {max_bytes}")
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise SampleError("bad_text", f"txt is not UTF-8: {e}") from None


def _caption_set(raw: dict[str, Any], meta: dict[str, Any], max_bytes: int, limit: int) -> tuple[list[str], int]:
    """Several captions: the ``.txt`` member's, then ``meta["captions"]`` in order, each
    non-empty text once; the first ``limit`` of them, and how many more there were."""
    options = meta.get("captions", [])
    if not isinstance(options, list) or not all(isinstance(c, str) for c in options):
        raise SampleError("bad_captions", f"json 'captions' must be a list of strings, got {str(options)[:80]}")
    texts = [_caption(raw, {}, None, max_bytes)]
    for caption in options:
        if len(caption.encode("utf-8")) > max_bytes:
            raise SampleError("huge_caption", f"json caption of {len(caption.encode('utf-8'))} bytes > {max_bytes}")
        texts.append(caption.strip())
    unique = list(dict.fromkeys(t for t in texts if t))
    return unique[:limit], max(0, len(unique) - limit)


def decode_sample(
    raw: dict[str, Any],
    rng: random.Random | None = None,
    require_caption: bool = False,
    max_caption_bytes: int = MAX_CAPTION_BYTES,
    min_side: int = 0,
    max_captions: int = 1,
    labels: bool = True,
) -> dict[str, Any]:
    """Raw tar members -> {key, image (PIL RGB), caption, meta, labels}; raises :class:`SampleError`.

    ``labels`` maps ``seg`` / ``inst`` to the sample's label maps (mode "L", the image's size),
    for those it has: usually none. ``max_captions`` > 1 also gives ``caption_set``, up to that
    many captions (see :func:`_caption_set`; ``caption`` is then its first), and
    ``captions_over_max``, how many were left out. ``labels=False`` leaves the label maps unread
    (training needs none: a synthetic scene's two maps cost about half again its decoding time).

    The cheap checks (members present, json, caption) run before the image is decoded. With
    ``min_side`` a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's
    ``draft``) as long as both sides stay >= ``min_side``: much less work for large images. A
    sample with label maps is decoded at full size, so that image and maps share one pixel grid.
    """
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise SampleError("missing_image", f"no image member (.jpg/.png/.webp); members: {sorted(k for k in raw if not k.startswith('__'))}")
    data = raw[ext]
    if not data:
        raise SampleError("empty_image", f".{ext} member is empty (0 bytes)")
    meta: Any = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise SampleError("bad_json", f".json does not parse: {e}") from None
        if not isinstance(meta, dict):
            raise SampleError("bad_json", f".json holds a {type(meta).__name__}, not an object")
    extra: dict[str, Any] = {}
    if max_captions > 1:
        caption_set, over = _caption_set(raw, meta, max_caption_bytes, max_captions)
        caption = caption_set[0] if caption_set else ""
        extra = {"caption_set": caption_set, "captions_over_max": over}
    else:
        caption = _caption(raw, meta, rng, max_caption_bytes)
    if require_caption and not caption:
        raise SampleError("missing_caption", "no caption (.txt or json 'captions') and data.require_captions is on")
    members = [(member, name) for member, name in LABEL_MEMBERS if labels and member in raw]
    if members:
        min_side = 0
    try:
        with Image.open(io.BytesIO(data)) as img:
            if min_side and img.format == "JPEG" and min(img.size) >= 2 * min_side:
                img.draft("RGB", (min_side, min_side))
            image = img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise SampleError("bad_image", f".{ext} does not decode: {e!r}") from None
    labels = _label_maps(raw, members, image.size)
    return {"key": raw.get("__key__", "?"), "image": image, "caption": caption, "meta": meta, "labels": labels,
            **extra}


def _label_maps(raw: dict[str, Any], members: list[tuple[str, str]], size: tuple[int, int]) -> dict[str, Image.Image]:
    """The sample's label maps by batch key, each checked against the image ``size``."""
    labels = {}
    for member, name in members:
        try:
            labels[name] = decode_label(raw[member], size)
        except LabelError as e:
            raise SampleError("bad_mask", f".{member}: {e}") from None
    return labels


def random_resized_crop_box(
    rng: random.Random, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[int, int, int, int]:
    """Crop box (left, top, right, bottom) as torchvision's RandomResizedCrop draws it."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)  # fallback: central square crop
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def crop_and_flip(image: Image.Image, labels: dict[str, Image.Image], rng: random.Random | None, size: int,
                  crop_scale: tuple[float, float], hflip: bool) -> tuple[Image.Image, dict[str, Image.Image]]:
    """The augmentation (``rng`` given: random resized crop, then a flip half of the time) or the
    evaluation view (``rng`` None: centre crop), to ``size`` x ``size``. Label maps get the same
    box and flip, resized with nearest neighbours; they draw nothing from ``rng``, so a data set
    with maps sees the same crops and flips as one without."""
    w, h = image.size
    box = random_resized_crop_box(rng, w, h, crop_scale) if rng is not None else center_crop_box(w, h)
    image = image.resize((size, size), Image.BICUBIC, box=box)
    labels = {k: v.resize((size, size), Image.NEAREST, box=box) for k, v in labels.items()}
    if rng is not None and hflip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        labels = {k: v.transpose(Image.FLIP_LEFT_RIGHT) for k, v in labels.items()}
    return image, labels


def stack_labels(samples: list[dict[str, Any]], name: str, size: int) -> torch.Tensor | None:
    """uint8 [B, H, W] of the samples' ``name`` maps, :data:`IGNORE` for a sample without one;
    None when no sample has one (the batch then has no such key)."""
    if not any(name in s["labels"] for s in samples):
        return None
    batch = np.full((len(samples), size, size), IGNORE, dtype=np.uint8)
    for i, s in enumerate(samples):
        if name in s["labels"]:
            batch[i] = np.asarray(s["labels"][name])
    return torch.from_numpy(batch)


def stack_images(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL RGB images -> uint8 [B, 3, H, W] with channels-last memory: each image is copied once,
    straight into the batch (a stack of per-image CHW tensors costs a second, transposing copy)."""
    batch = torch.empty(len(images), size, size, 3, dtype=torch.uint8)
    array = batch.numpy()
    for i, image in enumerate(images):
        array[i] = np.asarray(image)
    return batch.permute(0, 3, 1, 2)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] (any memory layout) -> contiguous float, ImageNet-normalised."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255
    return ((images.float() - mean) / std).contiguous()


@dataclass
class LoaderSpec:
    urls: list[str]
    batch_size: int  # per rank
    image_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    workers: int = 0
    train: bool = True
    shuffle_buffer: int = 1000
    crop_scale: tuple[float, float] = (0.3, 1.0)
    hflip: bool = True
    resume: dict[int, dict[str, Any]] | None = None  # role -> TrainSource.state() from a checkpoint
    consumed: int = 0  # batches the trainer consumed before ``resume`` (rotates the worker roles)
    require_caption: bool = False  # skip samples without a caption (reason missing_caption)
    max_caption_bytes: int = MAX_CAPTION_BYTES
    tokenizer: Any = None  # captions -> Tokens, run in the workers; the batch then has "tokens"
    max_captions: int = 1  # > 1: up to that many captions per image ("caption_sets"; tokens [B, N, L])
    draft: bool = True  # let the JPEG decoder downscale by 2/4/8 when the image is much larger than needed
    labels: bool = True  # decode KEY.seg.png / KEY.inst.png into batch["seg"] / ["inst"] (training needs none)


def draft_side(spec: LoaderSpec) -> int:
    """The shortest image side that still gives every crop at least ``image_size`` pixels across:
    the smallest random-resized crop covers ``crop_scale[0]`` of the area at an aspect up to 4/3,
    so its short side can be sqrt(scale * 3/4) of the image's; a centre crop needs ``image_size``."""
    if not spec.train:
        return spec.image_size
    return math.ceil(spec.image_size / math.sqrt(spec.crop_scale[0] * 3 / 4))


class ImageCaptionStream(torch.utils.data.IterableDataset):
    """shards -> tar samples -> shuffle -> decode -> augment -> batch, in one worker."""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s = self.spec
        wid, nworkers = _worker()
        counter = SkipCounter()
        stride, offset = 1, 0
        role, source = 0, None
        if s.train:
            # batches come from the workers in turn; after a resume at batch `consumed` worker 0 must
            # produce the next one, so it takes over the stream (role) of the worker that would have
            role = (wid + s.consumed) % nworkers
            state = (s.resume or {}).get(role)
            source = TrainSource(s.urls, s.seed, s.rank, role, s.shuffle_buffer, counter.tar_error, state)
            rng: random.Random | None = source.rng
            samples: Iterable = iter(source)
        else:
            rng = None
            shards, stride, offset = eval_partition(len(s.urls), s.rank, s.world_size, wid, nworkers)
            # with a sample-level split every reader walks the same shards: one of them counts tar errors
            on_tar_error = counter.tar_error if offset == 0 else (lambda exn: True)
            samples = iter_samples(s.urls[shards], on_tar_error)
            if stride > 1:
                samples = (x for i, x in enumerate(samples) if i % stride == offset)
        batch: list[dict[str, Any]] = []
        reported: dict[str, int] = {}
        min_side = draft_side(s) if s.draft else 0
        for raw in samples:
            try:
                sample = decode_sample(raw, rng, s.require_caption, s.max_caption_bytes, min_side, s.max_captions,
                                       s.labels)
            except Exception as e:  # noqa: BLE001 - any broken sample is skipped and counted
                reason = e.reason if isinstance(e, SampleError) else "decode_error"
                counter.skip(reason, f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}: {e}")
                if counter.decoded == 0 and sum(counter.counts.values()) >= MAX_SKIPS_BEFORE_FIRST:
                    raise DataError(
                        f"the first {MAX_SKIPS_BEFORE_FIRST} samples of {s.urls[0]} ... all failed to decode "
                        f"(last: {reason}: {e}); are these image-caption WebDataset shards?"
                    ) from e
                continue
            counter.decoded += 1
            if sample.pop("captions_over_max", 0):
                counter.notes["captions_over_max"] += 1
            sample["image"], sample["labels"] = crop_and_flip(sample["image"], sample["labels"], rng, s.image_size,
                                                              s.crop_scale, s.hflip)
            batch.append(sample)
            if len(batch) == s.batch_size:
                out = collate(batch, wid, counter, s.image_size, s.tokenizer, s.max_captions)
                if source is not None:  # where this reader stands once the trainer has this batch
                    out["stream"] = {"role": role, "workers": nworkers, "state": source.state()}
                yield out
                batch, reported = [], dict(counter.counts)
        if not s.train and (batch or counter.counts != reported):
            # the rest, possibly no samples at all: the final skip counts must reach the consumer
            yield collate(batch, wid, counter, s.image_size, s.tokenizer, s.max_captions)


def _skip_record(worker: int, counter: SkipCounter) -> dict[str, Any]:
    return {"worker": worker, "counts": dict(counter.counts), "delivered": counter.decoded, "notes": dict(counter.notes)}


def collate(samples: list[dict[str, Any]], worker: int, counter: SkipCounter, image_size: int,
            tokenizer: Any = None, max_captions: int = 1) -> dict[str, Any]:
    """A batch; it may hold no samples (the last one of an evaluation worker whose tail was all
    skipped), and always carries the worker's cumulative skip counts. With ``max_captions`` > 1
    it also holds ``caption_sets`` (and ``tokens`` [B, N, L]); when a sample has label maps,
    ``seg`` / ``inst`` (uint8 [B, H, W], see :func:`stack_labels`)."""
    images = stack_images([s["image"] for s in samples], image_size)
    batch = {
        "images": images,
        "captions": [s["caption"] for s in samples],
        "keys": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "skipped": _skip_record(worker, counter),
    }
    for _, name in LABEL_MEMBERS:
        maps = stack_labels(samples, name, image_size)
        if maps is not None:
            batch[name] = maps
    if max_captions > 1:
        batch["caption_sets"] = [s["caption_set"] for s in samples]
        if tokenizer is not None:
            from data_pipelines.tokenizers import tokenize_caption_sets

            batch["tokens"] = tokenize_caption_sets(tokenizer, batch["caption_sets"], max_captions)
    elif tokenizer is not None:  # truncated/padded to the tokenizer's context length
        batch["tokens"] = tokenizer(batch["captions"])
    return batch


def die_with_parent(*_: Any) -> None:
    """In a child process: be killed when the parent dies, whatever kills it (SIGKILL included).

    A DataLoader worker whose parent was SIGKILLed otherwise lives on: it notices the parent only
    between tasks and then blocks at exit flushing a queue nobody reads (Linux only: prctl
    PR_SET_PDEATHSIG; elsewhere a no-op)."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def make_loader(spec: LoaderSpec) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`ImageCaptionStream` (batches are formed inside the workers)."""
    return torch.utils.data.DataLoader(
        ImageCaptionStream(spec),
        batch_size=None,
        num_workers=spec.workers,
        worker_init_fn=die_with_parent if spec.workers > 0 else None,
        persistent_workers=spec.workers > 0 and spec.train,
        prefetch_factor=4 if spec.workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )
