"""What every evaluation shares: reading an evaluation split, the probes' holdout split, their
learning-rate sweep and classification metrics, tie-aware top-k hits, the last-blocks read-out
(``probe.last_blocks``, ``segment.last_blocks``), and writing the result JSON in the shape
DESIGN.md fixes (``{"task", "checkpoint", "data", "metrics"}``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from data_pipelines.loader import DataError, LoaderSpec, SkipTracker, make_loader, resolve_shards
from tcjepa.config import ConfigError


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lookup(meta: dict[str, Any], key: str) -> Any:
    """``lookup(meta, "labels.color")`` -> ``meta["labels"]["color"]`` (None if absent)."""
    node: Any = meta
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def is_label(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def iter_eval_batches(shards: str, image_size: int, batch_size: int, data_key: str, tracker: SkipTracker,
                      workers: int = 0, labels: bool = False, max_captions: int = 1) -> Iterator[dict[str, Any]]:
    """Centre-cropped batches of ``shards``, each sample exactly once; batches without samples are
    not yielded, but their skip counts reach ``tracker`` (check its rate when done). ``labels``:
    also decode the label maps (``batch["seg"]``, ``batch["inst"]``); tasks that never read them
    leave them encoded. ``max_captions`` > 1: also each sample's captions (``batch["caption_sets"]``,
    KEY.txt then KEY.json ``captions``, as training reads them)."""
    urls = resolve_shards(shards, data_key)
    spec = LoaderSpec(urls, batch_size, image_size, workers=workers, train=False, labels=labels, max_captions=max_captions)
    for batch in make_loader(spec):
        tracker.update(batch["skipped"])
        if batch["keys"]:
            yield batch


@dataclass
class Split:
    """A whole evaluation split in memory: uint8 images [N, 3, H, W] and per-sample data."""

    images: torch.Tensor
    captions: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    metas: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def read_split(shards: str, image_size: int, data_key: str, max_samples: int = 0, max_skip_rate: float = 0.05,
               batch_size: int = 64) -> Split:
    """The first ``max_samples`` samples of ``shards`` (0: all), in shard order. More than
    ``max_skip_rate`` of the samples read skipped as broken is an error: an evaluation on what is
    left of a broken data set would not compare with others."""
    tracker = SkipTracker()
    images, split = [], Split(torch.empty(0, 3, image_size, image_size, dtype=torch.uint8))
    for batch in iter_eval_batches(shards, image_size, batch_size, data_key, tracker):
        images.append(batch["images"].contiguous())
        split.captions += batch["captions"]
        split.keys += batch["keys"]
        split.metas += batch["meta"]
        if max_samples and len(split.keys) >= max_samples:
            break
    if not split.keys:
        raise DataError(f"{data_key}: no readable sample in {shards}")
    tracker.check_rate(max_skip_rate, 1, f"{data_key} {shards}")
    n = max_samples or len(split.keys)
    split.images = torch.cat(images)[:n]
    split.captions, split.keys, split.metas = split.captions[:n], split.keys[:n], split.metas[:n]
    split.skipped = tracker.counts
    return split


def holdout_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """``(holdout indices, fit indices, generator)``: the same split for every probe kind."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    n_hold = max(1, int(n * fraction))
    return perm[:n_hold], perm[n_hold:], g


def pca_whitening(fit: torch.Tensor, floor: float, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, proj)`` in float64 such that ``(x - mean) @ proj`` has identity covariance over the
    rows of ``fit`` [N, D], eigenvalues floored at ``floor`` x the largest (so that directions of
    pure numerical noise are not blown up to unit variance). Moments are summed over row chunks,
    so the rows of a large token bank are never all held in float64 at once (two passes: the
    mean, then the centred products, as exact as centring the whole matrix)."""
    n, d = fit.shape
    mean = sum(fit[i : i + chunk].double().sum(0) for i in range(0, n, chunk)) / n
    cov = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, chunk):
        x = fit[i : i + chunk].double() - mean
        cov += x.T @ x
    ev, vecs = torch.linalg.eigh(cov / max(n - 1, 1))
    return mean, vecs / ev.clamp_min(floor * ev.max().clamp_min(1e-30)).sqrt()


def train_heads_per_lr(heads: Sequence[nn.Module], lrs: Sequence[float], weight_decay: float, n: int, epochs: int,
                       batch_size: int, g: torch.Generator, loss_of: Callable[[torch.Tensor], torch.Tensor],
                       progress: bool = False, desc: str = "heads",
                       after_epoch: Callable[[int], None] | None = None) -> None:
    """Train ``heads[i]`` at learning rate ``lrs[i]``, all at once: AdamW with a cosine schedule,
    each step on the summed loss ``loss_of(positions)`` of one batch of positions in ``0..n-1``
    (a fresh order from ``g`` each epoch). The heads share every batch, so a learning-rate sweep
    costs one pass over the features (DINOv2's linear evaluation). ``after_epoch(epoch)`` runs
    after each epoch (0-based), e.g. to score the heads on a holdout and keep the best."""
    from tqdm.auto import trange

    opt = torch.optim.AdamW([{"params": h.parameters(), "lr": lr} for h, lr in zip(heads, lrs)],
                            weight_decay=weight_decay)
    steps_per_epoch = max(1, (n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for h in heads:
        h.train()
    for epoch in trange(epochs, desc=desc, unit="epoch", disable=not progress):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            loss = loss_of(order[i : i + batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if after_epoch is not None:
            after_epoch(epoch)


def run_description(run_cfg: Any, which: str | None = None) -> dict[str, str]:
    """What a result says about the run it evaluated: its method, its encoder and (``which``:
    the task's ``encoder`` setting) which weights were read."""
    from tcjepa.checkpoint import encoder_role
    from tcjepa.config import to_dict
    from tcjepa.eval.report import method_name

    out = {"method": method_name(to_dict(run_cfg)), "encoder": run_cfg.model.encoder}
    if which is not None:
        out["weights"] = encoder_role(run_cfg, which)
    return out


def classification_metrics(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """top-1, per-class accuracy (classes present in ``y``) and the confusion matrix
    (rows: true class, columns: predicted)."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((y, pred.clamp(0, num_classes - 1)), torch.ones_like(y), accumulate=True)
    per_class = {str(c): (pred[y == c] == c).float().mean().item() for c in range(num_classes) if (y == c).any()}
    return {"top1": (pred == y).float().mean().item(), "per_class": per_class, "confusion": confusion.tolist()}


def topk_hits(scores: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of ``scores`` [N, K] (higher = better), the probability that ``target`` [N] is
    among the top ``k`` when ties are broken uniformly at random: a constant scorer gets exactly
    chance (k / K), never a perfect score by tie order."""
    true = scores.gather(1, target.view(-1, 1))
    above = (scores > true).sum(1).float()
    ties = (scores == true).sum(1).float() - 1  # other candidates with the same score
    return ((k - above) / (ties + 1)).clamp(0, 1)


def result_dict(task: str, checkpoint: str | Path, data: str, metrics: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The evaluation JSON: DESIGN.md's four keys first, then ``extra`` (val_data, config, plots)."""
    return {"task": task, "checkpoint": str(checkpoint), "data": data, "metrics": metrics, **extra}


def result_key(result: dict[str, Any]) -> str:
    """What tells two results of one task apart: the data and the settings they ran with."""
    import hashlib

    what = {k: result.get(k) for k in ("data", "val_data", "config")}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]


def eval_stem(task: str, encoder: str | None = None) -> str:
    """The name a result and its plots are kept under in ``RUN_DIR/eval``: the task, ``TASK_init``
    for the run's random initialisation (``encoder`` ``init``), so the baseline sits beside the
    trained result instead of replacing it."""
    return task + ("_init" if encoder == "init" else "")


def result_stem(result: dict[str, Any]) -> str:
    return eval_stem(result["task"], (result.get("config") or {}).get("encoder"))


def write_result(result: dict[str, Any], run_dir: str | Path | None, json_out: str | Path | None,
                 name: str | None = None) -> list[Path]:
    """Write ``result`` to ``RUN_DIR/eval/NAME.json`` (NAME defaults to :func:`result_stem`;
    ``run_dir`` None skips it) and to ``json_out`` if given; returns the paths written.

    ``eval/NAME.json`` is the latest result; each one is also kept as
    ``eval/history/NAME.KEY.json`` (KEY from its data and settings: :func:`result_key`), so an
    evaluation on other data does not replace an earlier one without trace. In the run directory
    the result records (in place) the ``weights_id`` of the weights it scored."""
    outs: list[Path] = []
    if run_dir is not None:
        from tcjepa.checkpoint import weights_id

        stem = name or result_stem(result)
        result["weights_id"] = weights_id(run_dir)  # in place: the caller returns what was written
        ev = Path(run_dir) / "eval"
        outs += [ev / f"{stem}.json", ev / "history" / f"{stem}.{result_key(result)}.json"]
    outs += [Path(json_out)] if json_out else []
    text = json.dumps(result, indent=2) + "\n"
    for out in outs:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    return outs


def plot_dir(run_dir: str | Path | None, json_out: str | Path | None) -> Path | None:
    """Where an evaluation's PNGs go: beside its run-dir JSON, else beside ``json_out``."""
    if run_dir is not None:
        return Path(run_dir) / "eval"
    return Path(json_out).parent if json_out else None


# ----------------------------------------------------------------------------- read-outs


class LastBlocks(nn.Module):
    """The last ``n`` blocks' outputs of a ViT encoder, each through its final LayerNorm,
    concatenated: [B, P, n * D] (DINOv2's ``get_intermediate_layers(n, norm=True)``)."""

    def __init__(self, encoder: nn.Module, n: int):
        super().__init__()
        self.encoder, self.n = encoder, n

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.encoder(images, last_blocks=self.n).unbind(0), dim=-1)


def feature_encoder(encoder: nn.Module, last_blocks: int, key: str) -> nn.Module:
    """The encoder whose output the heads read: itself for ``last_blocks`` 1, else :class:`LastBlocks`
    (``key``: the setting that asked, named in the error)."""
    if last_blocks == 1:
        return encoder
    depth = len(getattr(encoder, "blocks", ()))
    if last_blocks > depth:
        raise ConfigError(f"{key} {last_blocks} exceeds the encoder's {depth} blocks")
    return LastBlocks(encoder, last_blocks)
