"""A first look at evaluation data: the json of the first samples, read without decoding an
image, so that an evaluation checks its settings against the data before it builds an encoder or
reads every image (a wrong label key costs a second, not the feature extraction).

The look covers the first :data:`PEEK_SAMPLES` samples in shard order: a key that first appears
later is not seen (the full read still checks every sample).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any

from data_pipelines.loader import DataError, resolve_shards
from data_pipelines.tarstream import iter_samples
from tcjepa.eval.common import is_label, lookup

PEEK_SAMPLES = 256


@dataclass
class Peek:
    """What the first samples of a split hold."""

    metas: list[dict[str, Any]]
    captions: int  # samples with a non-empty caption
    seg_maps: int = 0  # samples with a segmentation map (KEY.seg.png)
    inst_maps: int = 0  # samples with an instance map (KEY.inst.png)

    def keys(self) -> list[str]:
        """Every json key, nested ones dotted (``labels.color``), in first-seen order."""
        seen: dict[str, None] = {}
        for meta in self.metas:
            for k, v in meta.items():
                seen[k] = None
                if isinstance(v, dict):
                    for sub in v:
                        seen[f"{k}.{sub}"] = None
        return list(seen)

    def has_label(self, key: str) -> bool:
        return any(is_label(lookup(m, key)) for m in self.metas)

    def has_string(self, key: str) -> bool:
        return any(isinstance(lookup(m, key), str) and lookup(m, key).strip() for m in self.metas)


def peek(shards: str, data_key: str, limit: int = PEEK_SAMPLES) -> Peek:
    """The json (and whether there is a caption, a segmentation or an instance map) of the first ``limit``
    samples of ``shards``. Unreadable json counts as none; shards that cannot be read are left to
    the full read."""
    metas, captions, seg_maps, inst_maps = [], 0, 0, 0
    urls = resolve_shards(shards, data_key)
    for sample in iter_samples(urls, on_error=lambda e: True):
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (ValueError, UnicodeDecodeError):
                meta = {}
        else:
            meta = {}
        metas.append(meta if isinstance(meta, dict) else {})
        captions += bool(sample.get("txt", b"").strip())
        seg_maps += "seg.png" in sample
        inst_maps += "inst.png" in sample
        if len(metas) >= limit:
            break
    if not metas:
        raise DataError(f"{data_key}: no sample in {shards}")
    return Peek(metas, captions, seg_maps, inst_maps)


def _listing(p: Peek) -> str:
    keys = p.keys()
    return ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "") if keys else "none (no json)"


def labels_present(labels: tuple[str, ...], splits: dict[str, Peek], explicit: bool, what: str) -> tuple[str, ...]:
    """The configured ``labels`` that every split holds as integers. A missing one is skipped with a
    one-line warning when it came from the run's recipe, but is an error when ``explicit`` (given
    with ``--set``); none present at all is an error listing the keys the data does have."""
    missing = {key: [name for name, p in splits.items() if not p.has_label(key)] for key in labels}
    present = tuple(k for k in labels if not missing[k])
    absent = [k for k in labels if missing[k]]
    if absent and explicit:
        key, where = absent[0], missing[absent[0]][0]
        raise DataError(f"{where}: no sample has an integer {key!r} in its json ({what}, given with --set); "
                        f"its json keys are: {_listing(splits[where])}")
    if not present:
        where = missing[labels[0]][0] if labels else next(iter(splits))
        raise DataError(f"{where}: none of {what} {list(labels)} is an integer in its json; its json keys are: "
                        f"{_listing(splits[where])}. Name a label with --set {what}=[KEY]")
    if absent:
        warnings.warn(f"{what}: {', '.join(absent)} not in the data ({', '.join(sorted({w for k in absent for w in missing[k]}))}); "
                      f"evaluating {', '.join(present)}", stacklevel=2)
    return present


def require(ok: bool, look: Peek, data_key: str, problem: str) -> None:
    """An ``error:`` naming the split, the problem and the json keys the split does hold."""
    if not ok:
        raise DataError(f"{data_key}: {problem}; its json keys are: {_listing(look)}")


def scored_split_key(data: str, val_data: str) -> tuple[str, str]:
    """The split zero-shot and retrieval score (``--val-data``, else ``--data``) and its CLI key."""
    return (val_data, "--val-data") if val_data else (data, "--data")
