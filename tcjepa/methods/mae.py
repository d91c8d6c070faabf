"""Masked pixel reconstruction: the teacher of the frozen-teacher two-stage recipe (SALT stage 1).

The encoder sees the context block of the I-JEPA multi-block masks; a decoder shaped like the
JEPA predictor (``model.predictor_*``: context tokens plus one mask token per target patch, each
target block in its own sequence) predicts the *pixels* of the target patches. Targets are each
patch's pixels normalised by their own mean and variance (MAE's ``norm_pix_loss``) and the loss
is the mean squared error over masked (target) patches only, as in MAE and SALT's stage 1. Stage
2 (``tcjepa.methods.jepa`` with ``teacher.update: frozen``) then predicts this encoder's latents.

Same loop contract as :class:`tcjepa.methods.jepa.JEPA` (see ``tcjepa.methods``); there is no
teacher and no text.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import torch
from torch import nn

from data_pipelines.tokenizers import Tokens
from tcjepa.config import Config
from tcjepa.accumulate import micro_batch_losses, target_counts
from tcjepa.distributed import engine_module, mean_count_over_ranks
from tcjepa.masks import MaskBatch
from tcjepa.methods.jepa import autocast, masked_mean
from tcjepa.models.predictor import Predictor
from tcjepa.models.vit import VisionTransformer, build_encoder, gather_tokens

HEALTH_TOKENS = 4096


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, patch * patch * C], patches row-major as ``PatchEmbed`` orders them."""
    B, C, H, W = images.shape
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, h * w, patch * patch * C)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, N, patch * patch * C] -> [B, C, H, W]."""
    B = patches.size(0)
    h, w = grid
    x = patches.reshape(B, h, w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, h * patch, w * patch)


def pixel_targets(images: torch.Tensor, target_idx: torch.Tensor, patch: int, norm_pix: bool) -> torch.Tensor:
    """Pixels of the target patches, [B, T, Nt, patch * patch * 3] in fp32; with ``norm_pix``
    each patch is normalised by its own mean and variance (eps 1e-6, as MAE)."""
    pix = patchify(images.float(), patch)
    B, T, Nt = target_idx.shape
    pix = gather_tokens(pix, target_idx.reshape(B, T * Nt)).reshape(B, T, Nt, -1)
    if norm_pix:
        mean = pix.mean(-1, keepdim=True)
        var = pix.var(-1, keepdim=True, unbiased=True)
        pix = (pix - mean) / (var + 1e-6).sqrt()
    return pix


class PixelReconstructor(nn.Module):
    """Encoder + pixel decoder: what the optimiser trains in stage 1."""

    def __init__(self, encoder: VisionTransformer, decoder: Predictor, norm_pix: bool = True):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.norm_pix = norm_pix
        self.last_features: torch.Tensor | None = None  # this step's context features, for health logging

    def forward(self, images: torch.Tensor, masks: MaskBatch, count: torch.Tensor | None = None) -> torch.Tensor:
        """The loss; ``count``: the real target patches per rank, averaged over the ranks."""
        context_valid = masks.context_valid if masks.padded else None
        target_valid = masks.target_valid if masks.padded else None
        z = self.encoder(images, masks.context_idx, context_valid)
        self.last_features = z.detach()
        pred = self.decoder(z, masks.context_idx, masks.target_idx, context_valid, target_valid)
        target = pixel_targets(images, masks.target_idx, self.encoder.patch_size, self.norm_pix)
        return masked_mean((pred.float() - target).pow(2).mean(-1), target_valid, count)


def build_reconstructor(cfg: Config) -> PixelReconstructor:
    """The encoder draws its weights exactly as the JEPA student's does (same seed, same order)."""
    m = cfg.model
    encoder = build_encoder(m.encoder, m.image_size, m.depth, m.init_std)
    decoder = Predictor(
        embed_dim=encoder.embed_dim, grid=encoder.grid, width=m.predictor_width, depth=m.predictor_depth,
        num_heads=m.predictor_heads or encoder.num_heads, mlp_ratio=m.predictor_mlp_ratio or encoder.arch.mlp_ratio,
        init_std=m.init_std,
        out_dim=encoder.patch_size ** 2 * 3,
    )
    return PixelReconstructor(encoder, decoder, cfg.mae.norm_pix_loss)


class MAE:
    """Masked pixel reconstruction over the I-JEPA masks (module docstring)."""

    uses_masks = True
    tokenizer = None
    teacher = None

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model = build_reconstructor(cfg)
        self.last_health: dict[str, float] = {}
        self.autocast_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None

    def to(self, device: torch.device) -> "MAE":
        return self

    def text_inputs(self, captions: list[str], gen: torch.Generator, tokens: Tokens | None = None) -> None:
        return None

    def micro_losses(self, engine: Any, images: torch.Tensor, masks: MaskBatch, tokens: Tokens | None,
                     parts: int, health: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The step's ``parts`` micro-batch losses, normalised by the whole step's target count."""
        yield from micro_batch_losses(functools.partial(self.loss, engine), images, masks, None, parts, health,
                                      target_counts(masks, parts))

    def loss(self, engine: Any, images: torch.Tensor, masks: MaskBatch, tokens: Tokens | None = None,
             health: bool = False, count: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``count`` replaces this batch's target count (averaged over the ranks) under accumulation."""
        if count is None and masks.padded:
            count = mean_count_over_ranks(masks.target_valid)
        with autocast(images.device, self.autocast_dtype):
            loss = engine(images, masks, count)
        if health:
            from tcjepa.eval.health import rankme

            module = engine_module(engine)
            z = module.last_features
            self.last_health = {"feature_rankme": rankme(z[masks.context_valid][:HEALTH_TOKENS])}
        return loss, {}

    def after_step(self, engine: Any, step: int, total: int) -> dict[str, float]:
        return {}

    def eval_encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder

    def final_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"encoder": model.encoder, "decoder": model.decoder}
