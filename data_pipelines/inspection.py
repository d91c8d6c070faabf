"""Look inside shards before training on them: counts, caption lengths, image sizes, broken
samples by reason, segmentation label statistics, and a contact sheet of a few samples with
their captions."""

from __future__ import annotations

import json
import statistics
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.labels import IGNORE
from data_pipelines.loader import IMAGE_EXTS, SampleError, SkipCounter, decode_sample, resolve_shards
from data_pipelines.tarstream import iter_samples

WORD_BINS = (0, 1, 5, 10, 20, 50, 100)  # caption length histogram edges, in words


def _bin_label(i: int) -> str:
    lo = WORD_BINS[i]
    hi = WORD_BINS[i + 1] - 1 if i + 1 < len(WORD_BINS) else None
    return f"{lo}" if hi == lo else (f"{lo}-{hi}" if hi is not None else f"{lo}+")


def _word_bin(n: int) -> int:
    return max(i for i, edge in enumerate(WORD_BINS) if n >= edge)


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "mean": round(statistics.fmean(values), 1),
            "max": max(values)}


class LabelCounts:
    """Running counts of the label maps seen: samples with a class / instance map, pixels per
    class id, and the class names of the first KEY.json ``seg_classes`` list."""

    def __init__(self) -> None:
        self.samples = {"seg": 0, "inst": 0}
        self.pixels = np.zeros(256, dtype=np.int64)
        self.names: list[str] | None = None

    def add(self, labels: dict[str, Image.Image], meta: dict[str, Any]) -> None:
        for name in labels:
            self.samples[name] += 1
        if "seg" in labels:
            self.pixels += np.bincount(np.asarray(labels["seg"]).ravel(), minlength=256)
            names = meta.get("seg_classes")
            if self.names is None and isinstance(names, list) and all(isinstance(n, str) for n in names):
                self.names = names

    def report(self, samples: int) -> dict[str, Any] | None:
        """None when no sample has a label map (shards without masks report nothing new)."""
        if not any(self.samples.values()):
            return None
        return {"samples": samples, "with_seg": self.samples["seg"], "with_inst": self.samples["inst"],
                "classes": seg_class_shares(self.pixels, self.names)}


def seg_class_shares(pixels: np.ndarray, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Pixel counts per class id -> the classes seen, by id: ``{"id", "name", "pixels", "share"}``,
    the share of all labelled pixels; ``name`` from ``names`` (KEY.json ``seg_classes``) when it
    has the id, "ignore" for 255, else None."""
    total = int(pixels.sum())
    seen = []
    for i in np.flatnonzero(pixels).tolist():
        if names is not None and i < len(names):
            name = names[i]
        else:
            name = "ignore" if i == IGNORE else None
        seen.append({"id": i, "name": name, "pixels": int(pixels[i]), "share": round(int(pixels[i]) / total, 4)})
    return seen


def format_label_report(labels: dict[str, Any]) -> list[str]:
    """Two lines: how many samples have maps, then each class with its share of pixels."""
    lines = [f"segmentation masks: {labels['with_seg']} of {labels['samples']} samples"
             + (f"; instance maps: {labels['with_inst']}" if labels["with_inst"] else "")]
    if labels["classes"]:
        shares = ", ".join(" ".join(filter(None, [str(c["id"]), c["name"], f"{c['share']:.1%}"]))
                           for c in labels["classes"])
        lines.append(f"  {len(labels['classes'])} classes; share of pixels by class id: {shares}")
    return lines


def contact_sheet(samples: list[dict[str, Any]], cell: int = 160, columns: int = 4) -> Image.Image:
    """Thumbnails in a grid, each with its key and the start of its caption underneath."""
    text_h = 56
    rows = (len(samples) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, max(rows, 1) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, s in enumerate(samples):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        img = s["image"]
        scale = (cell - 8) / max(img.size)  # small images are enlarged too, so that they can be seen
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        thumb = img.resize(size, Image.NEAREST if scale > 1 else Image.BICUBIC)
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + 4 + (cell - 8 - thumb.height) // 2))
        lines = textwrap.wrap(f"{s['key']}: {s['caption'] or '(no caption)'}", width=cell // 6)[:4]
        draw.multiline_text((x + 4, y + cell), "\n".join(lines), fill="black", spacing=1)
    return sheet


def inspect_shards(shards: str, out: str | Path | None = None, sheet_samples: int = 16, limit: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """Read every sample of ``shards`` (or the first ``limit``) once; return the statistics and,
    with ``out``, write ``out/contact_sheet.png`` and ``out/inspect.json``."""
    from tqdm.auto import tqdm

    urls = resolve_shards(shards, "SHARDS")
    counter = SkipCounter()
    counter.warned = 10**9  # the report lists them; no warning per sample
    examples: dict[str, str] = {}
    words: list[int] = []
    chars: list[int] = []
    widths: list[int] = []
    heights: list[int] = []
    exts: Counter[str] = Counter()
    json_keys: Counter[str] = Counter()
    hist = [0] * len(WORD_BINS)
    sheet: list[dict[str, Any]] = []
    per_shard: Counter[str] = Counter()
    label_counts = LabelCounts()

    def on_tar_error(exn: Exception) -> bool:
        before = counter.counts["tar_error"]
        counter.tar_error(exn)
        if counter.counts["tar_error"] > before:
            examples.setdefault("tar_error", repr(exn)[:300])
        return True

    stream = iter_samples(urls, on_tar_error)
    for raw in tqdm(stream, desc="inspect", unit="sample", disable=not progress):
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        try:
            sample = decode_sample(raw)  # no draft: the decoded image has the stored size
        except SampleError as e:
            counter.counts[e.reason] += 1
            examples.setdefault(e.reason, f"{where}: {e}")
            continue
        except Exception as e:  # noqa: BLE001 - anything else is still a broken sample
            counter.counts["decode_error"] += 1
            examples.setdefault("decode_error", f"{where}: {e!r}")
            continue
        counter.decoded += 1
        per_shard[str(raw.get("__url__", "?"))] += 1
        exts[next(e for e in IMAGE_EXTS if e in raw)] += 1
        json_keys.update(sample["meta"].keys())
        label_counts.add(sample["labels"], sample["meta"])
        n_words = len(sample["caption"].split())
        words.append(n_words)
        chars.append(len(sample["caption"]))
        hist[_word_bin(n_words)] += 1
        widths.append(sample["image"].width)
        heights.append(sample["image"].height)
        if len(sheet) < sheet_samples:
            sheet.append(sample)
        else:
            sample["image"].close()
        if limit and counter.decoded >= limit:
            break

    good = counter.decoded
    skipped = sum(counter.counts.values())
    report: dict[str, Any] = {
        "shards": len(urls), "samples": good, "skipped": skipped,
        "skipped_by_reason": {r: n for r, n in counter.counts.items() if n}, "skip_examples": examples,
        "image_formats": dict(exts), "width": _summary(widths), "height": _summary(heights),
        "smaller_than_224": sum(1 for w, h in zip(widths, heights) if min(w, h) < 224),
        "caption_words": _summary(words), "caption_chars": _summary(chars),
        "empty_captions": sum(1 for n in words if n == 0),
        "caption_words_histogram": {_bin_label(i): n for i, n in enumerate(hist)},
        "json_keys": dict(json_keys.most_common()), "samples_per_shard": _summary(list(per_shard.values())),
        "limit": limit or None,
    }
    labels = label_counts.report(good)
    if labels is not None:
        report["labels"] = labels
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if sheet:
            contact_sheet(sheet).save(out / "contact_sheet.png")
            report["contact_sheet"] = str(out / "contact_sheet.png")
        (out / "inspect.json").write_text(json.dumps(report, indent=1))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a few readable lines for the terminal."""
    lines = [f"{report['samples']} samples in {report['shards']} shards"
             + (f" (first {report['limit']})" if report.get("limit") else "")
             + f"; {report['skipped']} broken"]
    for reason, n in report["skipped_by_reason"].items():
        lines.append(f"  {reason}: {n}   e.g. {report['skip_examples'].get(reason, '')[:160]}")
    if report["width"]:
        w, h = report["width"], report["height"]
        lines.append(f"image size: width {w['min']}-{w['max']} (median {w['median']}), "
                     f"height {h['min']}-{h['max']} (median {h['median']}); "
                     f"{report['smaller_than_224']} with a side under 224 px; formats {report['image_formats']}")
    if report["caption_words"]:
        c = report["caption_words"]
        lines.append(f"caption words: {c['min']}-{c['max']} (median {c['median']}, mean {c['mean']}); "
                     f"{report['empty_captions']} empty")
        top = max(report["caption_words_histogram"].values()) or 1
        for label, n in report["caption_words_histogram"].items():
            lines.append(f"  {label:>6} words | {'#' * round(30 * n / top):<30} {n}")
    if report["json_keys"]:
        lines.append(f"json keys: {report['json_keys']}")
    if "labels" in report:
        lines += format_label_report(report["labels"])
    if "contact_sheet" in report:
        lines.append(f"contact sheet: {report['contact_sheet']}")
    return "\n".join(lines)
