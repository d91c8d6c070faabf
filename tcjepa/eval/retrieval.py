"""``tcjepa eval retrieval``: image->text and text->image recall@1/5/10 on blocks of candidates.

The split is cut into blocks of ``retrieval.block_size`` samples; within a block every image is
scored against every caption (``[n, n]`` scores from :mod:`tcjepa.eval.scoring`), image ``i``'s
true caption is caption ``i`` and vice versa. Recall@k is the fraction of queries whose match
ranks in the top k (tie-aware: ties are broken uniformly at random, so a blind scorer scores
chance, k / n). Numbers are averaged over all blocks; they depend on the block size (chance
recall@1 is 1 / block_size), which the result records.

Blocks rather than the whole split because the TC-JEPA scorer costs one predictor pass per
(image, caption, mask): a block of 32 costs 32 x 32 x num_masks passes. Contrastive runs are
scored the same way (cosine similarity), so the numbers compare across methods; a Matryoshka run
also reports them per embedding width (``per_dim``). Samples without a caption
are left out, and so is a sample whose caption is identical to one already taken (two images
with the same caption cannot be told apart by it; easy-vqa has many); both are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_pipelines.loader import DataError, normalize
from tcjepa.config import ConfigError, to_dict
from tcjepa.eval.common import result_dict, topk_hits, write_result
from tcjepa.eval.peek import peek, require, scored_split_key

KS = (1, 5, 10)


@dataclass
class RetrievalConfig:
    block_size: int = 32  # candidates per query (N images x their N captions)
    max_samples: int = 128  # samples read from the split (0: all)
    num_masks: int = 2  # predictor scoring: fixed-seed masks averaged per image
    seed: int = 0
    batch_size: int = 8  # images scored at once


def check_config(cfg: RetrievalConfig) -> None:
    if cfg.block_size < 2:
        raise ConfigError(f"retrieval.block_size must be >= 2, got {cfg.block_size}")
    if cfg.num_masks < 1 or cfg.batch_size < 1 or cfg.max_samples < 0:
        raise ConfigError("retrieval.num_masks and retrieval.batch_size must be >= 1, retrieval.max_samples >= 0")


def unique_captioned(captions: list[str]) -> tuple[list[int], int, int]:
    """Indices of the samples to use (non-empty caption, first of each caption text), and how
    many were left out without a caption / as duplicates."""
    keep, seen, empty, dup = [], set(), 0, 0
    for i, c in enumerate(captions):
        text = c.strip()
        if not text:
            empty += 1
        elif text in seen:
            dup += 1
        else:
            seen.add(text)
            keep.append(i)
    return keep, empty, dup


def recall_at(scores: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query hits of a square block (row i matches column i), both directions."""
    target = torch.arange(scores.size(0))
    out = {}
    for k in KS:
        out[f"image_to_text_r{k}"] = topk_hits(scores, target, k)
        out[f"text_to_image_r{k}"] = topk_hits(scores.T.contiguous(), target, k)
    return out


def run_retrieval(checkpoint: str | Path, data: str, val_data: str = "", cfg: RetrievalConfig | None = None,
                  json_out: str | Path | None = None, progress: bool = True, save_to_run: bool = True) -> dict[str, Any]:
    """Recall@1/5/10 both ways on ``val_data`` (or ``data`` without a val split). Writes
    ``RUN_DIR/eval/retrieval.json`` and ``json_out``."""
    from tqdm.auto import tqdm

    from tcjepa.eval.scoring import scored_split

    cfg = cfg or RetrievalConfig()
    check_config(cfg)
    shards, data_key = scored_split_key(data, val_data)
    look = peek(shards, data_key)
    require(look.captions >= 2, look, data_key, f"retrieval needs captions (KEY.txt); {look.captions} of the first "
            f"{len(look.metas)} samples have one")
    scorer, split, shards, data_key = scored_split("retrieval", checkpoint, data, val_data, cfg.num_masks, cfg.seed,
                                                   cfg.max_samples)
    keep, empty, dup = unique_captioned(split.captions)
    if len(keep) < 2:
        raise DataError(f"{data_key}: retrieval needs at least 2 samples with distinct captions, found {len(keep)} "
                        f"in the first {len(split)} of {shards}")
    block = min(cfg.block_size, len(keep))
    blocks = [keep[i : i + block] for i in range(0, len(keep) - block + 1, block)]
    widths = list(getattr(scorer, "dims", [None]))  # a contrastive run's embedding widths, the full one last
    hits: dict[Any, dict[str, list[torch.Tensor]]] = {d: {} for d in widths}
    for idx in tqdm(blocks, desc="retrieval", unit="block", disable=not progress):
        captions = [split.captions[i] for i in idx]
        images = split.images[idx]
        chunks = [normalize(images[i : i + cfg.batch_size]) for i in range(0, len(idx), cfg.batch_size)]
        if widths == [None]:
            by_width = {None: torch.cat([scorer.score(c, captions) for c in chunks])}
        else:  # one forward serves every width
            parts = [scorer.score_by_width(c, captions) for c in chunks]
            by_width = {d: torch.cat([p[d] for p in parts]) for d in widths}
        for d, per_name in hits.items():
            for name, h in recall_at(by_width[d]).items():
                per_name.setdefault(name, []).append(h)
    mean = lambda per_name: {name: torch.cat(h).mean().item() for name, h in per_name.items()}  # noqa: E731
    metrics: dict[str, Any] = mean(hits[widths[-1]])  # the headline: the full width
    if len(widths) > 1:  # Matryoshka: every width as well
        metrics["per_dim"] = {str(d): mean(hits[d]) for d in widths}
    metrics.update(
        block_size=block, num_blocks=len(blocks), num_queries=len(blocks) * block,
        chance_r1=1 / block, chance_r5=min(5, block) / block, chance_r10=min(10, block) / block,
        left_out={"no_caption": empty, "duplicate_caption": dup, "last_partial_block": len(keep) - len(blocks) * block},
        scorer=scorer.name, skipped=split.skipped,
    )
    result = result_dict("retrieval", checkpoint, shards, metrics, config=to_dict(cfg))
    write_result(result, checkpoint if save_to_run else None, json_out)
    return result
