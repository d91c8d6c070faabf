"""Probes on frozen encoder features: a linear probe on mean-pooled features and an attentive
probe (``tcjepa.eval.attentive``) on the patch features.

One pass extracts features. The linear probe is a logistic regression solved to convergence by
L-BFGS (``probe.solver: lbfgs``, CLIP's protocol), its L2 weight chosen on a held-out slice of
the *train* split; ``sgd`` trains one AdamW head per learning rate at once instead (DINOv2's
sweep-for-the-price-of-one, for feature sets too large for full-batch fits). Either way the
reported number never saw the val labels. ``probe.kind`` picks ``linear`` (the default,
cheapest), ``attentive`` or ``both``; the headline ``top1`` is the linear probe's whenever it ran.

For a Matryoshka contrastive run the result also has ``per_dim``: linear probes on each nested
prefix of the (normalised) image embedding.

Besides top-1, each probe reports per-class accuracy and a confusion matrix (drawn as
``probe_confusion_LABEL_KIND.png`` beside the result JSON).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.labels import IGNORE
from data_pipelines.loader import DataError, SkipTracker, normalize
from tcjepa.config import ENCODER_CHOICES_TEXT, EVAL_ENCODERS, SOLVERS, Config, ConfigError, ProbeConfig, to_dict
from tcjepa.eval.attentive import train_attentive_probes
from tcjepa.eval.common import (classification_metrics, default_device, eval_stem, feature_encoder, holdout_split,
                                is_label, iter_eval_batches, lookup, pca_whitening, plot_dir, result_dict,
                                train_heads_per_lr, write_result)

KINDS = ("linear", "attentive", "both")
MAX_CONFUSION_IN_JSON = 100  # classes; larger matrices are only drawn


@dataclass
class Features:
    pooled: torch.Tensor  # [N, D] fp32
    patches: torch.Tensor | None  # [N, P, D] fp16
    metas: list[dict[str, Any]]
    keys: list[str]
    skipped: dict[str, int]
    seg: torch.Tensor | None = None  # [N, H, W] uint8 class ids, 255 (IGNORE) where a sample has no map
    caption_sets: list[list[str]] | None = None  # each sample's captions (KEY.txt, then KEY.json "captions")


@torch.no_grad()
def extract(
    encoder: nn.Module,
    shards: str,
    image_size: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    workers: int = 0,
    data_key: str = "--data",
    progress: bool = False,
    max_skip_rate: float = 0.05,
    patches: bool = False,
    max_samples: int = 0,
    seg: bool = False,
    max_captions: int = 1,
) -> Features:
    """Mean-pooled features [N, D] (fp32), patch features [N, P, D] (fp16, only if ``patches``),
    each sample's json metadata and key, skip counts by reason and (only if ``seg``) each
    sample's segmentation map, aligned with the image the features saw; ``max_captions`` > 1:
    also up to that many captions of each sample (``caption_sets``).

    Every sample is read exactly once; more than ``max_skip_rate`` of them skipped is an error
    (an evaluation on what is left of a broken data set would not be comparable); ``max_samples``
    (0: all) stops after the first that many samples. Patch features
    are kept in half precision: they are LayerNorm outputs (O(1) values) and this halves the
    memory of the attentive probe's feature bank."""
    from tqdm.auto import tqdm

    pooled, tokens, maps, metas, keys, captions, tracker = [], [], [], [], [], [], SkipTracker()
    encoder = encoder.to(device).eval()
    batches = iter_eval_batches(shards, image_size, batch_size, data_key, tracker, workers, labels=seg,
                                max_captions=max_captions)
    for batch in tqdm(batches, desc=f"features {Path(shards).name}", unit="batch", disable=not progress):
        h = encoder(normalize(batch["images"].to(device))).float()
        pooled.append(h.mean(dim=1).cpu())
        if patches:
            tokens.append(h.half().cpu())
        if seg:
            maps.append(batch["seg"] if "seg" in batch else
                        torch.full((len(batch["keys"]), image_size, image_size), IGNORE, dtype=torch.uint8))
        metas += batch["meta"]
        keys += batch["keys"]
        captions += batch.get("caption_sets", [])
        if max_samples and len(keys) >= max_samples:
            break
    if not pooled:
        raise DataError(f"{data_key}: no readable sample in {shards}")
    tracker.check_rate(max_skip_rate, 1, f"{data_key} {shards}")
    n = max_samples or len(keys)
    return Features(torch.cat(pooled)[:n], torch.cat(tokens)[:n] if patches else None, metas[:n], keys[:n],
                    tracker.counts, torch.cat(maps)[:n] if seg else None, captions[:n] if max_captions > 1 else None)


def extract_features(encoder: nn.Module, shards: str, image_size: int, batch_size: int = 128,
                     device: torch.device | str = "cpu", workers: int = 0, data_key: str = "--data",
                     progress: bool = False, max_skip_rate: float = 0.05
                     ) -> tuple[torch.Tensor, list[dict[str, Any]], dict[str, int]]:
    """Mean-pooled patch features [N, D], each sample's json metadata, and skip counts by reason."""
    f = extract(encoder, shards, image_size, batch_size, device, workers, data_key, progress, max_skip_rate)
    return f.pooled, f.metas, f.skipped


def select_labels(metas: list[dict[str, Any]], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the samples whose json has an integer at ``key`` (dotted path), and those labels."""
    found = [lookup(m, key) for m in metas]
    keep = [i for i, v in enumerate(found) if is_label(v)]
    return torch.tensor(keep, dtype=torch.long), torch.tensor([found[i] for i in keep], dtype=torch.long)


def class_names(metas: list[dict[str, Any]], key: str, num_classes: int) -> list[str]:
    """Display names of classes ``0..num_classes-1``: the json's ``KEY_name`` next to ``KEY``
    (``label`` -> ``label_name``, as img2dataset-style metadata has it), else the index."""
    name_key = key + "_name"
    names: dict[int, str] = {}
    for m in metas:
        label, name = lookup(m, key), lookup(m, name_key)
        if is_label(label) and isinstance(name, str) and label not in names:
            names[label] = name
    return [names.get(c, str(c)) for c in range(num_classes)]


def train_linear_probes(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    cfg: ProbeConfig = ProbeConfig(),
    seed: int = 0,
) -> dict[str, Any]:
    """A linear classifier on the features (whitened for L-BFGS, standardised for SGD), its one
    setting (``probe.l2_grid`` or ``probe.lrs``) chosen on a holdout of the train split; val metrics."""
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    hold_idx, fit_idx, g = holdout_split(len(train_x), cfg.holdout, seed)
    if cfg.solver == "lbfgs":
        pred, chosen = _lbfgs_probe(train_x, train_y, val_x, hold_idx, fit_idx, num_classes, cfg)
    else:
        pred, chosen = _sgd_probe(train_x, train_y, val_x, hold_idx, fit_idx, num_classes, cfg, g, seed)
    return {
        **classification_metrics(pred, val_y, num_classes),
        **chosen,
        "num_train": len(train_x),
        "num_val": len(val_x),
        "num_classes": num_classes,
        "majority_class": max(Counter(val_y.tolist()).values()) / len(val_y),
    }


def _standardise(fit: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    mean, std = fit.mean(0), fit.std(0).clamp_min(1e-6)
    return lambda x: (x - mean) / std


def _whiten(fit: torch.Tensor, floor: float = 1e-6) -> Callable[[torch.Tensor], torch.Tensor]:
    """Centre and PCA-whiten (float64) with the fit features' covariance (:func:`pca_whitening`).
    Mean-pooled ViT features are badly conditioned (measured on a small ViT: 148 down to 1e-13,
    ~10 directions above 1e-3 of the largest), and the directions that tell classes apart can
    have small variance: without whitening, a penalised or early-stopped fit never reaches them,
    and L-BFGS needs thousands of iterations instead of hundreds."""
    mean, proj = pca_whitening(fit, floor)
    return lambda x: (x.double() - mean) @ proj


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int = 1000) -> nn.Linear:
    """Multinomial logistic regression, full batch, solved by L-BFGS from zero weights: a convex
    problem whose answer depends on neither a learning rate, an epoch count nor a seed. A probe
    trained for a fixed number of SGD epochs is not at its optimum, and features that are merely
    quicker to fit then score higher than features that separate the classes better."""
    head = nn.Linear(x.size(1), num_classes, dtype=x.dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return head.requires_grad_(False)


def _lbfgs_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, hold_idx: torch.Tensor,
                 fit_idx: torch.Tensor, num_classes: int, cfg: ProbeConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """Each ``l2`` fitted on the whitened fit part and judged on the holdout; the chosen one
    refitted on the whole train split (CLIP's linear-probe protocol) and applied to val."""
    norm = _whiten(train_x[fit_idx])
    fx, fy, hx, hy = norm(train_x[fit_idx]), train_y[fit_idx], norm(train_x[hold_idx]), train_y[hold_idx]
    hold_acc = [(fit_logistic(fx, fy, num_classes, l2, cfg.max_iter)(hx).argmax(1) == hy).float().mean().item()
                for l2 in cfg.l2_grid]
    best = max(range(len(cfg.l2_grid)), key=lambda i: (hold_acc[i], cfg.l2_grid[i]))  # ties: the simpler fit
    norm = _whiten(train_x)
    head = fit_logistic(norm(train_x), train_y, num_classes, cfg.l2_grid[best], cfg.max_iter)
    chosen = {"best_l2": cfg.l2_grid[best], "holdout_top1": hold_acc[best],
              "l2_sweep": {str(l2): acc for l2, acc in zip(cfg.l2_grid, hold_acc)}}
    return head(norm(val_x)).argmax(1), chosen


def _sgd_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, hold_idx: torch.Tensor,
               fit_idx: torch.Tensor, num_classes: int, cfg: ProbeConfig, g: torch.Generator,
               seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """One AdamW head per ``probe.lrs``, all on the same batches (DINOv2's sweep); the head with
    the best holdout accuracy is applied to val."""
    norm = _standardise(train_x[fit_idx])
    fx, fy = norm(train_x[fit_idx]), train_y[fit_idx]
    hx, hy, vx = norm(train_x[hold_idx]), train_y[hold_idx], norm(val_x)

    torch.manual_seed(seed)
    heads = nn.ModuleList(nn.Linear(fx.size(1), num_classes) for _ in cfg.lrs)
    train_heads_per_lr(heads, cfg.lrs, cfg.weight_decay, len(fx), cfg.epochs, cfg.batch_size, g,
                       lambda idx: sum(F.cross_entropy(h(fx[idx]), fy[idx]) for h in heads))

    with torch.no_grad():
        hold_acc = [(h(hx).argmax(1) == hy).float().mean().item() for h in heads]
        best = max(range(len(heads)), key=lambda i: hold_acc[i])
        pred = heads[best](vx).argmax(1)
    chosen = {"best_lr": cfg.lrs[best], "holdout_top1": hold_acc[best],
              "lr_sweep": {str(lr): acc for lr, acc in zip(cfg.lrs, hold_acc)}}
    return pred, chosen


def check_probe_config(cfg: ProbeConfig) -> None:
    """What ``tcjepa.config.validate`` does not check about the probe's newer keys."""
    if cfg.kind not in KINDS:
        raise ConfigError(f"probe.kind must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
    if cfg.kind != "linear" and (cfg.attentive_epochs < 1 or not cfg.attentive_lrs or cfg.attentive_batch_size < 1):
        raise ConfigError("probe.attentive_epochs and probe.attentive_batch_size must be >= 1 and probe.attentive_lrs "
                          "non-empty")
    if not 0 <= cfg.attentive_whiten_floor < 1:
        raise ConfigError(f"probe.attentive_whiten_floor must be in [0, 1) (0: no whitening), "
                          f"got {cfg.attentive_whiten_floor}")
    if cfg.attentive_heads < 0:
        raise ConfigError(f"probe.attentive_heads must be >= 0 (0: automatic), got {cfg.attentive_heads}")
    if cfg.last_blocks < 1:
        raise ConfigError(f"probe.last_blocks must be >= 1 (1: the last block), got {cfg.last_blocks}")
    if cfg.encoder not in EVAL_ENCODERS:
        raise ConfigError(f"probe.encoder {ENCODER_CHOICES_TEXT}, got {cfg.encoder!r}")
    if cfg.solver not in SOLVERS:
        raise ConfigError(f"probe.solver must be one of {', '.join(SOLVERS)}, got {cfg.solver!r}")
    if not cfg.l2_grid or min(cfg.l2_grid) < 0 or cfg.max_iter < 1:
        raise ConfigError(f"probe.l2_grid must be a non-empty list of weights >= 0 and probe.max_iter >= 1, "
                          f"got {list(cfg.l2_grid)} and {cfg.max_iter}")


def _probe_one_label(key: str, cfg: ProbeConfig, seed: int, train: Features, val: Features,
                     progress: bool = False) -> dict[str, Any]:
    """All requested probe kinds for one label key; the headline fields are the first kind's."""

    tx, tp, tmeta = train.pooled, train.patches, train.metas
    vx, vp, vmeta = val.pooled, val.patches, val.metas
    ti, ty = select_labels(tmeta, key)
    vi, vy = select_labels(vmeta, key)
    if len(ti) == 0 or len(vi) == 0:
        where = "--data" if len(ti) == 0 else "--val-data"
        raise DataError(f"{where}: no sample has an integer {key!r} in its json (probe.labels)")
    kinds = ["linear", "attentive"] if cfg.kind == "both" else [cfg.kind]
    per_kind: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        if kind == "linear":
            per_kind[kind] = train_linear_probes(tx[ti], ty, vx[vi], vy, cfg, seed=seed)
        else:
            per_kind[kind] = train_attentive_probes(tp[ti], ty, vp[vi], vy, cfg, seed=seed, progress=progress)
    head = per_kind[kinds[0]]
    out = {k: head[k] for k in ("top1", "per_class", "best_lr", "best_l2", "best_epoch", "holdout_top1", "num_train",
                                "num_val", "num_classes", "majority_class") if k in head}
    out["kind"] = kinds[0]
    out["class_names"] = class_names(tmeta + vmeta, key, head["num_classes"])
    out["unlabelled"] = {"train": len(tx) - len(ti), "val": len(vx) - len(vi)}
    for kind, m in per_kind.items():
        out[kind] = {k: v for k, v in m.items() if k not in ("num_train", "num_val", "num_classes", "majority_class")}
    return out


def run_probe(
    checkpoint: str | Path,
    data: str,
    val_data: str,
    cfg: ProbeConfig | None = None,
    json_out: str | Path | None = None,
    encoder: nn.Module | None = None,
    progress: bool = True,
    save_to_run: bool = True,
    name: str | None = None,
    explicit_labels: bool = False,
) -> dict[str, Any]:
    """``tcjepa eval probe``: features of the run's encoder on train/val shards -> probes, one set
    per entry of ``probe.labels`` (the first one gives the headline ``top1``).

    Writes ``RUN_DIR/eval/NAME.json`` (NAME: ``probe``, ``probe_init`` for the random init;
    unless ``save_to_run`` is False, e.g. when probing another ``encoder`` with this run's
    settings), ``json_out`` if given, and a confusion-matrix PNG per label and probe kind beside
    them; returns the result dict.

    ``probe.labels`` the data does not hold are skipped with a warning (an error when
    ``explicit_labels``: the user named them), checked on a first look at both splits before any
    image is encoded."""
    import dataclasses

    from tcjepa.checkpoint import load_encoder, load_run_config
    from tcjepa.eval.peek import labels_present, peek
    from tcjepa.eval.plots import confusion_plot

    run_cfg = load_run_config(checkpoint)
    cfg = cfg or run_cfg.probe
    check_probe_config(cfg)
    if not val_data:
        raise DataError("--val-data: the probe needs a validation split (SHARDS)")
    looks = {"--data": peek(data, "--data"), "--val-data": peek(val_data, "--val-data")}
    cfg = dataclasses.replace(cfg, labels=labels_present(tuple(cfg.labels), looks, explicit_labels, "probe.labels"))
    own_encoder = encoder is None  # the run's own image tower (a contrastive run's projection applies to it)
    if own_encoder:
        encoder = load_encoder(checkpoint, cfg.encoder)
    encoder = feature_encoder(encoder, cfg.last_blocks, "probe.last_blocks")
    size, device = run_cfg.model.image_size, default_device()
    patches = cfg.kind != "linear"
    tr = extract(encoder, data, size, cfg.batch_size, device, data_key="--data", progress=progress, patches=patches,
                 max_skip_rate=run_cfg.data.max_skip_rate)
    va = extract(encoder, val_data, size, cfg.batch_size, device, data_key="--val-data", progress=progress,
                 patches=patches, max_skip_rate=run_cfg.data.max_skip_rate)
    per_label = {key: _probe_one_label(key, cfg, run_cfg.train.seed, tr, va, progress) for key in cfg.labels}

    name = name or eval_stem("probe", cfg.encoder)
    plots, where = [], plot_dir(checkpoint if save_to_run else None, json_out)
    for key, m in per_label.items():
        for kind in ("linear", "attentive"):
            if kind not in m:
                continue
            confusion = m[kind]["confusion"]
            if where is not None:
                path = where / f"{name}_confusion_{key.replace('.', '_')}_{kind}.png"
                title = f"{kind} probe, {key}: top-1 {m[kind]['top1']:.3f}"
                plots.append(str(confusion_plot(confusion, m["class_names"], path, title)))
            if len(confusion) > MAX_CONFUSION_IN_JSON:
                del m[kind]["confusion"]
    first = per_label[cfg.labels[0]]
    headline = {k: v for k, v in first.items() if k not in KINDS}
    headline.update({f"{kind}_top1": first[kind]["top1"] for kind in ("linear", "attentive") if kind in first})
    metrics = {**headline, "label": cfg.labels[0], "per_label": per_label, "skipped": {"train": tr.skipped, "val": va.skipped}}
    # the Matryoshka widths are prefixes of the projected last block: another read-out has none
    if (own_encoder and cfg.encoder != "init" and run_cfg.train.method == "contrastive"
            and run_cfg.contrastive.matryoshka_dims and cfg.last_blocks == 1):
        metrics["per_dim"] = matryoshka_probe(tr, va, checkpoint, cfg, run_cfg)
    result = result_dict("probe", checkpoint, data, metrics, val_data=val_data, config=to_dict(cfg), plots=plots)
    write_result(result, checkpoint if save_to_run else None, json_out, name=name)
    return result


def matryoshka_probe(tr: Features, va: Features, checkpoint: str | Path, cfg: ProbeConfig,
                     run_cfg: Config) -> dict[str, dict[str, float]]:
    """Linear probes on the first ``d`` channels of a Matryoshka run's image embedding, for every
    trained width ``d`` (first of ``probe.labels``): how much each nested size keeps. The
    embedding is the image projection of the mean-pooled features already extracted for the main
    probe (``encode_image`` is exactly that), so the data are not read a second time."""
    from tcjepa.checkpoint import load_final_state
    from tcjepa.methods.contrastive import embedding_dims

    proj = load_final_state(checkpoint)["head.image_proj.weight"].float()  # [E, D]
    ti, ty = select_labels(tr.metas, cfg.labels[0])
    vi, vy = select_labels(va.metas, cfg.labels[0])
    temb, vemb = tr.pooled[ti] @ proj.T, va.pooled[vi] @ proj.T
    out = {}
    for d in embedding_dims(run_cfg):
        tx, vx = F.normalize(temb[:, :d], dim=-1), F.normalize(vemb[:, :d], dim=-1)
        out[str(d)] = {"top1": float(train_linear_probes(tx, ty, vx, vy, cfg, seed=run_cfg.train.seed)["top1"])}
    return out


def periodic_probe(encoder: nn.Module, shards: str, image_size: int, cfg: ProbeConfig, seed: int,
                   device: torch.device | str = "cpu") -> dict[str, float]:
    """A linear probe during training, on one held-out shard set: its labelled samples are split
    in half (even positions fit the heads, odd ones score them), so no second split is needed.
    Returns ``{"probe_top1": ...}`` for the first of ``probe.labels`` (which ``data.val`` must
    have) and ``{"probe_top1/KEY": ...}`` for each further label it has: one label can stay flat
    while another is being learned (on the synthetic scenes colour moves long before shape)."""
    feats, metas, _ = extract_features(encoder, shards, image_size, cfg.batch_size, device, data_key="data.val")
    out = {}
    for i, key in enumerate(cfg.labels):
        idx, y = select_labels(metas, key)
        if len(idx) < 4:
            if i == 0:
                raise DataError(f"data.val {shards}: fewer than 4 samples with an integer {key!r} (probe.labels)")
            continue
        x = feats[idx]
        m = train_linear_probes(x[0::2], y[0::2], x[1::2], y[1::2], cfg, seed=seed)
        out["probe_top1" if i == 0 else f"probe_top1/{key}"] = float(m["top1"])
    return out
