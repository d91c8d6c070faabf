"""Joint-embedding predictive objective: I-JEPA (EMA teacher), TC-JEPA (I-JEPA whose predictor
reads the caption through a text conditioner: ``conditioner.enabled``) and frozen-teacher latent
prediction (SALT stage 2) share this file; they differ only by config.

Contract used by the training loop (``tcjepa.train``):
``method.model`` is the trainable module DeepSpeed wraps; ``method.text_inputs(captions, gen)``
tokenizes captions (None without a conditioner); ``method.loss(engine, images, masks, tokens)``
returns ``(loss, metrics)``; ``method.micro_losses(engine, images, masks, tokens, parts)`` yields
them per micro-batch under gradient accumulation (``tcjepa.accumulate``); ``method.after_step(engine, step, total)`` updates the teacher;
``method.teacher`` is the target encoder (outside the engine, fp32, never trained by SGD).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.tokenizers import (Tokenizer, Tokens, build_tokenizer, drop_captions, shuffle_captions,
                                       tokenize_caption_sets, trim_caption_slots)
from tcjepa.accumulate import micro_batch_losses, step_count, target_counts
from tcjepa.config import Config, ConfigError, captions_per_image, resolved_text_path, resolved_tokenizer
from tcjepa.distributed import engine_module, mean_count_over_ranks
from tcjepa.masks import MaskBatch
from tcjepa.models.conditioner import (
    CaptionCrossAttention, build_caption_conditioners, build_conditioners, overlap_regularisers,
)
from tcjepa.models.predictor import Predictor, sequence_valid
from tcjepa.models.text import TextEncoder, TextTower, build_text_encoder
from tcjepa.models.vit import VisionTransformer, build_encoder, gather_tokens
from tcjepa.schedules import momentum_at


def masked_mean(per_token: torch.Tensor, valid: torch.Tensor | None, count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``per_token`` over the real (``valid``) entries; ``count`` replaces the local
    count of real entries (:func:`tcjepa.distributed.mean_count_over_ranks`)."""
    if valid is None:
        return per_token.mean()
    w = valid.to(per_token.dtype)
    return (per_token * w).sum() / (w.sum() if count is None else count).clamp_min(1.0)


def per_token_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """The prediction loss of each target token, averaged over channels: ``smooth_l1`` (I-JEPA's
    code) or ``l2``, squared error (the "L2 distance" the TC-JEPA and I-JEPA papers write, read
    as JEPA code computes it). Training and the text scorers share it."""
    if kind == "l2":
        return (pred - target).pow(2).mean(-1)
    return F.smooth_l1_loss(pred, target, reduction="none").mean(-1)


def masked_smooth_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None,
                     count: torch.Tensor | None = None) -> torch.Tensor:
    """Smooth-L1 averaged over real (non-padded) target tokens and channels, as in I-JEPA."""
    return masked_mean(per_token_loss(pred, target), valid, count)


def caption_token_pairs(masks: MaskBatch, has_text: torch.Tensor) -> torch.Tensor:
    """[B, N, Q] bool: the real (caption, predictor token) pairs the regularisers average over."""
    B = masks.target_idx.size(0)
    tokens = sequence_valid(masks.context_valid, masks.target_valid).reshape(B, -1)  # [B, Q]
    captions = has_text if has_text.dim() == 2 else has_text[:, None]  # [B, N]
    return captions[:, :, None] & tokens[:, None, :]


HEALTH_TOKENS = 4096  # target tokens in the RankMe estimate: enough to reach full rank at ViT-H width


@dataclass(frozen=True)
class Objective:
    """How the student's loss is put together: the prediction loss, and the paper conditioner's
    regulariser weights (lambda, beta; unused without it)."""

    predict_loss: str = "smooth_l1"
    sparse_weight: float = 0.0
    consistency_weight: float = 0.0


class JEPAStudent(nn.Module):
    """Context encoder + predictor (+ text tower for TC-JEPA): what the optimiser trains."""

    def __init__(self, encoder: VisionTransformer, predictor: Predictor, text: TextTower | None = None,
                 objective: Objective = Objective()):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.text = text
        self.objective = objective
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, images: torch.Tensor, masks: MaskBatch, targets: torch.Tensor,
                tokens: Tokens | None = None, count: torch.Tensor | None = None,
                pair_count: torch.Tensor | None = None) -> torch.Tensor:
        """The loss; ``count``: the real target tokens per rank, averaged over the ranks;
        ``pair_count``: the same for the regularisers' (token, caption) pairs (None: this batch's,
        averaged over the ranks). Under gradient accumulation both count the whole step."""
        context_valid = masks.context_valid if masks.padded else None
        target_valid = masks.target_valid if masks.padded else None
        z = self.encoder(images, masks.context_idx, context_valid)
        text = self.text(tokens) if self.text is not None and tokens is not None else None
        pred = self.predictor(z, masks.context_idx, masks.target_idx, context_valid, target_valid, text)
        loss = masked_mean(per_token_loss(pred.float(), targets, self.objective.predict_loss), target_valid, count)
        if text is None:
            return loss
        stats = {"loss_predict": loss.detach()}
        if self._paper_variant():
            sparse, consistency = self._regularisers(masks, text.has_text, pair_count)
            loss = loss + self.objective.sparse_weight * sparse + self.objective.consistency_weight * consistency
            stats.update(cond_sparse=sparse.detach(), cond_consistency=consistency.detach())
        self.last_stats = {**stats, **self._conditioner_stats()}
        return loss

    def _paper_variant(self) -> bool:
        return any(isinstance(c, CaptionCrossAttention) for c in self.predictor.conditioners.values())

    def _regularisers(self, masks: MaskBatch, has_text: torch.Tensor, pair_count: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """L_sparse and L_consistency over every real (predictor token, caption) pair, normalised
        by the pair count averaged over the ranks (exact under data parallelism, as the
        prediction loss is)."""
        pairs = caption_token_pairs(masks, has_text)
        overlaps = [c.last_overlap for c in self.predictor.conditioners.values()]
        return overlap_regularisers(overlaps, pairs, mean_count_over_ranks(pairs) if pair_count is None else pair_count)

    @torch.no_grad()
    def _conditioner_stats(self) -> dict[str, torch.Tensor]:
        """Attention entropy (and gated_topk's gate magnitude), read here because ZeRO-3
        gathers the gate parameters only inside forward."""
        layers = list(self.predictor.conditioners.values())
        stats = {"cond_entropy": torch.stack([c.last_entropy for c in layers]).mean()}
        if not self._paper_variant():
            stats["cond_gate"] = torch.stack([c.gate_value().float().abs().mean() for c in layers]).mean()
        return stats


def build_text_encoder_for(cfg: Config, vocab_size: int) -> TextEncoder:
    """The text encoder the ``conditioner.text_*`` keys describe (TC-JEPA's and CLIP's tower)."""
    c = cfg.conditioner
    return build_text_encoder(
        c.text_encoder, vocab_size=vocab_size, context_length=c.context_length, width=c.text_width,
        depth=c.text_depth, num_heads=c.text_heads, path=resolved_text_path(c), open_clip_model=c.open_clip_model,
        frozen=c.text_frozen, init_std=cfg.model.init_std,
    )


def build_text_tower(cfg: Config, vocab_size: int, width: int) -> TextTower:
    return TextTower(build_text_encoder_for(cfg, vocab_size), width, cfg.model.init_std)


def build_tokenizer_for(cfg: Config) -> Tokenizer:
    kind, path = resolved_tokenizer(cfg.conditioner)
    return build_tokenizer(kind, path, cfg.conditioner.context_length)


def build_student(cfg: Config, tokenizer: Tokenizer | None = None, target_dim: int | None = None) -> JEPAStudent:
    """Encoder and predictor draw their initial weights exactly as I-JEPA's do; the text parts
    are initialised from a forked RNG stream, so enabling the conditioner changes nothing else
    (a fresh TC-JEPA equals I-JEPA bit for bit). ``target_dim``: the teacher's width when it is
    not the student's (a frozen teacher of another size)."""
    m = cfg.model
    encoder = build_encoder(m.encoder, m.image_size, m.depth, m.init_std)
    predictor = Predictor(
        embed_dim=encoder.embed_dim,
        grid=encoder.grid,
        width=m.predictor_width,
        depth=m.predictor_depth,
        num_heads=m.predictor_heads or encoder.num_heads,
        mlp_ratio=m.predictor_mlp_ratio or encoder.arch.mlp_ratio,
        init_std=m.init_std,
        out_dim=target_dim,
    )
    c = cfg.conditioner
    # weigh_against=sum: lambda and beta against the distance summed over the target's channels, which is
    # our per-channel mean times their number (under Adam the same training as summing the loss itself)
    per_channel = 1.0 / (target_dim or encoder.embed_dim) if c.weigh_against == "sum" else 1.0
    objective = Objective(cfg.train.predict_loss, c.sparse_weight * per_channel, c.consistency_weight * per_channel)
    if not c.enabled:
        return JEPAStudent(encoder, predictor, objective=objective)
    tokenizer = tokenizer or build_tokenizer_for(cfg)
    heads = c.heads or predictor.predictor_blocks[0].attn.num_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed + 7919)
        text = build_text_tower(cfg, tokenizer.vocab_size, predictor.width)
        predictor.conditioners = build_conditioners_for(cfg, heads, m.predictor_mlp_ratio or encoder.arch.mlp_ratio)
    return JEPAStudent(encoder, predictor, text, objective)


def build_conditioners_for(cfg: Config, heads: int, mlp_ratio: float) -> nn.ModuleDict:
    """The conditioners ``conditioner.variant`` asks for, keyed by predictor block (the student's
    and the planner's: one place decides which variant is built and with what)."""
    c, m = cfg.conditioner, cfg.model
    if c.variant == "paper":
        return build_caption_conditioners(m.predictor_width, m.predictor_depth, c.every, heads, mlp_ratio, m.init_std,
                                          c.logits, c.logit_scale, mlp=c.mlp, regularise_encoder=c.regularise_encoder)
    return build_conditioners(m.predictor_width, m.predictor_depth, c.every, heads, c.sparsity, c.top_k, c.qk_norm,
                              c.gate_scale, m.init_std)


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on weight matrices (ndim >= 2) only; biases and norms are excluded (as in I-JEPA).
    ``apply_wd`` tells the loop which groups follow the weight-decay schedule."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [
        {"params": decay, "weight_decay": 0.0, "apply_wd": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_wd": False},
    ]


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device`` (``train.precision: bf16``), or explicitly off (fp32:
    also when the caller itself runs under an autocast region)."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, as one foreach lerp (one pass over the
    teacher, half the time of a multiply and an add on the CPU)."""
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach().to(t.dtype) for p, t in zip(student.parameters(), t_params)]
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


class JEPA:
    """I-JEPA objective with an EMA (``teacher.update: ema``) or frozen teacher (SALT stage 2:
    ``teacher`` is a trained encoder, possibly of another size than the student)."""

    uses_masks = True

    def __init__(self, cfg: Config, teacher: VisionTransformer | None = None):
        self.cfg = cfg
        self.tokenizer = build_tokenizer_for(cfg) if cfg.conditioner.enabled else None
        self._empty: Tokens | None = None  # the tokenization of "", for dropped captions
        self.last_health: dict[str, float] = {}
        self.model = build_student(cfg, self.tokenizer, target_dim=teacher.embed_dim if teacher is not None else None)
        if teacher is None:
            teacher = copy.deepcopy(self.model.encoder)
        self.teacher = teacher.requires_grad_(False).eval()
        if cfg.teacher.target_blocks > len(teacher.blocks):  # a frozen teacher's depth is known only now
            raise ConfigError(f"teacher.target_blocks {cfg.teacher.target_blocks} exceeds the teacher's "
                              f"{len(teacher.blocks)} blocks")
        self.autocast_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None

    def eval_encoder(self, model: nn.Module) -> nn.Module:
        """The encoder a finished run is evaluated with: the EMA teacher, or the student when
        the teacher is frozen (then it is only the previous stage's model)."""
        return self.teacher if self.cfg.teacher.update == "ema" else model.encoder

    def final_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """What ``final/model.safetensors`` holds, by key prefix."""
        modules = {"encoder": model.encoder, "predictor": model.predictor, "teacher": self.teacher}
        if model.text is not None:
            modules["text"] = model.text
        return modules

    def to(self, device: torch.device) -> "JEPA":
        self.teacher.to(device)
        return self

    @torch.no_grad()
    def targets(self, images: torch.Tensor, masks: MaskBatch) -> torch.Tensor:
        """Layer-normed teacher features at the target positions: [B, T, Nt, D] in fp32. With
        ``teacher.target_blocks`` n > 1, the mean of the last n blocks' layer-normed outputs
        (data2vec's top-k average: earlier blocks keep more of each patch's own content)."""
        n = self.cfg.teacher.target_blocks
        with self._autocast(images.device):
            h = self.teacher(images, last_blocks=n)
        if n > 1:
            h = F.layer_norm(h.float(), (h.size(-1),)).mean(0)
        h = F.layer_norm(h.float(), (h.size(-1),))
        B, T, Nt = masks.target_idx.shape
        return gather_tokens(h, masks.target_idx.reshape(B, T * Nt)).reshape(B, T, Nt, -1)

    def text_inputs(self, captions: list[str] | list[list[str]], gen: torch.Generator,
                    tokens: Tokens | None = None) -> Tokens | None:
        """Tokenized captions with caption dropout (``conditioner.caption_dropout``, each caption
        independently) drawn from ``gen``; None for methods without a conditioner. Dropped
        captions train the text-free path. ``captions``: one per image, or a list per image with
        ``conditioner.max_captions`` > 1; ``tokens``: the captions already tokenized (by the
        loader's workers)."""
        if self.tokenizer is None:
            return None
        p, n = self.cfg.conditioner.caption_dropout, captions_per_image(self.cfg.conditioner)
        if tokens is None:
            tokens = tokenize_caption_sets(self.tokenizer, captions, n) if n > 1 else self.tokenizer(captions)
        if self.cfg.conditioner.shuffle_captions:  # the control: another image's captions, a new pairing each step
            tokens = shuffle_captions(tokens, gen)
        if p > 0:
            drop = torch.rand(tokens.has_text.shape, generator=gen) < p
            if self._empty is None:
                self._empty = self.tokenizer([""])
            tokens = drop_captions(tokens, drop, self._empty)
        return trim_caption_slots(tokens)

    def micro_losses(self, engine: Any, images: torch.Tensor, masks: MaskBatch, tokens: Tokens | None,
                     parts: int, health: bool = False) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The step's ``parts`` micro-batch losses, one at a time (each is back-propagated before
        the next is computed), each normalised by the whole step's counts (tcjepa.accumulate)."""
        counts = target_counts(masks, parts)
        if parts > 1 and tokens is not None and engine_module(engine)._paper_variant():
            counts["pair_count"] = step_count(caption_token_pairs(masks, tokens.has_text), parts)
        yield from micro_batch_losses(functools.partial(self.loss, engine), images, masks, tokens, parts, health, counts)

    def loss(self, engine: Any, images: torch.Tensor, masks: MaskBatch, tokens: Tokens | None = None,
             health: bool = False, count: torch.Tensor | None = None, pair_count: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's loss and metrics to average over the logging window. With ``health`` also
        ``self.last_health``: the effective rank (RankMe) of this step's target tokens, a host
        computation meant for logging steps only. ``count`` and ``pair_count`` replace this
        batch's own counts (averaged over the ranks) under gradient accumulation."""
        targets = self.targets(images, masks)
        if count is None and masks.padded:
            count = mean_count_over_ranks(masks.target_valid)
        with self._autocast(images.device):
            loss = engine(images, masks, targets, tokens, count, pair_count)
        metrics = {"target_std": targets.std(dim=(0, 1, 2)).mean()}
        if tokens is not None:
            metrics.update(engine_module(engine).last_stats)
        if health:
            from tcjepa.eval.health import rankme

            real = targets.detach()[masks.target_valid][:HEALTH_TOKENS]  # [<= HEALTH_TOKENS, D]
            self.last_health = {"target_rankme": rankme(real)}
        return loss, metrics

    def after_step(self, engine: Any, step: int, total: int) -> dict[str, float]:
        """EMA update after optimiser step ``step`` (0-based); no-op for a frozen teacher."""
        if self.cfg.teacher.update != "ema":
            return {}
        m = momentum_at(step, total, start=self.cfg.teacher.momentum, final=self.cfg.teacher.final_momentum)
        student = engine.module.encoder
        if getattr(engine, "zero_optimization_partition_weights", lambda: False)():
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(student.parameters())):
                ema_update(self.teacher, student, m)
        else:
            ema_update(self.teacher, student, m)
        return {"momentum": m}

    def _autocast(self, device: torch.device):
        return autocast(device, self.autocast_dtype)
