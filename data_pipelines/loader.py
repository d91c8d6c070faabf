"""WebDataset loader for image-caption shards, with every stage named and every drop counted.

Training mode: shards are resampled forever from a seeded RNG per (rank, worker), samples pass
a seeded shuffle buffer, are decoded and augmented (random resized crop, flip) and batched.
Evaluation mode: each shard is read once, split over ranks and workers, with a deterministic
resize + centre crop.

A sample that cannot be read (broken tar member, undecodable image, bad text or JSON) is
skipped and counted by reason; the counts travel with each batch (``batch["skipped"]``, the
worker's cumulative counts) and :class:`SkipTracker` sums them over workers for the metrics.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as the official I-JEPA recipes
STD = (0.229, 0.224, 0.225)
SKIP_REASONS = ("decode_error", "tar_error")  # what SkipCounter counts
MAX_SKIPS_BEFORE_FIRST = 1000  # a stream that never yields a good sample is an error, not a skip


class DataError(ValueError):
    """Shards are missing, empty or unreadable; the message names the path."""


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
        base = path.parent
        urls = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                urls.append(line if Path(line).is_absolute() else str(base / line))
        if not urls:
            raise DataError(f"{key}: list file {spec} names no shards")
    else:
        urls = [spec]
    for url in urls:
        p = Path(url)
        if not p.is_file():
            raise DataError(f"{key}: shard {url} does not exist")
        if p.stat().st_size == 0:
            raise DataError(f"{key}: shard {url} is empty")
    return urls


# ----------------------------------------------------------------------------- counting skips


class SkipCounter:
    """Per-worker counts of skipped samples by reason; doubles as a webdataset error handler."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.warned = 0
        self.decoded = 0  # samples delivered, to tell a new tar error from a re-raise of the last
        self._last_tar_error: tuple[int, str] | None = None

    def skip(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if self.warned < 5:  # name the first few samples, then just count
            self.warned += 1
            warnings.warn(f"skipped sample ({reason}): {detail}", stacklevel=2)

    def tar_error(self, exn: Exception) -> bool:
        """webdataset handler: count a broken shard read once (webdataset reports a truncated
        member twice, from the tar iterator and again from the expander) and keep going."""
        match = re.search(r"name='([^']+)'", repr(exn))
        event = (self.decoded, match.group(1) if match else repr(exn))
        if event != self._last_tar_error:
            self._last_tar_error = event
            self.skip("tar_error", repr(exn))
        return True


class SkipTracker:
    """Sums the cumulative per-worker counts that ride along with batches."""

    def __init__(self) -> None:
        self.per_worker: dict[int, dict[str, int]] = {}

    def update(self, skipped: dict[str, Any]) -> None:
        self.per_worker[int(skipped["worker"])] = dict(skipped["counts"])

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


@dataclass
class ResampledShards(torch.utils.data.IterableDataset):
    """Infinite stream of shard urls, drawn with replacement from an RNG seeded by
    (seed, rank, worker): every rank/worker sees a different, reproducible order."""

    urls: list[str]
    seed: int
    rank: int = 0

    def __iter__(self) -> Iterator[dict[str, str]]:
        wid, _ = _worker()
        rng = random.Random(f"shards-{self.seed}-{self.rank}-{wid}")
        while True:
            yield {"url": self.urls[rng.randrange(len(self.urls))]}


@dataclass
class SplitShards(torch.utils.data.IterableDataset):
    """Each shard once, split over ranks then workers (evaluation)."""

    urls: list[str]
    rank: int = 0
    world_size: int = 1

    def __iter__(self) -> Iterator[dict[str, str]]:
        wid, nworkers = _worker()
        for url in self.urls[self.rank :: self.world_size][wid::nworkers]:
            yield {"url": url}


def shuffle(samples: Iterable[dict], bufsize: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir shuffle with an explicit RNG (reproducible, unlike a global one)."""
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = rng.randrange(len(buf))
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw tar members -> {key, image (PIL RGB), caption, meta}; raises on a broken sample."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise KeyError("no image member (.jpg/.png/.webp)")
    with Image.open(io.BytesIO(raw[ext])) as img:
        image = img.convert("RGB")
    caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
    meta = json.loads(raw["json"].decode("utf-8")) if "json" in raw else {}
    return {"key": raw.get("__key__", "?"), "image": image, "caption": caption, "meta": meta}


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


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> uint8 tensor [3, H, W]; normalisation happens once per batch."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float, ImageNet-normalised."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


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
    epoch: int = 0  # varies the training stream (e.g. after a resume)
    extra: dict[str, Any] = field(default_factory=dict)


class ImageCaptionStream(torch.utils.data.IterableDataset):
    """shards -> tar samples -> shuffle -> decode -> augment -> batch, in one worker."""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        s = self.spec
        wid, _ = _worker()
        counter = SkipCounter()
        rng = random.Random(f"samples-{s.seed}-{s.epoch}-{s.rank}-{wid}")
        if s.train:
            shards: Iterable = ResampledShards(s.urls, s.seed + 1000003 * s.epoch, s.rank)
        else:
            shards = SplitShards(s.urls, s.rank, s.world_size)
        samples: Iterable = wds.tarfile_to_samples(handler=counter.tar_error)(iter(shards))
        if s.train:
            samples = shuffle(samples, s.shuffle_buffer, rng)
        batch: list[dict[str, Any]] = []
        for raw in samples:
            try:
                sample = decode_sample(raw)
            except Exception as e:  # noqa: BLE001 - any broken sample is skipped and counted
                counter.skip("decode_error", f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}: {e!r}")
                if counter.decoded == 0 and sum(counter.counts.values()) >= MAX_SKIPS_BEFORE_FIRST:
                    raise DataError(
                        f"the first {MAX_SKIPS_BEFORE_FIRST} samples of {s.urls[0]} ... all failed to decode "
                        f"(last: {e!r}); are these image-caption WebDataset shards?"
                    ) from e
                continue
            counter.decoded += 1
            image = sample.pop("image")
            w, h = image.size
            if s.train:
                box = random_resized_crop_box(rng, w, h, s.crop_scale)
            else:
                box = center_crop_box(w, h)
            image = image.resize((s.image_size, s.image_size), Image.BICUBIC, box=box)
            if s.train and s.hflip and rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            sample["image"] = to_tensor(image)
            batch.append(sample)
            if len(batch) == s.batch_size:
                yield collate(batch, wid, counter)
                batch = []
        if batch and not s.train:
            yield collate(batch, wid, counter)


def collate(samples: list[dict[str, Any]], worker: int, counter: SkipCounter) -> dict[str, Any]:
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "keys": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
        "skipped": {"worker": worker, "counts": dict(counter.counts)},
    }


def make_loader(spec: LoaderSpec) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`ImageCaptionStream` (batches are formed inside the workers)."""
    return torch.utils.data.DataLoader(
        ImageCaptionStream(spec),
        batch_size=None,
        num_workers=spec.workers,
        persistent_workers=spec.workers > 0 and spec.train,
        prefetch_factor=4 if spec.workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )
