"""Read WebDataset tar shards as samples, ~4x faster than ``tarfile``-based readers.

A shard is a plain (ustar/pax) tar whose members ``KEY.EXT`` are grouped into samples
``{"__key__": KEY, "__url__": shard, EXT: bytes, ...}``, the grouping rule of webdataset
(``KEY`` is the path up to the first dot of the file name). The 512-byte headers are parsed
directly instead of through ``tarfile`` (which builds a TarInfo object and re-validates every
header in Python): this is the biggest cost of the loader after JPEG decoding and resizing
(``benchmarks/bench_loader.py``). Checksums are verified; pax extended headers (long names) and
GNU long names are understood; anything else unusual is an error for that shard.

Errors: a truncated member or a corrupt header ends the shard; the complete samples before it
are yielded, then ``on_error`` is called with a :class:`TarError` naming the shard and offset (it
returns True to go on with the next shard, False to re-raise).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

BLOCK = 512


class TarError(ValueError):
    """A shard is truncated or corrupt at a given offset."""


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if not field:
        return 0
    if field[0] & 0x80:  # GNU base-256 for large sizes
        value = 0
        for byte in field[1:]:
            value = (value << 8) | byte
        return value
    return int(field, 8)


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1: pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return records


def iter_members(stream, url: str = "?", offset: int = 0) -> Iterator[tuple[str, bytes, int]]:
    """``(name, data, offset)`` of each regular file in a tar ``stream`` positioned at byte
    ``offset`` (a member header, or the header of its pax/long-name prefix); ``offset`` is where
    the member's first header starts. Raises :class:`TarError`."""
    read = stream.read
    start = offset  # the first header of the current member (its pax/long-name header, if any)
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = read(BLOCK)
        if len(header) < BLOCK:
            if header:
                raise TarError(f"{url}: truncated header at byte {offset}")
            return  # end of file without the two zero blocks: accepted, as tar does
        if header == b"\0" * BLOCK:
            return
        stored = _octal(header[148:156])
        if stored != sum(header) - sum(header[148:156]) + 8 * 32:
            raise TarError(f"{url}: bad header checksum at byte {offset}")
        size = int(pax["size"]) if "size" in pax else _octal(header[124:136])
        kind = header[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        data = read(padded)
        if len(data) < padded:
            raise TarError(f"{url}: member at byte {offset} is truncated ({len(data)} of {padded} bytes)")
        offset += BLOCK + padded
        data = data[:size]
        if kind == b"x":  # pax header for the next member
            pax = _pax_records(data)
            continue
        if kind == b"g":  # global pax header: nothing we use
            start = offset
            continue
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8")
            continue
        if kind in (b"0", b"\0", b"7"):
            if long_name is not None:
                name = long_name
            elif "path" in pax:
                name = pax["path"]
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix and header[257:262] == b"ustar":
                    name = prefix.decode("utf-8") + "/" + name
            yield name, data, start
        long_name, pax = None, {}
        start = offset


def split_name(name: str) -> tuple[str, str] | None:
    """``"dir/KEY.a.b"`` -> ``("dir/KEY", "a.b")`` as webdataset splits it; None without an extension."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return None
    return name[:dot], name[dot + 1:]


def iter_samples(urls: Iterable[str], on_error: Callable[[Exception], bool], start: int = 0) -> Iterator[dict]:
    """Samples of the shards in ``urls`` (local paths), in order; members without an extension
    are ignored. Each sample carries ``__offset__`` (where its first member starts) and
    ``__next__`` (where the next sample starts, or the shard's end): enough to re-read it, or to
    continue the shard after it, with ``start=`` (which applies to the first url only)."""
    for url in urls:
        sample: dict | None = None
        try:
            with open(url, "rb") as f:
                if start:
                    f.seek(start)
                for name, data, offset in iter_members(f, url, start):
                    parts = split_name(name)
                    if parts is None:  # e.g. webdataset's "__index__" meta members
                        continue
                    key, ext = parts
                    ext = ext.lower()
                    if sample is None or key != sample["__key__"] or ext in sample:
                        if sample is not None:
                            sample["__next__"] = offset
                            yield sample
                        sample = {"__key__": key, "__url__": url, "__offset__": offset}
                    sample[ext] = data
                end = f.tell()
            if sample is not None:
                sample["__next__"] = end
                yield sample
        except (OSError, TarError, UnicodeDecodeError, ValueError) as e:
            if sample is not None:
                sample["__next__"] = -1  # its members were complete; the broken one was not added
                yield sample
            if not on_error(e if isinstance(e, TarError) else TarError(f"{url}: {e!r}")):
                raise
        start = 0


def read_sample(url: str, offset: int) -> dict:
    """The one sample whose first member starts at byte ``offset`` of shard ``url``."""
    for sample in iter_samples([url], lambda e: False, start=offset):
        return sample
    raise TarError(f"{url}: no sample at byte {offset}")
