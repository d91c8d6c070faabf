"""Turn a user's image-caption data into WebDataset shards (img2dataset layout).

Inputs: a folder (``NAME.jpg`` + ``NAME.txt`` caption + optional ``NAME.json``), or a CSV / TSV /
JSONL / parquet manifest whose rows name a local image file and a caption. Each row becomes one
sample ``KEY.{jpg,png,webp}`` + ``KEY.txt`` + ``KEY.json``; the json holds the row's other
fields (``label``, ``label_name``, ``qa``, ``seg_classes``, ...) plus ``source``, ``width`` and
``height``. With ``--mask-column`` a manifest row may also name a segmentation label map, stored
as ``KEY.seg.png`` (see :mod:`data_pipelines.labels`); a row without one is written without.

Nothing is lost quietly: a row that cannot be used is skipped, counted by reason in
``stats.json`` and listed with its source in ``skipped.jsonl``. Shards are written under a
temporary name and renamed when complete, and ``stats.json`` (with a sha256 per shard) is written
last, so an output directory with a ``stats.json`` is a finished one. The output is a pure
function of the input and the options: the worker count changes the speed, not the bytes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from data_pipelines.labels import LabelError, decode_label, encode_label, is_missing
from data_pipelines.loader import IMAGE_SUFFIXES, MANIFEST_SUFFIXES, MAX_CAPTION_BYTES, DataError, die_with_parent
from data_pipelines.shards import write_shards

# What a row can be skipped for (the loader has its own list for shards already written).
WRITE_SKIP_REASONS = (
    "missing_file",   # the image path does not exist
    "empty_image",    # a zero-byte image file
    "bad_image",      # the bytes do not decode as an image
    "empty_caption",  # no caption, or only whitespace (--allow-empty-captions keeps these)
    "bad_text",       # a caption that is not valid UTF-8
    "huge_caption",   # a caption over max_caption_bytes
    "bad_row",        # a manifest row that does not parse, or lacks the image field
    "bad_mask",       # the mask file is missing, does not decode, has channels or another size than the image
)
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # stored as they are; others become png
IMAGE_COLUMNS = ("image", "filepath", "image_path", "path", "file")
CAPTION_COLUMNS = ("caption", "text", "txt")


@dataclass
class WriteOptions:
    shard_size: int = 1000  # samples per shard
    shard_bytes: int = 0  # also start a new shard past this many bytes (0: no byte limit)
    resize: int = 0  # shrink images so that the longer side is at most this (0: keep the original bytes)
    workers: int = 1  # processes decoding and re-encoding images
    image_column: str = ""  # manifest column with the image path; '' tries image, filepath, path, file
    caption_column: str = ""  # manifest column with the caption; '' tries caption, text, txt
    mask_column: str = ""  # manifest column with a label map path per row (-> KEY.seg.png); '' = no masks
    image_root: str = ""  # relative image paths are taken from here (default: the manifest's directory)
    allow_empty_captions: bool = False
    max_caption_bytes: int = MAX_CAPTION_BYTES
    jpeg_quality: int = 95  # when a resized JPEG is re-encoded
    overwrite: bool = False  # replace shards already in the output directory


@dataclass
class Row:
    """One input record, before any file is read."""

    index: int
    where: str  # for messages: 'captions.csv:12' or a file path
    image: str | bytes | None  # path (absolute or relative to the root) or the image bytes
    caption: str | bytes | list[Any] | None  # a list: several captions (a JSONL list, or several columns)
    extra: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None  # (reason, detail) found while reading the manifest
    mask: str | bytes | None = None  # the label map: path (like ``image``) or bytes; None = no mask


class Skipped(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# ----------------------------------------------------------------------------- reading inputs


def input_format(path: Path) -> str:
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise DataError(f"--input: {path} does not exist")
    fmt = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"--input: {path} is neither a folder nor a .csv, .tsv, .jsonl or .parquet manifest")
    return fmt


def _pick_column(columns: list[str], wanted: str, defaults: tuple[str, ...], what: str, where: str) -> str:
    if wanted:
        if wanted not in columns:
            raise DataError(f"{where}: no column {wanted!r} for the {what}; columns are {columns}")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise DataError(f"{where}: no {what} column (tried {', '.join(defaults)}); columns are {columns}. "
                    f"Name it with --{what}-column")


_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?(\d+\.\d*|\.\d+|\d+)([eE]-?\d+)?")


def _typed(value: str) -> Any:
    """CSV cells are strings; numbers become numbers so that ``label`` is usable as a class index."""
    if _INT.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):
        return float(value)
    return value


def _folder_rows(root: Path) -> Iterator[Row]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for i, path in enumerate(files):
        txt, meta = path.with_suffix(".txt"), path.with_suffix(".json")
        caption = txt.read_bytes() if txt.is_file() else None
        extra: dict[str, Any] = {}
        error = None
        if meta.is_file():
            try:
                extra = json.loads(meta.read_bytes().decode("utf-8"))
                if not isinstance(extra, dict):
                    raise ValueError(f"holds a {type(extra).__name__}, not an object")
            except (UnicodeDecodeError, ValueError) as e:
                error = ("bad_row", f"{meta}: {e}")
        yield Row(i, str(path.relative_to(root)), str(path), caption, extra, error)


def _table_rows(records: Iterable[dict[str, Any]], columns: list[str], name: str, opts: WriteOptions,
                typed: bool) -> Iterator[Row]:
    """The columns are checked here, at the call, so a refused manifest fails before ``--out`` exists."""
    image_col = _pick_column(columns, opts.image_column, IMAGE_COLUMNS, "image", name)
    wanted = [c.strip() for c in opts.caption_column.split(",") if c.strip()] or [""]
    caption_cols = [_pick_column(columns, c, CAPTION_COLUMNS, "caption", name) for c in wanted]
    mask_col = _pick_column(columns, opts.mask_column, (), "mask", name) if opts.mask_column else None
    return _rows_of(records, name, image_col, caption_cols, typed, mask_col)


def _file_cell(value: Any) -> Any:
    """Parquet exports of image datasets hold files as ``{"bytes": ..., "path": ...}``."""
    return (value.get("bytes") or value.get("path")) if isinstance(value, dict) else value


def _rows_of(records: Iterable[dict[str, Any]], name: str, image_col: str, caption_cols: list[str],
             typed: bool, mask_col: str | None = None) -> Iterator[Row]:
    caption_of = ((lambda rec: rec.get(caption_cols[0])) if len(caption_cols) == 1
                  else (lambda rec: [rec.get(c) for c in caption_cols if rec.get(c) not in (None, "")]))
    for i, rec in enumerate(records):
        where = f"{name}:{i + 1}"
        if isinstance(rec, Row):  # a line that failed to parse
            rec.index, rec.where = i, where
            yield rec
            continue
        extra = {k: (_typed(v) if typed and isinstance(v, str) else v) for k, v in rec.items()
                 if k not in (image_col, *caption_cols, mask_col) and k is not None}
        image = _file_cell(rec.get(image_col))
        mask = None if mask_col is None or is_missing(rec.get(mask_col)) else _file_cell(rec[mask_col])
        if image is None or image == "":
            yield Row(i, where, None, caption_of(rec), extra, ("bad_row", f"no value in column {image_col!r}"), mask)
            continue
        yield Row(i, where, image, caption_of(rec), extra, mask=mask)


def _csv_records(path: Path, delimiter: str) -> tuple[Iterator[dict[str, Any]], list[str]]:
    f = path.open(encoding="utf-8", errors="surrogateescape", newline="")  # bad bytes -> per-row bad_text
    reader = csv.DictReader(f, delimiter=delimiter)
    columns = list(reader.fieldnames or [])

    def records() -> Iterator[dict[str, Any]]:
        with f:
            for rec in reader:
                if None in rec:  # more cells than header columns
                    yield Row(0, "", None, None, error=("bad_row", f"{len(rec[None])} cells more than the header"))
                    continue
                yield rec

    return records(), columns


def _jsonl_records(path: Path) -> tuple[Iterator[dict[str, Any]], list[str]]:
    columns: set[str] = set()
    with path.open("rb") as f:  # a first pass for the column names (cheap next to image work)
        for line in f:
            try:
                rec = json.loads(line)
                if isinstance(rec, dict):
                    columns.update(rec)
            except ValueError:
                pass

    def records() -> Iterator[dict[str, Any]]:
        with path.open("rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    yield Row(0, "", None, None, error=("bad_text", f"line is not UTF-8: {e}"))
                    continue
                except ValueError as e:
                    yield Row(0, "", None, None, error=("bad_row", f"line is not JSON: {e}"))
                    continue
                if not isinstance(rec, dict):
                    yield Row(0, "", None, None, error=("bad_row", f"line holds a {type(rec).__name__}, not an object"))
                    continue
                yield rec

    return records(), sorted(columns)


def _parquet_records(path: Path) -> tuple[Iterator[dict[str, Any]], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"--input {path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    pf = pq.ParquetFile(path)

    def records() -> Iterator[dict[str, Any]]:
        for batch in pf.iter_batches(batch_size=1024):
            yield from batch.to_pylist()

    return records(), list(pf.schema_arrow.names)


def read_rows(path: Path, opts: WriteOptions) -> tuple[Iterator[Row], Path, int | None]:
    """The rows of ``path``, the directory relative image paths start from, and the row count
    when it is known up front (for the progress bar)."""
    fmt = input_format(path)
    if fmt == "folder" and opts.mask_column:
        raise DataError(f"--mask-column {opts.mask_column}: {path} is a folder, which has no columns; list images, "
                        "captions and mask paths in a .csv, .tsv, .jsonl or .parquet manifest")
    if fmt == "folder":
        rows = list(_folder_rows(path))
        if not rows:
            raise DataError(f"--input: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
        return iter(rows), path, len(rows)
    if fmt in ("csv", "tsv"):
        records, columns = _csv_records(path, "," if fmt == "csv" else "\t")
        typed = True
    elif fmt == "jsonl":
        records, columns = _jsonl_records(path)
        typed = False
    else:
        records, columns = _parquet_records(path)
        typed = False
    if not columns:
        raise DataError(f"--input: {path} has no header or no records")
    root = Path(opts.image_root) if opts.image_root else path.parent
    return _table_rows(records, columns, path.name, opts, typed), root, None


# ----------------------------------------------------------------------------- one row -> one sample


def _caption(raw: str | bytes | None, opts: WriteOptions, allow_empty: bool | None = None) -> str:
    if raw is None:
        raw = ""
    if not isinstance(raw, (str, bytes)):
        raw = str(raw)
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogateescape"))
    if size > opts.max_caption_bytes:
        raise Skipped("huge_caption", f"caption of {size} bytes > {opts.max_caption_bytes}")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw.encode("utf-8").decode("utf-8")
    except UnicodeError as e:  # bytes that are not UTF-8, or a CSV cell holding escaped bad bytes
        raise Skipped("bad_text", f"caption is not UTF-8: {e}") from None
    text = text.strip()
    if not text and not (opts.allow_empty_captions if allow_empty is None else allow_empty):
        raise Skipped("empty_caption", "no caption")
    return text


def _read_file(value: str | bytes, root: Path) -> bytes | None:
    """A cell's file: its bytes, read from the path (relative paths start at ``root``); None when
    there is no such file."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    path = root / value  # an absolute value stays as it is
    return path.read_bytes() if path.is_file() else None


def _image(image: str | bytes, root: Path, opts: WriteOptions) -> tuple[str, bytes, tuple[int, int], tuple[int, int]]:
    """-> (extension, bytes, size, source size) after decoding, and resizing when asked (size is
    what is stored, source size what was read)."""
    if not isinstance(image, (str, bytes, bytearray)):  # e.g. a number in a JSONL manifest
        raise Skipped("bad_row", f"the image cell holds a {type(image).__name__}, not a file path or bytes")
    data = _read_file(image, root)
    if data is None:
        raise Skipped("missing_file", f"no image file {root / image}")
    if not data:
        raise Skipped("empty_image", "image file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()  # decodes everything: truncated files fail here, not in training
            width, height = img.size
            ext = KEEP_FORMATS.get(fmt or "")
            needs_resize = opts.resize and max(width, height) > opts.resize
            if ext is not None and not needs_resize:
                return ext, data, (width, height), (width, height)
            out = img
            if needs_resize:
                scale = opts.resize / max(width, height)
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                if out.mode not in ("RGB", "RGBA", "L"):
                    out = out.convert("RGBA" if "transparency" in out.info else "RGB")
                out = out.resize(size, Image.BICUBIC, reducing_gap=3.0)
            ext = ext or "png"
            if ext == "jpg" and out.mode != "RGB":
                out = out.convert("RGB")
            elif out.mode not in ("RGB", "RGBA", "L"):
                out = out.convert("RGB")
            buf = io.BytesIO()
            save = {"jpg": dict(format="JPEG", quality=opts.jpeg_quality), "png": dict(format="PNG"),
                    "webp": dict(format="WEBP", quality=opts.jpeg_quality)}[ext]
            out.save(buf, **save)
            return ext, buf.getvalue(), out.size, (width, height)
    except Skipped:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise Skipped("bad_image", f"image does not decode: {e!r}") from None


def _mask(mask: str | bytes, root: Path, source_size: tuple[int, int], size: tuple[int, int]) -> bytes:
    """The row's label map -> KEY.seg.png bytes (mode L). It must cover the image as read, pixel
    for pixel; when the image was shrunk (--resize) it is shrunk to match, with nearest
    neighbours so that ids stay ids."""
    if not isinstance(mask, (str, bytes, bytearray)):
        raise Skipped("bad_mask", f"the mask cell holds a {type(mask).__name__}, not a file path")
    data = _read_file(mask, root)
    if data is None:
        raise Skipped("bad_mask", f"no mask file {root / mask}")
    try:
        label = decode_label(data, source_size)
    except LabelError as e:
        raise Skipped("bad_mask", str(e)) from None
    if label.size != size:
        label = label.resize(size, Image.NEAREST)
    return encode_label(label)


def _captions(raw: str | bytes | list[Any] | None, opts: WriteOptions) -> list[str]:
    """One caption, or several (a list): each checked as :func:`_caption` checks one; empty ones
    are dropped, and a row left with none is ``empty_caption`` (unless empty captions are allowed)."""
    if not isinstance(raw, list):
        return [_caption(raw, opts)]
    if not all(isinstance(c, (str, bytes)) for c in raw):
        raise Skipped("bad_row", f"a caption list must hold strings, got {[type(c).__name__ for c in raw]}")
    texts = [t for t in (_caption(c, opts, allow_empty=True) for c in raw) if t]
    if not texts and not opts.allow_empty_captions:
        raise Skipped("empty_caption", "no caption")
    return list(dict.fromkeys(texts)) or [""]


def encode_row(row: Row, root: Path, opts: WriteOptions) -> dict[str, Any] | tuple[str, str]:
    """A row -> a shard sample (without its key), or ``(reason, detail)`` when it is skipped.
    Runs in worker processes, so it takes and returns plain data."""
    try:
        if row.error is not None:
            raise Skipped(*row.error)
        captions = _captions(row.caption, opts)  # cheap checks before the image is read
        if row.image is None:
            raise Skipped("bad_row", "no image")
        ext, data, (width, height), source_size = _image(row.image, root, opts)
        masks = {} if row.mask is None else {"seg.png": _mask(row.mask, root, source_size, (width, height))}
    except Skipped as e:
        return e.reason, str(e)
    source = row.where if isinstance(row.image, (bytes, bytearray)) else str(row.image)
    meta = {**row.extra, "source": source, "width": width, "height": height}
    if len(captions) > 1:  # KEY.txt holds the first; the loader reads them all with max_captions > 1
        meta["captions"] = captions
    meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str)
    try:
        meta_json.encode("utf-8")
    except UnicodeError:
        return "bad_text", "a field of the row is not UTF-8"
    return {ext: data, **masks, "txt": captions[0], "json": meta_json}


def _encode_star(args: tuple[Row, Path, WriteOptions]) -> tuple[Row, dict[str, Any] | tuple[str, str]]:
    row, root, opts = args
    return row, encode_row(row, root, opts)


# ----------------------------------------------------------------------------- the writer


def parse_size(text: str | int) -> int:
    """'500MB', '2G', '1048576' -> bytes (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise DataError(f"--shard-bytes: {text!r} is not a size (e.g. 500MB, 1G, 1048576)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def write_dataset(input: str | Path, out: str | Path, opts: WriteOptions = WriteOptions(),
                  progress: bool = True) -> dict[str, Any]:
    """Convert ``input`` (folder or manifest) into shards in ``out``; returns what ``stats.json`` holds."""
    src = Path(input)
    _check_options(opts)
    rows, root, total = read_rows(src, opts)
    return write_rows(rows, root, out, opts, total=total, source=str(src), fmt=input_format(src), progress=progress)


def _check_options(opts: WriteOptions) -> None:
    if opts.shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {opts.shard_size}")
    if opts.resize < 0 or opts.workers < 1 or opts.shard_bytes < 0:
        raise DataError("--resize and --shard-bytes must be >= 0 and --workers >= 1")


def write_rows(rows: Iterable[Row], root: Path, out: str | Path, opts: WriteOptions, total: int | None = None,
               source: str = "", fmt: str = "rows", progress: bool = True) -> dict[str, Any]:
    """Encode ``rows`` (image paths relative to ``root``) into shards in ``out``; write and return
    the statistics. Converters of packaged data sets build their rows and call this."""
    from tqdm.auto import tqdm

    _check_options(opts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("*.tar"))
    if old and not opts.overwrite:
        raise DataError(f"--out: {out} already holds {len(old)} shard(s); pass --overwrite to replace them")
    for p in old + [out / "stats.json", out / "skipped.jsonl"]:
        p.unlink(missing_ok=True)

    counts = {r: 0 for r in WRITE_SKIP_REASONS}
    masks = {"with_mask": 0, "no_mask": 0}  # written rows, with --mask-column
    start = time.perf_counter()
    jobs = ((row, root, opts) for row in rows)
    with (out / "skipped.jsonl").open("w") as skipped_log, \
            tqdm(total=total, desc=f"write {out.name}", unit="img", disable=not progress) as bar:

        def keyed(results: Iterable[tuple[Row, Any]]) -> Iterator[dict[str, Any]]:
            for row, result in results:
                bar.update(1)
                if isinstance(result, tuple):
                    reason, detail = result
                    counts[reason] += 1
                    skipped_log.write(json.dumps({"row": row.index, "source": row.where, "reason": reason,
                                                  "detail": detail}, ensure_ascii=False) + "\n")
                    continue
                masks["with_mask" if "seg.png" in result else "no_mask"] += 1
                yield {"__key__": f"{row.index:09d}", **result}

        def samples() -> Iterator[dict[str, Any]]:
            if opts.workers > 1:
                import multiprocessing as mp

                with mp.get_context("fork").Pool(opts.workers, initializer=die_with_parent) as pool:
                    yield from keyed(pool.imap(_encode_star, jobs, chunksize=8))  # imap keeps the order
            else:
                yield from keyed(map(_encode_star, jobs))

        shards = write_shards(samples(), out, shard_size=opts.shard_size, max_bytes=opts.shard_bytes)

    shard_stats = [{"file": sh.path.name, "samples": sh.samples, "bytes": sh.bytes, "sha256": sh.sha256} for sh in shards]
    written = sum(s["samples"] for s in shard_stats)
    seconds = time.perf_counter() - start
    stats = {
        "input": source, "format": fmt, "out": str(out),
        "rows": written + sum(counts.values()), "written": written,
        "skipped": sum(counts.values()), "skipped_by_reason": {r: n for r, n in counts.items() if n},
        "shards": shard_stats, "seconds": round(seconds, 2), "samples_per_s": round(written / max(seconds, 1e-9), 1),
        "options": asdict(opts),
    }
    if opts.mask_column:
        stats["masks"] = masks
    tmp = out / "stats.json.tmp"
    tmp.write_text(json.dumps(stats, indent=1))
    os.replace(tmp, out / "stats.json")
    if written == 0:
        raise DataError(f"--input {source}: no row could be written ({stats['skipped']} skipped: "
                        f"{stats['skipped_by_reason']}); see {out / 'skipped.jsonl'}")
    return stats


def summary_line(stats: dict[str, Any]) -> str:
    skipped = ", ".join(f"{r}: {n}" for r, n in stats["skipped_by_reason"].items())
    masks = stats.get("masks")
    return (f"wrote {stats['written']} samples in {len(stats['shards'])} shards to {stats['out']} "
            f"({stats['samples_per_s']} samples/s)"
            + (f"; {masks['with_mask']} with a mask, {masks['no_mask']} without (no_mask)" if masks else "")
            + f"; skipped {stats['skipped']}" + (f" ({skipped})" if skipped else "")
            + f"; see {Path(stats['out']) / 'stats.json'}" + (" and skipped.jsonl" if stats["skipped"] else ""))
