"""Contrastive image-text pretraining: CLIP (softmax, open_clip ``ClipLoss``) and SigLIP
(sigmoid, open_clip ``SigLipLoss``), with an optional Matryoshka embedding.

Image tower: our ViT, mean-pooled over patches (it has no class token), then a linear
projection. Text tower: the encoder the ``conditioner.text_*`` keys describe (shared with
TC-JEPA), pooled over real tokens (mean for bidirectional encoders, the last real token, i.e.
EOT, for open_clip's causal tower as CLIP does), then a linear projection. Both embeddings are
L2-normalised before the loss. The logit scale (and SigLIP's bias) are learned, initialised as
open_clip does (ln(1/0.07) for CLIP; ln(10) and -10 for SigLIP) and clamped to
``[0, ln(contrastive.max_logit_scale)]`` after every optimiser step, as ``open_clip_train`` does.

Across ranks the losses gather as open_clip does: ``ClipLoss(gather_with_grad=True)`` computes the
global-batch loss on every rank, and ``SigLipLoss`` exchanges text features between neighbours.

Matryoshka (Kusupati et al., 2022): with ``contrastive.matryoshka_dims = [d1, d2, ...]`` the loss
is the mean of the loss at every nested prefix ``embedding[:, :d]`` (each renormalised) and at the
full width, so one model serves every listed embedding size.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.tokenizers import Tokenizer, Tokens
from tcjepa.accumulate import split_micro_batches
from tcjepa.config import Config
from tcjepa.distributed import engine_module
from tcjepa.masks import MaskBatch
from tcjepa.methods.jepa import autocast, build_text_encoder_for, build_tokenizer_for
from tcjepa.models.text import OpenCLIPTextEncoder, TextEncoder
from tcjepa.models.vit import VisionTransformer, build_encoder

HEALTH_ROWS = 4096


def embedding_dims(cfg: Config) -> list[int]:
    """The prefix widths the loss (and evaluation) uses: the Matryoshka dims plus the full width."""
    c = cfg.contrastive
    return sorted(set(c.matryoshka_dims) | {c.embed_dim})


def default_logit_scale(loss: str) -> float:
    return math.log(10.0) if loss == "siglip" else math.log(1 / 0.07)


class ContrastiveHead(nn.Module):
    """Projections into the joint space, the learned logit scale and (SigLIP) bias."""

    def __init__(self, image_width: int, text_width: int, embed_dim: int, init_logit_scale: float,
                 init_logit_bias: float | None, init_std: float = 0.02):
        super().__init__()
        self.image_proj = nn.Linear(image_width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_width, embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=image_width ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=text_width ** -0.5)
        # shape [1], not []: DeepSpeed broadcasts and partitions parameters through byte views
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.full((1,), float(init_logit_bias))) if init_logit_bias is not None else None


def pool_text(h: torch.Tensor, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, L, W] token features -> [B, W]: the last real token for a causal encoder (EOT, where
    CLIP pools: the last True of the mask, which a mask with holes does not put at ``sum - 1``),
    else the mean over real tokens (an empty caption pools to zeros)."""
    if causal:
        positions = torch.arange(mask.size(1), device=mask.device)
        last = torch.where(mask, positions, 0).amax(1)
        return h[torch.arange(h.size(0), device=h.device), last]
    w = mask.to(h.dtype).unsqueeze(-1)
    return (h * w).sum(1) / w.sum(1).clamp_min(1.0)


class DualEncoder(nn.Module):
    """Image tower + text tower + head: what the optimiser trains."""

    def __init__(self, encoder: VisionTransformer, text: TextEncoder, head: ContrastiveHead):
        super().__init__()
        self.encoder = encoder
        self.text = text
        self.head = head
        self.causal_text = isinstance(text, OpenCLIPTextEncoder)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings [B, E]."""
        return self.head.image_proj(self.encoder(images).mean(1))

    def encode_text(self, tokens: Tokens) -> torch.Tensor:
        """Unnormalised text embeddings [B, E]."""
        h = self.text(tokens.ids, tokens.mask)
        return self.head.text_proj(pool_text(h, tokens.mask, self.causal_text))

    def forward(self, images: torch.Tensor, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor | None]:
        """Embeddings and ``exp(logit_scale)``, bias. The scale is read here because ZeRO-3
        gathers the head's parameters only inside forward."""
        bias = self.head.logit_bias
        return self.encode_image(images), self.encode_text(tokens), self.head.logit_scale.exp(), bias


def build_dual_encoder(cfg: Config, tokenizer: Tokenizer) -> DualEncoder:
    """The image encoder draws its weights exactly as the JEPA student's does; the text tower and
    head come from a forked RNG stream."""
    m, c = cfg.model, cfg.contrastive
    encoder = build_encoder(m.encoder, m.image_size, m.depth, m.init_std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 7919)
        text = build_text_encoder_for(cfg, tokenizer.vocab_size)
        scale = c.init_logit_scale if c.init_logit_scale is not None else default_logit_scale(c.loss)
        head = ContrastiveHead(encoder.embed_dim, text.width, c.embed_dim, scale,
                               c.init_logit_bias if c.loss == "siglip" else None, m.init_std)
    return DualEncoder(encoder, text, head)


class MatryoshkaLoss(nn.Module):
    """An open_clip loss applied at every nested prefix of the embeddings; returns the mean and
    the per-width losses."""

    def __init__(self, loss: nn.Module, dims: list[int]):
        super().__init__()
        self.loss = loss
        self.dims = dims

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        per_dim = {}
        for d in self.dims:
            per_dim[d] = self.loss(F.normalize(image[:, :d], dim=-1), F.normalize(text[:, :d], dim=-1), scale, bias)
        return torch.stack(list(per_dim.values())).mean(), per_dim


def build_loss(cfg: Config, rank: int, world_size: int) -> MatryoshkaLoss:
    from open_clip.loss import ClipLoss, SigLipLoss

    if cfg.contrastive.loss == "siglip":
        base: nn.Module = SigLipLoss(rank=rank, world_size=world_size)
    else:
        base = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world_size)
    return MatryoshkaLoss(base, embedding_dims(cfg))


@torch.no_grad()
def clamp_logit_scale(engine: Any, max_scale: float) -> None:
    """``logit_scale <- clamp(logit_scale, 0, ln max_scale)`` on the optimiser's master copy, as
    ``open_clip_train`` clamps after every step. ZeRO 1-3 keep the master weights in their own
    partitions, which DeepSpeed's ``safe_*_full_fp32_param`` reach; the module's working copy (what
    the next forward reads) is clamped too. No host sync."""
    module = engine_module(engine)
    param = module.head.logit_scale
    hi = math.log(max_scale)
    stage = getattr(engine, "zero_optimization_stage", lambda: 0)()
    if stage > 0:
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        safe_set_full_fp32_param(param, safe_get_full_fp32_param(param).clamp(0.0, hi))
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.clamp_(0.0, hi)
    else:
        param.data.clamp_(0.0, hi)


class Contrastive:
    """CLIP / SigLIP through the one training loop (module docstring)."""

    uses_masks = False
    teacher = None

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.tokenizer = build_tokenizer_for(cfg)
        self.model = build_dual_encoder(cfg, self.tokenizer)
        self.criterion = build_loss(cfg, rank, world_size)
        self.last_health: dict[str, float] = {}
        self.autocast_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None

    def to(self, device: torch.device) -> "Contrastive":
        return self

    def text_inputs(self, captions: list[str], gen: torch.Generator, tokens: Tokens | None = None) -> Tokens:
        """Every caption, tokenized (no caption dropout: the caption is the training signal)."""
        return tokens if tokens is not None else self.tokenizer(captions)

    def embed(self, engine: Any, images: torch.Tensor, tokens: Tokens
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Image and text embeddings, logit scale and bias, in fp32."""
        with autocast(images.device, self.autocast_dtype):
            image, text, scale, bias = engine(images, tokens)
        return image.float(), text.float(), scale.float(), None if bias is None else bias.float()

    def loss(self, engine: Any, images: torch.Tensor, masks: MaskBatch | None, tokens: Tokens | None = None,
             health: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if tokens is None:
            raise ValueError("contrastive training needs captions")
        image, text, scale, bias = self.embed(engine, images, tokens)
        loss, per_dim = self.criterion(image, text, scale, bias)
        return loss, self._metrics(image, scale, bias, per_dim, health)

    def _metrics(self, image: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 per_dim: dict[int, torch.Tensor], health: bool) -> dict[str, torch.Tensor]:
        metrics = {"logit_scale": scale.detach().reshape(())}
        if bias is not None:
            metrics["logit_bias"] = bias.detach().reshape(())
        if len(per_dim) > 1:
            metrics.update({f"loss_d{d}": v.detach() for d, v in per_dim.items()})
        if health:
            from tcjepa.eval.health import rankme

            self.last_health = {"feature_rankme": rankme(image.detach()[:HEALTH_ROWS])}
        return metrics

    def micro_losses(self, engine: Any, images: torch.Tensor, masks: MaskBatch | None, tokens: Tokens | None,
                     parts: int, health: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The step's ``parts`` micro-batch losses through a gradient cache (tcjepa.accumulate):
        every micro-batch embedded without gradients, the loss and its gradient with respect to
        the embeddings taken on the whole batch, then each micro-batch embedded again and given
        a surrogate whose gradient is its share (its rows of the embedding gradients; 1 / parts
        of the scale's and bias's, which every micro-batch outputs) and whose value is the loss."""
        if parts == 1:
            yield self.loss(engine, images, masks, tokens, health)
            return
        if tokens is None:
            raise ValueError("contrastive training needs captions")
        chunks = split_micro_batches(images, None, tokens, parts)
        with torch.no_grad():
            cached = [self.embed(engine, c.images, c.tokens) for c in chunks]
        image, text = (torch.cat([c[i] for c in cached]).requires_grad_() for i in (0, 1))
        scale = cached[0][2].clone().requires_grad_()
        bias = None if cached[0][3] is None else cached[0][3].clone().requires_grad_()
        leaves = [image, text, scale] + ([bias] if bias is not None else [])
        with torch.enable_grad():
            loss, per_dim = self.criterion(image, text, scale, bias)
            grads = torch.autograd.grad(loss, leaves)
        metrics = self._metrics(image, scale, bias, per_dim, health)
        loss = loss.detach()
        size = images.size(0) // parts
        for k, c in enumerate(chunks):
            outputs = self.embed(engine, c.images, c.tokens)
            rows = slice(k * size, (k + 1) * size)
            shares = [grads[0][rows], grads[1][rows]] + [g / parts for g in grads[2:]]
            surrogate = sum((o * g).sum() for o, g in zip(outputs, shares))
            # DeepSpeed divides every micro-batch loss by `parts`: scale back; the value is the loss
            yield parts * surrogate - (parts * surrogate).detach() + loss, metrics

    def after_step(self, engine: Any, step: int, total: int) -> dict[str, float]:
        clamp_logit_scale(engine, self.cfg.contrastive.max_logit_scale)
        return {}

    def eval_encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder

    def final_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {"encoder": model.encoder, "text": model.text, "head": model.head}
