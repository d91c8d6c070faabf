"""Image-text scores for zero-shot classification and retrieval, behind one small interface.

A scorer answers "how well does text ``j`` match image ``i``" for a batch of images and a list
of texts: ``score(images, texts) -> [B, K]``, higher is better. Zero-shot and retrieval are
written against that interface only, so a contrastive model (CLIP/SigLIP: cosine similarity of
pooled embeddings, prompts averaged in embedding space) plugs in by adding one scorer class and
one branch in :func:`build_scorer`; nothing else changes.

:class:`ContrastiveScorer` serves CLIP / SigLIP runs. :class:`PredictorScorer` serves TC-JEPA
runs, which have no joint embedding space. It uses the thing TC-JEPA *was* trained to do: predict the teacher's features of masked
regions from the visible context and the caption. For one image and ``M`` fixed masks:

1. the (EMA or frozen) teacher encodes the whole image; its layer-normed features at the
   target blocks are the targets, exactly as in training (``JEPA.targets``);
2. the student's context encoder encodes the context block;
3. for each candidate text, the text-conditioned predictor predicts the target features, and
   the error is the training loss (smooth-L1, averaged over channels and target patches);
4. the same is done with no text (the identity-conditioned, I-JEPA prediction);

and ``score = mean over masks of (error without text - error with the text)``: how much the
text *reduces* the prediction error. For one image, subtracting the no-text error changes no
ranking (it is the same for every text); across images (text-to-image retrieval) it removes how
hard each image is to predict in the first place, so an easy image is not retrieved for every
caption. The masks are drawn once from ``seed`` with the run's mask settings and shared by every
image, so a score depends only on the image and the text, not on batch order or size.

Cost: one predictor pass per (image, text, mask), so this is meant for tens of candidates
(classes, or captions in a retrieval block), not thousands.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tcjepa.config import Config, ConfigError
from tcjepa.eval.common import Split, default_device, read_split
from tcjepa.models.text import TextFeatures


class ImageTextScorer(Protocol):
    """``score(images, texts)``: normalised float images [B, 3, H, W] x K texts -> [B, K]."""

    name: str

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor: ...

    def score_classes(self, images: torch.Tensor, prompts: Sequence[Sequence[str]]) -> torch.Tensor: ...


def _tile(x: torch.Tensor, times: int) -> torch.Tensor:
    """[n, ...] -> [times * n, ...] with row ``b * n + j`` = ``x[j]``."""
    return x.unsqueeze(0).expand(times, *x.shape).reshape(times * x.shape[0], *x.shape[1:])


def per_sample_error(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None,
                     loss: str = "smooth_l1") -> torch.Tensor:
    """The JEPA prediction loss the run trained with (``train.predict_loss``: smooth-L1 or squared
    error over channels, mean over real target patches), per sample: pred/target [B, T, Nt, D],
    valid [B, T, Nt] or None -> [B]. (The paper conditioner's regularisers are not part of it.)"""
    from tcjepa.methods.jepa import per_token_loss

    per_token = per_token_loss(pred.float(), target, loss).flatten(1)
    if valid is None:
        return per_token.mean(1)
    w = valid.flatten(1).to(per_token.dtype)
    return (per_token * w).sum(1) / w.sum(1).clamp_min(1.0)


class PredictorScorer:
    """TC-JEPA's text-conditioned prediction error as an image-text score (module docstring)."""

    name = "predictor"

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: Config, num_masks: int = 2, seed: int = 0,
                 max_rows: int = 256, device: torch.device | str = "cpu"):
        from tcjepa.masks import sample_masks
        from tcjepa.methods.jepa import build_tokenizer_for

        if student.text is None:
            raise ValueError("PredictorScorer needs a text-conditioned student (TC-JEPA)")
        self.device = torch.device(device)
        self.student = student.to(self.device).eval()
        self.teacher = teacher.to(self.device).eval()
        self.tokenizer = build_tokenizer_for(cfg)
        self.predict_loss = cfg.train.predict_loss
        self.max_rows = max_rows
        grid = student.encoder.grid
        self.masks = sample_masks(num_masks, grid, torch.Generator().manual_seed(seed), **dataclasses.asdict(cfg.mask))

    def _mask(self, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Mask ``m``'s context indices [Nc] (padding dropped: every image shares it), target
        indices [T, Nt] and target validity (None when no block is padded)."""
        mb = self.masks
        ctx = mb.context_idx[m][mb.context_valid[m]]
        tgt, tv = mb.target_idx[m], mb.target_valid[m]
        return ctx.to(self.device), tgt.to(self.device), (None if bool(tv.all()) else tv.to(self.device))

    @torch.no_grad()
    def errors(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Prediction error [B, K] of every (image, text) pair, averaged over the masks."""
        images = images.to(self.device)
        B, K = images.size(0), len(texts)
        text = self.student.text(self.tokenizer(list(texts)).to(self.device))
        teacher = self.teacher(images).float()
        teacher = F.layer_norm(teacher, (teacher.size(-1),))
        total = torch.zeros(B, K, device=self.device)
        chunk = max(1, self.max_rows // max(B, 1))
        for m in range(len(self.masks.context_idx)):
            ctx, tgt, tv = self._mask(m)
            T, Nt = tgt.shape
            z = self.student.encoder(images, ctx.expand(B, -1))  # [B, Nc, D]
            targets = teacher[:, tgt.reshape(-1)].reshape(B, T, Nt, -1)
            for k0 in range(0, K, chunk):
                k1 = min(K, k0 + chunk)
                n = k1 - k0
                rows = B * n  # row b * n + j: image b, text k0 + j
                zz = z.repeat_interleave(n, dim=0)
                tf = TextFeatures(_tile(text.features[k0:k1], B), _tile(text.valid[k0:k1], B),
                                  _tile(text.has_text[k0:k1], B))
                valid = None if tv is None else tv.expand(rows, T, Nt)
                pred = self.student.predictor(zz, ctx.expand(rows, -1), tgt.expand(rows, T, Nt), None, valid, tf)
                tt = targets.repeat_interleave(n, dim=0)
                total[:, k0:k1] += per_sample_error(pred, tt, valid, self.predict_loss).view(B, n)
        return (total / len(self.masks.context_idx)).cpu()

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Error reduction by each text: error(no text) - error(text), [B, K]."""
        err = self.errors(images, [""] + list(texts))
        return err[:, :1] - err[:, 1:]

    def score_classes(self, images: torch.Tensor, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        """[B, C]: each class's score averaged over its prompts (templates)."""
        flat = [p for ps in prompts for p in ps]
        scores = self.score(images, flat)
        out, i = [], 0
        for ps in prompts:
            out.append(scores[:, i : i + len(ps)].mean(1))
            i += len(ps)
        return torch.stack(out, 1)


class ContrastiveScorer:
    """CLIP / SigLIP: cosine similarity of the L2-normalised embeddings (the logit scale and bias
    change no ranking). A class's embedding is the renormalised mean of its prompts' normalised
    embeddings, open_clip's ``build_zero_shot_classifier`` convention. The ``*_by_width`` methods
    also score every Matryoshka prefix (the first ``d`` channels, renormalised) from the same
    forward passes."""

    name = "contrastive"

    def __init__(self, model: nn.Module, cfg: Config, device: torch.device | str = "cpu"):
        from tcjepa.methods.contrastive import embedding_dims
        from tcjepa.methods.jepa import build_tokenizer_for

        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = build_tokenizer_for(cfg)
        self.dims = embedding_dims(cfg)  # every width the loss trained, the full one last

    @torch.no_grad()
    def _embed(self, images: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width, unnormalised image and text embeddings, one forward each; every width is a
        slice of them."""
        img = self.model.encode_image(images.to(self.device)).float().cpu()
        txt = self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float().cpu()
        return img, txt

    def score_by_width(self, images: torch.Tensor, texts: Sequence[str]) -> dict[int, torch.Tensor]:
        """[B, K] cosine similarities at every trained width (``self.dims``)."""
        img, txt = self._embed(images, texts)
        return {d: F.normalize(img[:, :d], dim=-1) @ F.normalize(txt[:, :d], dim=-1).T for d in self.dims}

    def score_classes_by_width(self, images: torch.Tensor, prompts: Sequence[Sequence[str]]) -> dict[int, torch.Tensor]:
        """[B, C] class scores at every trained width."""
        img, txt = self._embed(images, [p for ps in prompts for p in ps])
        out = {}
        for d in self.dims:
            flat, classes, i = F.normalize(txt[:, :d], dim=-1), [], 0
            for ps in prompts:
                classes.append(F.normalize(flat[i : i + len(ps)].mean(0), dim=-1))
                i += len(ps)
            out[d] = F.normalize(img[:, :d], dim=-1) @ torch.stack(classes, 1)
        return out

    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        return self.score_by_width(images, texts)[self.dims[-1]]

    def score_classes(self, images: torch.Tensor, prompts: Sequence[Sequence[str]]) -> torch.Tensor:
        return self.score_classes_by_width(images, prompts)[self.dims[-1]]


def build_scorer(checkpoint: str | Path, task: str, num_masks: int = 2, seed: int = 0,
                 device: torch.device | str = "cpu") -> ImageTextScorer:
    """The image-text scorer a finished run supports; a :class:`ConfigError` (``error:`` on the
    command line) for runs that cannot score text against images."""
    from tcjepa.checkpoint import load_encoder, load_run_config, load_student

    cfg = load_run_config(checkpoint)
    if cfg.train.method == "contrastive":
        from tcjepa.checkpoint import load_dual_encoder

        model, cfg = load_dual_encoder(checkpoint)
        return ContrastiveScorer(model, cfg, device=device)
    if cfg.conditioner.enabled:
        student, cfg = load_student(checkpoint)
        return PredictorScorer(student, load_encoder(checkpoint, "teacher"), cfg, num_masks, seed, device=device)
    raise ConfigError(
        f"{checkpoint}: eval {task} needs a model that relates images and text, and this run has none "
        f"(train.method {cfg.train.method}, conditioner.enabled false: an image-only model). Evaluate a TC-JEPA run "
        "(conditioner.enabled: true) or a contrastive one, or use eval probe / eval vqa, which work on any image encoder"
    )


def scored_split(task: str, checkpoint: str | Path, data: str, val_data: str, num_masks: int, seed: int,
                 max_samples: int) -> tuple[ImageTextScorer, Split, str, str]:
    """What zero-shot and retrieval both start from: the run's scorer and the split it is scored
    on (``val_data``, else ``data``: nothing is trained), with that split's SHARDS and CLI key."""
    from tcjepa.checkpoint import load_run_config

    run_cfg = load_run_config(checkpoint)
    scorer = build_scorer(checkpoint, task, num_masks, seed, default_device())
    shards, data_key = (val_data, "--val-data") if val_data else (data, "--data")
    split = read_split(shards, run_cfg.model.image_size, data_key, max_samples, run_cfg.data.max_skip_rate)
    return scorer, split, shards, data_key
