"""Write samples as WebDataset tar shards, deterministically and atomically.

The same samples always give byte-identical shards (fixed tar metadata, sorted members), so data
sets can be regenerated and compared by checksum. A shard appears under its final name only once
it is complete, so a crashed writer never leaves a truncated ``.tar`` that a loader would read.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping

SHARD_NAME = "{prefix}{index:06d}.tar"


def _validate_key(key: object) -> str:
    if not isinstance(key, str) or not key or any(c in key for c in "./\\"):
        raise ValueError(
            f"invalid sample __key__ {key!r}: keys must be non-empty strings without '.', '/' or '\\' "
            "(WebDataset splits member names at the first dot); rename the sample"
        )
    return key


def _sample_members(sample: Mapping[str, bytes | str]) -> list[tuple[str, bytes]]:
    """``{"__key__": k, ext: data, ...}`` -> ``[(f"{k}.{ext}", bytes), ...]`` sorted by extension."""
    if "__key__" not in sample:
        raise ValueError(f"sample without '__key__' (entries: {sorted(sample)}); every sample needs a key")
    key = _validate_key(sample["__key__"])
    members = []
    for ext in sorted(k for k in sample if k != "__key__"):
        value = sample[ext]
        if ext.startswith("__") or not ext or "/" in ext or "\\" in ext:
            raise ValueError(f"sample {key!r}: invalid extension {ext!r}; use names like 'png', 'txt', 'json'")
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"sample {key!r}: entry {ext!r} is {type(value).__name__}; encode it to bytes or str first")
        members.append((f"{key}.{ext}", bytes(value)))
    if not members:
        raise ValueError(f"sample {key!r} has no entries besides '__key__'; nothing to write")
    return members


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class Shard:
    """A written shard: where it is, how many samples, its size and checksum (computed while
    writing, so nobody needs to read the file back)."""

    path: Path
    samples: int
    bytes: int
    sha256: str


class _HashingFile:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO):
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


def write_shards(
    samples: Iterable[Mapping[str, bytes | str]],
    out_dir: str | Path,
    shard_size: int = 1000,
    prefix: str = "",
    max_bytes: int = 0,
) -> list[Shard]:
    """Write ``samples`` into tar shards of ``shard_size`` samples each; return the shards.

    Each sample maps ``"__key__"`` (no dots or slashes) and extensions (``"png"``, ``"txt"``,
    ``"json"``, ...) to bytes or str (stored as UTF-8); members are named ``KEY.ext``. Shards are
    named ``{prefix}{index:06d}.tar`` so brace patterns such as ``dir/{000000..000009}.tar`` work.
    With ``max_bytes`` a shard is also closed once it holds that many bytes (a sample is never
    split, so a shard ends at most one sample past the limit).
    Each shard is written to ``NAME.tar.tmp`` and renamed when complete; on an invalid sample the
    partial shard is removed and the error raised (shards already finished are kept). Duplicate
    keys within one call are rejected. Existing shards of the same name are overwritten.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if any(c in prefix for c in "/\\"):
        raise ValueError(f"prefix {prefix!r} must not contain a path separator; put directories in out_dir")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Shard] = []
    seen: set[str] = set()
    tar: tarfile.TarFile | None = None
    raw: BinaryIO | None = None
    sink: _HashingFile | None = None
    tmp = final = None
    count = 0

    def finish() -> None:
        nonlocal tar, raw
        tar.close()  # writes the end-of-archive blocks through the hashing file
        raw.close()
        tar = raw = None
        os.replace(tmp, final)
        written.append(Shard(final, count, sink.size, sink.hash.hexdigest()))

    try:
        for sample in samples:
            members = _sample_members(sample)
            key = sample["__key__"]
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r}; keys must be unique within a data set")
            seen.add(key)
            if tar is None:
                final = out / SHARD_NAME.format(prefix=prefix, index=len(written))
                tmp = final.with_name(final.name + ".tmp")
                raw = open(tmp, "wb")
                sink = _HashingFile(raw)
                tar = tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT)
                count = 0
            for name, data in members:
                _add_member(tar, name, data)
            count += 1
            if count == shard_size or (max_bytes and tar.offset >= max_bytes):
                finish()
        if tar is not None:
            finish()
    except BaseException:
        if tar is not None:
            tar.close()
        if raw is not None:
            raw.close()
        if tmp is not None and tmp.exists():
            tmp.unlink()
        raise
    return written
