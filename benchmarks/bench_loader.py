"""Loader throughput: decode + random-resized-crop + flip + tokenize, samples/s on one core.

Three pipelines read the same JPEGs (synthetic scenes with added noise so that they compress like
photographs, ``--size`` px, quality 90) and deliver 224 px training crops:

* ``plain``    a Python loop over the JPEG *files*: ``PIL.Image.open(...).convert("RGB")``, a random
               resized crop box, ``resize(box=...)``, a flip, ``np.asarray``; no tar reading, no
               tokenizer, no batching. The practical limit of a PIL pipeline.
* ``ours``     ``data_pipelines.loader.ImageCaptionStream`` in training mode over shards written by
               ``tcjepa data write`` (resampled shards, shuffle buffer, skip counting, uint8 batches,
               open_clip BPE tokenization of the captions in the loader); ``ours/no-draft`` is the
               same without JPEG draft decoding (it only differs for images >= 2x the needed side).
* ``open_clip`` open_clip_train's ``get_wds_dataset`` (its training WebDataset pipeline: resampled
               shards, shuffle, ``decode("pilrgb")``, its ``image_transform`` = RandomResizedCrop +
               ToTensor + Normalize, its tokenizer, batching) over the same shards, with the same crop
               scale (with webdataset >= 1.0 its shard-end marker is switched off: open_clip_train
               3.3 fails on it). It delivers normalised float tensors; ours delivers uint8 and normalises on the
               device, one of the reasons it is faster.

All run in the main process (``workers=0``) with one torch thread, so the figures are per core;
variants are interleaved round by round so machine load hits all alike. The data is made once
under ``--out`` (and also gives a ``tcjepa data write`` throughput figure).

    python benchmarks/bench_loader.py                       # 224 px, ~4 min on 2 cores
    python benchmarks/bench_loader.py --size 640            # large JPEGs: shows what draft decoding buys
    python benchmarks/bench_loader.py --quick               # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from data_pipelines.loader import ImageCaptionStream, LoaderSpec, random_resized_crop_box, resolve_shards
from data_pipelines.synthetic import render_scene
from data_pipelines.tokenizers import OpenCLIPTokenizer
from data_pipelines.write import WriteOptions, write_dataset

OUT_SIZE = 224
BATCH = 64
CONTEXT = 77


def make_images(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` noisy JPEG scenes + ``captions.csv``; reused when already there."""
    csv_path = root / "captions.csv"
    if csv_path.is_file() and len(csv_path.read_text().splitlines()) == n + 1:
        return csv_path
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    lines = ["image,caption"]
    for i in range(n):
        image, caption, _ = render_scene(rng, size)
        pixels = np.asarray(image, dtype=np.float32) + noise.normal(0, 12, (size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{i:06d}.jpg", quality=90)
        lines.append(f"images/{i:06d}.jpg,\"{caption}\"")
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


def plain_loop(files: list[Path], scale: tuple[float, float]) -> Iterator[int]:
    """Decode, crop, resize, flip each file in turn, forever; yields a count every BATCH images."""
    rng = random.Random(0)
    done = 0
    while True:
        for path in files:
            with Image.open(path) as img:
                img = img.convert("RGB")
            box = random_resized_crop_box(rng, img.width, img.height, scale)
            img = img.resize((OUT_SIZE, OUT_SIZE), Image.BICUBIC, box=box)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            np.asarray(img)
            done += 1
            if done == BATCH:
                yield done
                done = 0


def ours(urls: list[str], scale: tuple[float, float], draft: bool, seed: int) -> Iterator[int]:
    spec = LoaderSpec(urls, BATCH, OUT_SIZE, seed=seed, train=True, shuffle_buffer=500, crop_scale=scale,
                      tokenizer=OpenCLIPTokenizer(CONTEXT), draft=draft)
    for batch in ImageCaptionStream(spec):
        assert batch["tokens"].ids.shape == (BATCH, CONTEXT)
        yield len(batch["keys"])


def open_clip_pipeline(urls: list[str], scale: tuple[float, float], seed: int) -> Iterator[int]:
    import functools

    import open_clip
    import open_clip_train.data as oc_data
    from open_clip.transform import AugmentationCfg
    from open_clip_train.data import get_wds_dataset
    from webdataset.tariterators import tar_file_expander

    # webdataset >= 1.0 ends each shard with an empty-dict EOF marker that open_clip_train's
    # group_by_keys_nothrow does not expect (KeyError 'fname'); switch the marker off, as before 1.0
    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)

    args = SimpleNamespace(
        train_data="::".join(urls), val_data=None, train_num_samples=10**9, val_num_samples=None,
        dataset_resampled=True, train_data_upsampling_factors=None, seed=seed, batch_size=BATCH, workers=0,
        world_size=1, rank=0,
    )
    preprocess = open_clip.image_transform(OUT_SIZE, is_train=True, aug_cfg=AugmentationCfg(scale=scale))
    data = get_wds_dataset(args, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    for images, texts in data.dataloader:
        assert texts.shape == (BATCH, CONTEXT)
        yield images.shape[0]


def decoders(files: list[Path], n: int = 200) -> dict[str, float]:
    """ms per image to decode the JPEG bytes to RGB: PIL; PIL with ``draft`` towards the side an
    evaluation centre crop needs (224) and towards the side the smallest training crop needs (the
    loader's rule); ``torchvision.io.decode_jpeg`` when torchvision is installed."""
    import io

    from data_pipelines.loader import draft_side

    blobs = [f.read_bytes() for f in files[:n]]
    train_side = draft_side(LoaderSpec([], 1, OUT_SIZE, crop_scale=(0.3, 1.0)))

    def pil(data: bytes, side: int = 0) -> None:
        with Image.open(io.BytesIO(data)) as img:
            if side and min(img.size) >= 2 * side:
                img.draft("RGB", (side, side))
            img.convert("RGB")

    ways: dict[str, Callable[[bytes], None]] = {
        "PIL": pil, f"PIL draft ({OUT_SIZE}, eval)": lambda d: pil(d, OUT_SIZE),
        f"PIL draft ({train_side}, train)": lambda d: pil(d, train_side),
    }
    try:
        from torchvision.io import decode_jpeg

        ways["torchvision decode_jpeg"] = lambda d: decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8))
    except ImportError:
        pass
    out = {}
    for name, fn in ways.items():
        fn(blobs[0])
        start = time.perf_counter()
        for data in blobs:
            fn(data)
        out[name] = (time.perf_counter() - start) / len(blobs) * 1e3
    return out


def timed(make: Callable[[], Iterator[int]], n: int) -> float:
    """samples/s to pull ``n`` samples (the first batch, which fills buffers, is not timed)."""
    it = make()
    next(it)
    start, done = time.perf_counter(), 0
    while done < n:
        done += next(it)
    return done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1500, help="JPEGs in the data set")
    p.add_argument("--size", type=int, default=224, help="side of the source JPEGs")
    p.add_argument("--samples", type=int, default=768, help="samples timed per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scale", type=float, nargs=2, default=(0.3, 1.0), help="random-resized-crop area range")
    p.add_argument("--out", type=Path, default=Path("runs/bench_loader"))
    p.add_argument("--variants", default="plain,ours,ours/no-draft,open_clip")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: 200 images, 128 samples, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.samples, args.rounds = 200, 128, 1
    torch.set_num_threads(1)
    scale = tuple(args.scale)

    root = args.out / f"jpeg{args.size}_{args.images}"
    t0 = time.perf_counter()
    csv_path = make_images(root, args.images, args.size)
    print(f"data: {args.images} JPEGs of {args.size} px in {root} ({time.perf_counter() - t0:.0f} s)", flush=True)
    write = {}
    for workers in (1, 2):
        stats = write_dataset(csv_path, root / f"shards_w{workers}", WriteOptions(shard_size=250, workers=workers,
                                                                                   overwrite=True), progress=False)
        write[workers] = stats["samples_per_s"]
    print(f"tcjepa data write: {write[1]} samples/s (1 worker), {write[2]} samples/s (2 workers)", flush=True)
    urls = resolve_shards(str(root / "shards_w1"))
    files = sorted((root / "images").glob("*.jpg"))

    makers: dict[str, Callable[[], Iterator[int]]] = {
        "plain": lambda: plain_loop(files, scale),
        "ours": lambda: ours(urls, scale, True, 0),
        "ours/no-draft": lambda: ours(urls, scale, False, 0),
        "open_clip": lambda: open_clip_pipeline(urls, scale, 0),
    }
    decode_ms = decoders(files)
    print("decode only, ms/image: " + ", ".join(f"{k} {v:.2f}" for k, v in decode_ms.items()), flush=True)

    names = [v for v in args.variants.split(",") if v]
    rates: dict[str, list[float]] = {v: [] for v in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for v in order:
            rates[v].append(timed(makers[v], args.samples))
            print(f"round {r + 1}: {v:<14} {rates[v][-1]:7.1f} samples/s", flush=True)

    med = {v: statistics.median(x) for v, x in rates.items()}
    print(f"\n| pipeline ({args.size} px JPEGs -> {OUT_SIZE} px crops, 1 core) | samples/s | vs plain | vs open_clip |")
    print("|---|---|---|---|")
    for v in names:
        vs_plain = f"{med[v] / med['plain']:.2f}x" if "plain" in med else "-"
        vs_oc = f"{med[v] / med['open_clip']:.2f}x" if "open_clip" in med else "-"
        print(f"| {v} | {med[v]:.1f} | {vs_plain} | {vs_oc} |")
    result = {"size": args.size, "images": args.images, "samples": args.samples, "rounds": args.rounds,
              "scale": scale, "rates": rates, "median": med, "data_write_samples_per_s": write, "decode_ms": decode_ms,
              "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "cpu": platform.processor(),
                          "cores": __import__("os").cpu_count()},
              "date": time.strftime("%Y-%m-%d")}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
