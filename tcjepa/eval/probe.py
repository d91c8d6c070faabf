"""Linear probe on frozen, mean-pooled encoder features.

One pass extracts features; then several linear heads, one per learning rate, train at once on
the same features (DINOv2's sweep-for-the-price-of-one). The learning rate is chosen on a
held-out slice of the *train* split and the chosen head is reported on the val split, so the
reported number never saw the val labels.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_pipelines.loader import DataError, LoaderSpec, SkipTracker, make_loader, normalize, resolve_shards
from tcjepa.config import ProbeConfig


def lookup(meta: dict[str, Any], key: str) -> Any:
    """``lookup(meta, "labels.color")`` -> ``meta["labels"]["color"]`` (None if absent)."""
    node: Any = meta
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    shards: str,
    image_size: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    workers: int = 0,
    data_key: str = "--data",
    progress: bool = False,
    max_skip_rate: float = 0.05,
) -> tuple[torch.Tensor, list[dict[str, Any]], dict[str, int]]:
    """Mean-pooled patch features [N, D], each sample's json metadata, and skip counts by reason.

    Every sample is read exactly once; more than ``max_skip_rate`` of them skipped is an error
    (an evaluation on what is left of a broken data set would not be comparable)."""
    from tqdm.auto import tqdm

    urls = resolve_shards(shards, data_key)
    loader = make_loader(LoaderSpec(urls, batch_size, image_size, workers=workers, train=False))
    feats, metas, tracker = [], [], SkipTracker()
    encoder = encoder.to(device).eval()
    for batch in tqdm(loader, desc=f"features {Path(shards).name}", unit="batch", disable=not progress):
        tracker.update(batch["skipped"])
        if not batch["keys"]:
            continue
        feats.append(encoder(normalize(batch["images"].to(device))).mean(dim=1).float().cpu())
        metas += batch["meta"]
    if not feats:
        raise DataError(f"{data_key}: no readable sample in {shards}")
    tracker.check_rate(max_skip_rate, 1, f"{data_key} {shards}")
    return torch.cat(feats), metas, tracker.counts


def select_labels(metas: list[dict[str, Any]], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the samples whose json has an integer at ``key`` (dotted path), and those labels."""
    found = [lookup(m, key) for m in metas]
    keep = [i for i, v in enumerate(found) if isinstance(v, int) and not isinstance(v, bool)]
    return torch.tensor(keep, dtype=torch.long), torch.tensor([found[i] for i in keep], dtype=torch.long)


def train_linear_probes(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    cfg: ProbeConfig = ProbeConfig(),
    seed: int = 0,
) -> dict[str, Any]:
    """Train one linear head per learning rate; pick by holdout accuracy; report val metrics."""
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train_x), generator=g)
    n_hold = max(1, int(len(train_x) * cfg.holdout))
    hold_idx, fit_idx = perm[:n_hold], perm[n_hold:]

    mean, std = train_x[fit_idx].mean(0), train_x[fit_idx].std(0).clamp_min(1e-6)
    norm = lambda x: (x - mean) / std  # noqa: E731
    fx, fy = norm(train_x[fit_idx]), train_y[fit_idx]
    hx, hy, vx = norm(train_x[hold_idx]), train_y[hold_idx], norm(val_x)

    torch.manual_seed(seed)
    heads = nn.ModuleList(nn.Linear(fx.size(1), num_classes) for _ in cfg.lrs)
    opt = torch.optim.AdamW(
        [{"params": h.parameters(), "lr": lr} for h, lr in zip(heads, cfg.lrs)], weight_decay=cfg.weight_decay
    )
    steps_per_epoch = max(1, (len(fx) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(fx), generator=g)
        for i in range(0, len(fx), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = sum(F.cross_entropy(h(fx[idx]), fy[idx]) for h in heads)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    with torch.no_grad():
        hold_acc = [(h(hx).argmax(1) == hy).float().mean().item() for h in heads]
        best = max(range(len(heads)), key=lambda i: hold_acc[i])
        logits = heads[best](vx)
        pred = logits.argmax(1)
    top1 = (pred == val_y).float().mean().item()
    per_class = {}
    for c in range(num_classes):
        sel = val_y == c
        if sel.any():
            per_class[str(c)] = (pred[sel] == c).float().mean().item()
    return {
        "top1": top1,
        "per_class": per_class,
        "best_lr": cfg.lrs[best],
        "holdout_top1": hold_acc[best],
        "num_train": len(train_x),
        "num_val": len(val_x),
        "num_classes": num_classes,
        "majority_class": max(Counter(val_y.tolist()).values()) / len(val_y),
    }


def run_probe(
    checkpoint: str | Path,
    data: str,
    val_data: str,
    cfg: ProbeConfig | None = None,
    json_out: str | Path | None = None,
    encoder: nn.Module | None = None,
    progress: bool = True,
    save_to_run: bool = True,
) -> dict[str, Any]:
    """``tcjepa eval probe``: features of the run's encoder on train/val shards -> linear probes,
    one per entry of ``probe.labels`` (the first one gives the headline ``top1``).

    Writes ``RUN_DIR/eval/probe.json`` (unless ``save_to_run`` is False; e.g. when probing another
    ``encoder`` with this run's settings) and ``json_out`` if given; returns the result dict."""
    from tcjepa.checkpoint import load_encoder, load_run_config

    run_cfg = load_run_config(checkpoint)
    cfg = cfg or run_cfg.probe
    if not val_data:
        raise DataError("--val-data: the probe needs a validation split (SHARDS)")
    if encoder is None:
        encoder = load_encoder(checkpoint, cfg.encoder)
    size = run_cfg.model.image_size
    tx, tmeta, tskip = extract_features(encoder, data, size, cfg.batch_size, data_key="--data", progress=progress)
    vx, vmeta, vskip = extract_features(encoder, val_data, size, cfg.batch_size, data_key="--val-data", progress=progress)
    per_label = {}
    for key in cfg.labels:
        ti, ty = select_labels(tmeta, key)
        vi, vy = select_labels(vmeta, key)
        if len(ti) == 0 or len(vi) == 0:
            where = "--data" if len(ti) == 0 else "--val-data"
            raise DataError(f"{where}: no sample has an integer {key!r} in its json (probe.labels)")
        m = train_linear_probes(tx[ti], ty, vx[vi], vy, cfg, seed=run_cfg.train.seed)
        m["unlabelled"] = {"train": len(tx) - len(ti), "val": len(vx) - len(vi)}
        per_label[key] = m
    metrics = {**per_label[cfg.labels[0]], "label": cfg.labels[0], "per_label": per_label,
               "skipped": {"train": tskip, "val": vskip}}
    result = {"task": "probe", "checkpoint": str(checkpoint), "data": data, "val_data": val_data, "metrics": metrics}
    outs = ([Path(checkpoint) / "eval" / "probe.json"] if save_to_run else []) + ([Path(json_out)] if json_out else [])
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result
