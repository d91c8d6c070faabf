"""``tcjepa eval segment``: semantic segmentation with a linear head on frozen patch features.

DINOv2's linear protocol: the frozen encoder's patch features of both splits are extracted once
(fp16); a linear classifier per patch (optionally after a BatchNorm) gives logits on the patch
grid, bilinearly upsampled to the label maps' resolution, trained with a per-pixel cross-entropy
that leaves out ignore pixels (255). As the linear probe does, the heads read the features
standardised with the train split's channel statistics, so one learning-rate grid suits every
encoder. ``segment.last_blocks`` > 1 concatenates the last blocks'
outputs, each through the final LayerNorm (DINOv2's "multi-layer" option). As in the linear
probe, one head per learning rate trains on the same batches; the head is chosen by mIoU on a
held-out slice of the train split and only then scored on the val split.

Labels are ``KEY.seg.png`` maps (class ids, 0 = background, 255 = ignore) with names from
``KEY.json`` ``seg_classes``. mIoU averages the classes present in the val labels; the result also
reports what predicting the most frequent train class everywhere scores (``majority_*``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.labels import IGNORE
from data_pipelines.loader import DataError
from tcjepa.config import ENCODER_CHOICES_TEXT, EVAL_ENCODERS, ConfigError, to_dict
from tcjepa.eval.common import (default_device, eval_stem, feature_encoder, holdout_split, plot_dir, result_dict,
                                run_description, train_heads_per_lr, write_result)

if TYPE_CHECKING:
    from tcjepa.eval.probe import Features


@dataclass
class SegmentConfig:
    lrs: tuple[float, ...] = (3e-3, 1e-2, 3e-2, 1e-1)  # one head per learning rate, chosen by holdout mIoU
    epochs: int = 20
    batch_size: int = 32  # images per step (and per batch of feature extraction)
    weight_decay: float = 1e-4
    holdout: float = 0.1  # fraction of the train images used to choose the learning rate
    last_blocks: int = 1  # 1: the final LayerNorm output; n: the last n blocks' outputs, each layer-normed, concatenated
    batchnorm: bool = False  # a BatchNorm before each linear head (DINOv2's BNHead)
    encoder: str = "auto"  # auto | teacher | student | init (as probe.encoder)
    max_samples: int = 0  # images read per split (0: all)
    seed: int = 0
    plot_samples: int = 4  # val images drawn with their predicted and true maps


MAX_CONFUSION_IN_JSON = 32  # classes; the confusion matrix of more is left out of the result


def check_config(cfg: SegmentConfig) -> None:
    if not cfg.lrs or min(cfg.lrs) <= 0:
        raise ConfigError(f"segment.lrs must be a non-empty list of positive learning rates, got {list(cfg.lrs)}")
    if min(cfg.epochs, cfg.batch_size, cfg.last_blocks) < 1 or min(cfg.max_samples, cfg.plot_samples) < 0:
        raise ConfigError("segment.epochs, segment.batch_size and segment.last_blocks must be >= 1, "
                          "segment.max_samples and segment.plot_samples >= 0")
    if not 0 < cfg.holdout < 1:
        raise ConfigError(f"segment.holdout must be a fraction in (0, 1), got {cfg.holdout}")
    if cfg.encoder not in EVAL_ENCODERS:
        raise ConfigError(f"segment.encoder {ENCODER_CHOICES_TEXT}, got {cfg.encoder!r}")


def require_seg_maps(shards: str, data_key: str) -> None:
    """Before any model or image: the first samples of ``shards`` hold segmentation maps."""
    from tcjepa.eval.peek import peek

    look = peek(shards, data_key)
    if not look.seg_maps:
        raise DataError(f"{data_key}: none of the first {len(look.metas)} samples of {shards} has a segmentation "
                        "map (KEY.seg.png); `tcjepa data synthetic` writes them, `tcjepa data write --mask-column "
                        "COLUMN` adds them to your own data")


# ----------------------------------------------------------------------------- metrics


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pixel counts [C, C] (rows: true class, columns: predicted) of maps of any shape; pixels
    whose target is IGNORE (255) are left out."""
    keep = target != IGNORE
    index = target[keep].long() * num_classes + pred[keep].long().clamp(0, num_classes - 1)
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def segmentation_metrics(confusion: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU from a confusion matrix (rows: true class).

    IoU = TP / (TP + FP + FN). A class with no pixel in the labels has no IoU (None) and is left
    out of the mean, even when it was predicted: its false positives already lower the IoU of the
    classes those pixels belong to. ``miou`` is None when no class has a pixel."""
    confusion = confusion.double()
    tp, truth, predicted = confusion.diag(), confusion.sum(1), confusion.sum(0)
    present = truth > 0
    iou = tp / (truth + predicted - tp).clamp_min(1)
    total = float(truth.sum())
    return {
        "miou": float(iou[present].mean()) if present.any() else None,
        "pixel_accuracy": float(tp.sum()) / total if total else None,
        "per_class_iou": {name: float(iou[c]) if present[c] else None for c, name in enumerate(names)},
    }


def seg_class_names(metas: list[dict[str, Any]], num_ids: int) -> list[str]:
    """Class names, index = id: the first ``seg_classes`` list in the json, extended by the id
    itself for ids it does not name."""
    named = next((m["seg_classes"] for m in metas if isinstance(m.get("seg_classes"), list)
                  and all(isinstance(n, str) for n in m["seg_classes"])), [])
    return [*named, *[str(c) for c in range(len(named), num_ids)]]


# ----------------------------------------------------------------------------- features and heads


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed per-channel statistics of the training features, as the
    linear probe standardises its features: one learning-rate grid then suits every encoder."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def channel_stats(x: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (clamped away from 0) of features [N, P, D], in fp32 chunks."""
    total, squares, count = torch.zeros(x.size(-1), dtype=torch.float64), torch.zeros(x.size(-1), dtype=torch.float64), 0
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].reshape(-1, x.size(-1)).double()
        total, squares, count = total + part.sum(0), squares + (part * part).sum(0), count + len(part)
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)


def make_heads(x: torch.Tensor, num_classes: int, count: int, batchnorm: bool) -> nn.ModuleList:
    """``count`` per-patch classifiers [M, D] -> [M, C] for features like ``x`` [N, P, D]: each
    standardises with ``x``'s channel statistics, then a Linear (after a BatchNorm if ``batchnorm``)."""
    mean, std = channel_stats(x)
    dim = x.size(-1)
    return nn.ModuleList(nn.Sequential(Standardize(mean, std), *([nn.BatchNorm1d(dim)] if batchnorm else []),
                                       nn.Linear(dim, num_classes)) for _ in range(count))


def linear_resize_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """[n_out, n_in]: 1-D linear interpolation (``align_corners=False``) as a matrix, so that
    ``A_h @ X @ A_w.T`` is exactly ``F.interpolate(X, mode="bilinear")``, at about half its cost
    forward and backward on a CPU (two small matmuls)."""
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device)[None]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


def upsampled_logits(heads: Sequence[nn.Module], x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch features [B, P, D] (a square grid) -> every head's logits at the label resolution
    [B, L, C, H, W], upsampled bilinearly from the patch grid at once for all heads."""
    B, P, D = x.shape
    side = math.isqrt(P)
    if side * side != P:
        raise ValueError(f"{P} patch features do not form a square grid")
    logits = torch.stack([h(x.reshape(B * P, D)) for h in heads], dim=1)  # [B*P, L, C]
    L, C = logits.shape[1:]
    grid = logits.view(B, side, side, L * C).permute(0, 3, 1, 2)  # [B, L*C, side, side]
    rows, cols = (linear_resize_matrix(side, n, x) for n in size)
    return (rows @ grid @ cols.T).view(B, L, C, *size)


@torch.no_grad()
def head_confusions(heads: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, num_classes: int,
                    batch_size: int, device: torch.device | str) -> torch.Tensor:
    """Each head's pixel confusion matrix [L, C, C] on features ``x`` [N, P, D] against maps ``y`` [N, H, W]."""
    for h in heads:
        h.eval()
    total = torch.zeros(len(heads), num_classes, num_classes, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        yb = y[i : i + batch_size]
        pred = upsampled_logits(heads, x[i : i + batch_size].to(device).float(), yb.shape[-2:]).argmax(2).cpu()
        for k in range(len(heads)):
            total[k] += confusion_matrix(pred[:, k], yb, num_classes)
    return total


@torch.no_grad()
def predict_maps(head: nn.Module, x: torch.Tensor, size: tuple[int, int], device: torch.device | str) -> torch.Tensor:
    """One head's class-id maps [N, H, W] (uint8) for features ``x`` [N, P, D]."""
    head.eval()
    return upsampled_logits([head], x.to(device).float(), size)[:, 0].argmax(1).to(torch.uint8).cpu()


def train_segmentation_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                             names: Sequence[str], cfg: SegmentConfig = SegmentConfig(),
                             device: torch.device | str = "cpu", progress: bool = False
                             ) -> tuple[dict[str, Any], nn.Module]:
    """Train one linear head per ``cfg.lrs`` on patch features [N, P, D] (any float dtype) against
    maps [N, H, W] (uint8 class ids, 255 ignore); pick by holdout mIoU; return the val metrics
    (majority baseline included) and the chosen head."""
    num_classes = len(names)
    hold_idx, fit_idx, g = holdout_split(len(train_x), cfg.holdout, cfg.seed)
    size = tuple(train_y.shape[-2:])
    torch.manual_seed(cfg.seed)
    heads = make_heads(train_x[fit_idx], num_classes, len(cfg.lrs), cfg.batchnorm).to(device)

    def loss_of(positions: torch.Tensor) -> torch.Tensor:
        idx = fit_idx[positions]
        logits = upsampled_logits(heads, train_x[idx].to(device).float(), size).flatten(0, 1)  # [B*L, C, H, W]
        target = train_y[idx].to(device).long().repeat_interleave(len(heads), 0)  # [B*L, H, W]
        # the mean over (head, pixel) times the head count: each head's gradient is that of its own mean loss
        return F.cross_entropy(logits, target, ignore_index=IGNORE) * len(heads)

    train_heads_per_lr(heads, cfg.lrs, cfg.weight_decay, len(fit_idx), cfg.epochs, cfg.batch_size, g, loss_of,
                       progress, desc="segmentation heads")
    hold = head_confusions(heads, train_x[hold_idx], train_y[hold_idx], num_classes, cfg.batch_size, device)
    hold_miou = [segmentation_metrics(c, names)["miou"] for c in hold]
    best = max(range(len(heads)), key=lambda i: -1.0 if hold_miou[i] is None else hold_miou[i])
    confusion = head_confusions([heads[best]], val_x, val_y, num_classes, cfg.batch_size, device)[0]

    train_counts = torch.bincount(train_y[train_y != IGNORE].long(), minlength=num_classes)
    majority = int(train_counts.argmax())
    majority_confusion = torch.zeros_like(confusion)
    majority_confusion[:, majority] = confusion.sum(1)  # every labelled val pixel predicted as the majority class
    baseline = segmentation_metrics(majority_confusion, names)
    metrics = {
        **segmentation_metrics(confusion, names),
        "majority_miou": baseline["miou"],
        "majority_pixel_accuracy": baseline["pixel_accuracy"],
        "majority_class": names[majority],
        "lr": cfg.lrs[best],
        "holdout_miou": hold_miou[best],
        "lr_sweep": {str(lr): m for lr, m in zip(cfg.lrs, hold_miou)},
        "num_classes": num_classes,
        "class_names": list(names),
        "num_train": len(train_x),
        "num_val": len(val_x),
    }
    if num_classes <= MAX_CONFUSION_IN_JSON:
        metrics["confusion"] = confusion.tolist()
    return metrics, heads[best]


# ----------------------------------------------------------------------------- the task


def labelled(features: Features) -> torch.Tensor:
    """Indices of the samples whose map has at least one labelled pixel."""
    return (features.seg != IGNORE).flatten(1).any(1).nonzero().squeeze(1)


def draw_examples(head: nn.Module, features: Features, idx: torch.Tensor, names: Sequence[str], val_data: str,
                  image_size: int, path: Path, title: str, device: torch.device | str) -> Path:
    """The first val images (of ``idx``) beside the chosen head's prediction and the true map;
    the images are read again (only those few), in the shard order the features came in."""
    from tcjepa.eval.common import read_split
    from tcjepa.eval.plots import segmentation_plot

    split = read_split(val_data, image_size, "--val-data", max_samples=int(idx[-1]) + 1, max_skip_rate=1.0)
    truth = features.seg[idx]
    pred = predict_maps(head, features.patches[idx], tuple(truth.shape[-2:]), device)
    images = [split.images[i].permute(1, 2, 0).numpy() for i in idx.tolist()]
    return segmentation_plot(images, list(pred.numpy()), list(truth.numpy()), names, path, title)


def run_segment(checkpoint: str | Path, data: str, val_data: str, cfg: SegmentConfig | None = None,
                json_out: str | Path | None = None, progress: bool = True, save_to_run: bool = True,
                encoder: nn.Module | None = None) -> dict[str, Any]:
    """Train the segmentation heads on ``data``, score the chosen one on ``val_data``. Writes
    ``RUN_DIR/eval/segment.json`` (unless ``save_to_run`` is False), ``json_out`` if given and a
    PNG of a few val predictions beside them; returns the result."""
    from tcjepa.checkpoint import load_encoder, load_run_config
    from tcjepa.eval.probe import extract

    cfg = cfg or SegmentConfig()
    check_config(cfg)
    if not val_data:
        raise DataError("--val-data: segmentation needs a validation split (SHARDS) to score the head trained on --data")
    for shards, key in ((data, "--data"), (val_data, "--val-data")):
        require_seg_maps(shards, key)
    run_cfg = load_run_config(checkpoint)
    encoder = encoder if encoder is not None else load_encoder(checkpoint, cfg.encoder)
    features = feature_encoder(encoder, cfg.last_blocks, "segment.last_blocks")
    size, device, skip = run_cfg.model.image_size, default_device(), run_cfg.data.max_skip_rate
    tr, va = (extract(features, shards, size, cfg.batch_size, device, data_key=key, progress=progress, max_skip_rate=skip,
                      patches=True, max_samples=cfg.max_samples, seg=True)
              for shards, key in ((data, "--data"), (val_data, "--val-data")))
    ti, vi = labelled(tr), labelled(va)
    if len(ti) < 2 or len(vi) == 0:
        where = f"--data {data}" if len(ti) < 2 else f"--val-data {val_data}"
        raise DataError(f"{where}: too few samples with a segmentation map (KEY.seg.png) were read: "
                        f"{len(ti)} train, {len(vi)} val")
    ids = torch.cat([tr.seg[ti].flatten(), va.seg[vi].flatten()])
    names = seg_class_names(tr.metas + va.metas, int(ids[ids != IGNORE].max()) + 1)
    metrics, head = train_segmentation_probe(tr.patches[ti], tr.seg[ti], va.patches[vi], va.seg[vi], names, cfg,
                                             device, progress)
    metrics.update({
        **run_description(run_cfg, cfg.encoder),
        "unlabelled": {"train": len(tr.keys) - len(ti), "val": len(va.keys) - len(vi)},
        "skipped": {"train": tr.skipped, "val": va.skipped},
    })
    plots, where = [], plot_dir(checkpoint if save_to_run else None, json_out)
    if where is not None and cfg.plot_samples:
        title = f"linear segmentation head (lr {metrics['lr']:g}): val mIoU {metrics['miou']:.3f}"
        plots.append(str(draw_examples(head, va, vi[: cfg.plot_samples], names, val_data, size,
                                       where / f"{eval_stem('segment', cfg.encoder)}_examples.png", title, device)))
    result = result_dict("segment", checkpoint, data, metrics, val_data=val_data, config=to_dict(cfg), plots=plots)
    write_result(result, checkpoint if save_to_run else None, json_out)
    return result
