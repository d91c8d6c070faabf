"""Token counts per micro-batch, read off the run's own mask sampler (:func:`draw_mask_counts`,
:class:`TokenStats`), and how a run's padded batches attend (:func:`attention_mode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tcjepa.config import Config


@dataclass(frozen=True)
class TokenStats:
    """Token counts of one micro-batch of masks (``tcjepa.masks.sample_masks``)."""

    batch: int
    targets: int  # target blocks per image
    full: int  # patches per image (the teacher sees all)
    context: tuple[int, ...]  # real context patches per image
    context_pad: int  # padded context length (the batch maximum)
    target: tuple[tuple[int, ...], ...]  # real patches per target block, per image
    target_pad: int
    padded: bool  # rows differ in length: models run packed with key-padding masks

    @property
    def context_real(self) -> int:
        return sum(self.context)

    @property
    def target_real(self) -> int:
        return sum(map(sum, self.target))

    def attention_layout(self, attention: str = "groups") -> tuple[int, int]:
        """Positions attention runs on in the encoder and in the predictor when rows differ (see
        :func:`attention_mode`): "groups", per length group padded to its longest
        (``tcjepa.models.attention.Packing``); "varlen", the real tokens; "rows", the whole padded rows.
        Unpadded batches run on their rows, whatever the mode."""
        (ctx, _), (pred, _) = self.attention_layouts(attention)
        return ctx, pred

    def attention_layouts(self, attention: str = "groups") -> tuple[tuple[int, int], tuple[int, int]]:
        """(positions, query-key pairs) of the encoder's and the predictor's attention layouts (see
        :meth:`attention_layout`); the pairs size an attention matrix where one is kept
        (``cpu_half_attention``)."""
        from tcjepa.models.attention import grouped_layout

        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention: {attention!r}, expected one of {ATTENTION_MODES}")
        if not self.padded or attention == "rows":
            rows = self.context_pad + self.target_pad
            return ((self.batch * self.context_pad, self.batch * self.context_pad ** 2),
                    (self.batch * self.targets * rows, self.batch * self.targets * rows ** 2))
        seqs = [c + t for c, row in zip(self.context, self.target) for t in row]
        if attention == "varlen":
            return (self.context_real, sum(c * c for c in self.context)), (sum(seqs), sum(n * n for n in seqs))
        return grouped_layout(list(self.context)), grouped_layout(seqs)


@dataclass(frozen=True)
class MaskCounts:
    """Per-image token counts of one large draw of the run's masks; any micro-batch's
    :class:`TokenStats` are read off a slice of it (:meth:`batch`)."""

    context: tuple[int, ...]  # context patches per image, before any truncation
    target: tuple[tuple[int, ...], ...]
    full: int
    policy: str

    def batch(self, size: int, start: int = 0) -> TokenStats:
        """Counts of the micro-batch of images ``start .. start + size``: padded to its maximum
        ("pad"), or every context truncated to its minimum ("official"), as ``sample_masks`` does."""
        if size < 1 or start < 0 or start + size > len(self.context):
            raise ValueError(f"micro-batch {start}..{start + size} is outside the {len(self.context)} drawn images")
        ctx, tgt = self.context[start:start + size], self.target[start:start + size]
        if self.policy == "official":
            ctx = (min(ctx),) * size
        ctx_pad, tgt_pad = max(ctx), max(map(max, tgt))
        padded = any(n != ctx_pad for n in ctx) or any(n != tgt_pad for row in tgt for n in row)
        return TokenStats(size, len(tgt[0]), self.full, ctx, ctx_pad, tgt, tgt_pad, padded)


def draw_mask_counts(cfg: Config, size: int, seed: int = 0) -> MaskCounts:
    """Draw ``size`` images' masks with the run's mask settings. Padding to the batch maximum
    (or truncation to the minimum) depends on the micro-batch, so the planner reads counts from
    the sampler itself rather than from mean block sizes."""
    import dataclasses

    from tcjepa.masks import sample_block_masks
    from tcjepa.models.vit import parse_encoder_name

    grid = cfg.model.image_size // parse_encoder_name(cfg.model.encoder).patch_size
    targets, context = sample_block_masks(size, (grid, grid), torch.Generator().manual_seed(seed),
                                          **dataclasses.asdict(cfg.mask))
    return MaskCounts(tuple(context.sum(dim=(1, 2)).tolist()), tuple(map(tuple, targets.sum(dim=(2, 3)).tolist())),
                      grid * grid, cfg.mask.policy)


def stats_of_masks(masks: Any, full: int) -> TokenStats:
    """:class:`TokenStats` of a ``MaskBatch``."""
    return TokenStats(
        batch=masks.batch_size, targets=masks.num_targets, full=full,
        context=tuple(masks.num_context().tolist()), context_pad=masks.context_idx.shape[1],
        target=tuple(tuple(r) for r in masks.num_target().tolist()), target_pad=masks.target_idx.shape[2],
        padded=masks.padded,
    )


ATTENTION_MODES = ("groups", "varlen", "rows")


def attention_mode(cfg: Config, device: str = "cuda") -> str:
    """How a run's padded batches attend (``tcjepa.models.attention.Packing``): whole padded rows when
    compiled, varlen flash attention on the packed tokens where its kernel runs (CUDA, bf16, a
    torch that has it), else length groups."""
    from tcjepa.models.attention import _varlen_kernel

    if cfg.train.compile:
        return "rows"
    if device == "cuda" and cfg.train.precision == "bf16" and _varlen_kernel() is not None:
        return "varlen"
    return "groups"
