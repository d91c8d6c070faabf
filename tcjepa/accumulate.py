"""Gradient accumulation: one optimiser step over ``train.grad_accum_steps`` micro-batches.

The global batch stays ``train.batch_size``; each rank loads its share (``batch_size / ranks``)
once per step, with its masks and caption dropout drawn for the whole share, then runs it as
``grad_accum_steps`` micro-batches through DeepSpeed's own accumulation (``engine.backward`` and
``engine.step`` per micro-batch; DeepSpeed divides each loss by the step count and updates at the
boundary). Everything per step (masks, schedules, EMA, logging) stays per optimiser step.

What keeps it exact (the same update as one step on the whole batch):

- Losses that average over a varying number of real entries (padded target tokens, caption-token
  pairs) divide each micro-batch's sum by the whole step's count, averaged over the ranks and the
  micro-batches (:func:`step_count`), so the micro-batch losses add up to the global mean.
- Contrastive losses compare every image with every caption of the batch, which micro-batches
  cannot do on their own: the method embeds all micro-batches without gradients, takes the loss
  and its gradient with respect to the embeddings on the whole batch, and then runs each
  micro-batch again with gradients, back-propagating those cached embedding gradients (the
  gradient cache of Gao et al., 2021; one extra forward pass per micro-batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from data_pipelines.tokenizers import Tokens
from tcjepa.distributed import mean_count_over_ranks
from tcjepa.masks import MaskBatch


LossAndMetrics = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class MicroBatch:
    images: torch.Tensor
    masks: MaskBatch | None
    tokens: Tokens | None


def token_rows(tokens: Tokens | None, start: int, end: int) -> Tokens | None:
    return None if tokens is None else Tokens(tokens.ids[start:end], tokens.mask[start:end], tokens.has_text[start:end])


def split_micro_batches(images: torch.Tensor, masks: MaskBatch | None, tokens: Tokens | None, parts: int
                        ) -> list[MicroBatch]:
    """``parts`` consecutive slices of equal size, cut from the one draw of masks and captions
    that a single step over the whole batch would use (:meth:`MaskBatch.split`)."""
    if parts == 1:
        return [MicroBatch(images, masks, tokens)]
    n = images.size(0)
    if n % parts:
        raise ValueError(f"a batch of {n} does not split into {parts} micro-batches")
    size = n // parts
    mask_parts = masks.split(parts) if masks is not None else [None] * parts
    return [MicroBatch(images[a:a + size], m, token_rows(tokens, a, a + size))
            for a, m in zip(range(0, n, size), mask_parts)]


def step_count(valid: torch.Tensor, parts: int) -> torch.Tensor:
    """The real entries of ``valid`` (the rank's whole step) averaged over the ranks and the
    ``parts`` micro-batches: dividing each micro-batch's summed loss by it makes the losses that
    DeepSpeed averages (over micro-batches, then ranks) the mean over every real entry."""
    return mean_count_over_ranks(valid) / parts


def target_counts(masks: MaskBatch, parts: int) -> dict[str, torch.Tensor]:
    """``{"count": ...}``, the whole step's target count (:func:`step_count`), where the
    micro-batch losses need it: several micro-batches of a padded batch; else ``{}`` (each
    micro-batch's own count is the right one)."""
    return {"count": step_count(masks.target_valid, parts)} if parts > 1 and masks.padded else {}


def micro_batch_losses(loss: Callable[..., LossAndMetrics], images: torch.Tensor, masks: MaskBatch | None,
                       tokens: Tokens | None, parts: int, health: bool, counts: dict[str, torch.Tensor]
                       ) -> Iterator[LossAndMetrics]:
    """``loss(images, masks, tokens, health, **counts)`` of each micro-batch in turn (``health``
    for the first only), computed lazily: each is back-propagated before the next one runs."""
    for i, part in enumerate(split_micro_batches(images, masks, tokens, parts)):
        yield loss(part.images, part.masks, part.tokens, health and i == 0, **counts)
