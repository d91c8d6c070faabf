"""The one training loop. Every method runs through it on a DeepSpeed engine (ZeRO 0-3):

    batch -> masks -> method.loss (teacher targets, engine forward) -> engine.backward
          -> engine.step -> method.after_step (EMA) -> log -> checkpoint

Without a launcher it runs as a single process (CPU or one GPU); under ``deepspeed`` or
``torchrun`` each rank runs the same code on its share of the global batch.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipelines.loader import SKIP_REASONS, LoaderSpec, SkipTracker, make_loader, normalize, resolve_shards
from tcjepa.checkpoint import load_encoder, save_final
from tcjepa.config import Config, ConfigError, save_config
from tcjepa.distributed import DistInfo, barrier, init_distributed
from tcjepa.masks import sample_masks
from tcjepa.methods.jepa import JEPA, param_groups
from tcjepa.schedules import lr_at, weight_decay_at

CHECKPOINTS = "checkpoints"
TAG_PREFIX = "step_"
_RESERVED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "optimizer", "scheduler", "fp16", "bf16")


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """DeepSpeed JSON for this run. Precision is handled by autocast in the method (fp32 master
    weights, fp32 EMA teacher), so DeepSpeed's own fp16/bf16 modes stay off."""
    bad = [k for k in cfg.deepspeed.config if k in _RESERVED_DS_KEYS]
    if bad:
        raise ConfigError(f"deepspeed.config: {bad[0]} is set by tcjepa (train.batch_size, optim.*, train.precision); remove it")
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.batch_size // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.grad_clip > 0:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    for k, v in cfg.deepspeed.config.items():
        if isinstance(v, dict) and isinstance(ds.get(k), dict):
            ds[k] = {**ds[k], **v}
        else:
            ds[k] = v
    ds["zero_optimization"]["stage"] = cfg.deepspeed.zero_stage
    return ds


def build_method(cfg: Config) -> JEPA:
    teacher = None
    if cfg.teacher.update == "frozen":
        run = Path(cfg.teacher.checkpoint)
        if not (run / "final" / "model.safetensors").is_file():
            raise ConfigError(f"teacher.checkpoint: {run} is not a finished run directory (no final/model.safetensors)")
        teacher = load_encoder(run, which="student")
    return JEPA(cfg, teacher=teacher)


# ----------------------------------------------------------------------------- run directory


def list_checkpoints(run_dir: Path) -> list[Path]:
    ck = run_dir / CHECKPOINTS
    if not ck.is_dir():
        return []
    return sorted(p for p in ck.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """Fail before training if the directory cannot be used as asked."""
    existing = list_checkpoints(run_dir)
    if resume and not existing:
        raise ConfigError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS}")
    if not resume and (existing or (run_dir / "final").exists()):
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / ".write_test"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{run_dir}: not writable ({e.strerror})") from e


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled and resume_step and path.exists():  # drop records past the resumed checkpoint
            keep = [l for l in path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            path.write_text("".join(l + "\n" for l in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def global_skips(tracker: SkipTracker, before: dict[str, int], info: DistInfo) -> dict[str, int]:
    """Skipped samples by reason, summed over ranks and over earlier invocations of the run."""
    counts = torch.tensor([float(tracker.counts.get(r, 0)) for r in SKIP_REASONS], device=info.device)
    if info.world_size > 1:
        torch.distributed.all_reduce(counts)
    return {r: int(c) + int(before.get(r, 0)) for r, c in zip(SKIP_REASONS, counts.tolist())}


def save_checkpoint(engine: Any, method: JEPA, run_dir: Path, step: int, skipped: dict[str, int], cfg: Config, info: DistInfo) -> None:
    tag = f"{TAG_PREFIX}{step:08d}"
    client = {"step": step, "teacher": method.teacher.state_dict(), "skipped": skipped}
    engine.save_checkpoint(str(run_dir / CHECKPOINTS), tag=tag, client_state=client)
    barrier()
    if info.is_main:
        for old in list_checkpoints(run_dir)[: -cfg.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def load_checkpoint(engine: Any, method: JEPA, run_dir: Path) -> tuple[int, dict[str, int]]:
    path, client = engine.load_checkpoint(str(run_dir / CHECKPOINTS))
    if path is None or client is None:
        raise ConfigError(f"--resume: could not load the latest checkpoint in {run_dir / CHECKPOINTS}")
    method.teacher.load_state_dict(client["teacher"])
    return int(client["step"]), dict(client.get("skipped", {}))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mask_seed(seed: int, rank: int, step: int) -> int:
    """Masks are a pure function of (seed, rank, step): a resumed run draws the same ones."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)


# ----------------------------------------------------------------------------- the loop


def train(
    cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True, stop_at: int | None = None
) -> Path:
    """Train ``cfg`` into ``out_dir`` (see DESIGN.md "Run directory"); returns the run directory.

    ``stop_at`` ends this invocation after that many steps with a resumable checkpoint (schedules
    still span ``train.steps``); ``--resume`` later continues to the end.
    """
    import deepspeed
    from tqdm.auto import tqdm

    run_dir = Path(out_dir)
    urls = resolve_shards(cfg.data.train, "data.train")  # fail fast, before any process group work
    info = init_distributed()
    if cfg.train.batch_size % info.world_size:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by the world size {info.world_size}")
    if info.is_main:
        prepare_run_dir(run_dir, resume)
    barrier()

    _seed_everything(cfg.train.seed)
    method = build_method(cfg)
    model = method.model.to(info.device)
    method.to(info.device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model), lr=o.start_lr, betas=o.betas, eps=o.eps)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, info.world_size)
    )

    start, skipped_before = 0, {}
    if resume:
        start, skipped_before = load_checkpoint(engine, method, run_dir)
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
    total = cfg.train.steps
    micro = cfg.train.batch_size // info.world_size
    loader = make_loader(LoaderSpec(
        urls, micro, cfg.model.image_size, seed=cfg.train.seed, rank=info.rank, world_size=info.world_size,
        workers=cfg.data.workers, train=True, shuffle_buffer=cfg.data.shuffle_buffer,
        crop_scale=cfg.data.crop_scale, hflip=cfg.data.hflip, epoch=start,
        require_caption=cfg.data.require_captions, max_caption_bytes=cfg.data.max_caption_bytes,
        tokenizer=method.tokenizer,  # captions are tokenized in the loader's workers
    ))
    log = MetricsLog(run_dir / "metrics.jsonl", info.is_main, start)
    grid = method.model.encoder.grid
    gen = torch.Generator()
    mask_kwargs = dataclasses.asdict(cfg.mask)  # MaskConfig fields are sample_masks' keywords
    tracker = SkipTracker()

    bar = tqdm(total=total, initial=start, disable=not (progress and info.is_main), desc="train", unit="step")
    batches = iter(loader)
    loss_sum, n_window, t_window = torch.zeros((), device=info.device), 0, time.perf_counter()
    extra_sum: dict[str, torch.Tensor] = {}
    end = total if stop_at is None else min(total, stop_at)
    for step in range(start, end):
        batch = next(batches)
        tracker.update(batch["skipped"])
        tracker.check_rate(cfg.data.max_skip_rate, cfg.data.skip_rate_min_samples, f"data.train {cfg.data.train}")
        images = normalize(batch["images"].to(info.device, non_blocking=True))

        lr = lr_at(step, total, lr=o.lr, start_lr=o.start_lr, final_lr=o.final_lr, warmup=o.warmup_steps)
        wd = weight_decay_at(step, total, start=o.weight_decay, final=o.final_weight_decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group.get("apply_wd", True) else 0.0

        gen.manual_seed(_mask_seed(cfg.train.seed, info.rank, step))
        masks = sample_masks(images.size(0), grid, gen, **mask_kwargs).to(info.device)
        tokens = method.text_inputs(batch["captions"], gen, batch.get("tokens"))  # after the masks: same masks as I-JEPA
        if tokens is not None:
            tokens = tokens.to(info.device)

        loss, extra = method.loss(engine, images, masks, tokens)
        engine.backward(loss)
        engine.step()
        sched = method.after_step(engine, step, total)

        loss_sum += loss.detach()
        for k, v in extra.items():
            extra_sum[k] = extra_sum.get(k, 0) + v.detach()
        n_window += 1
        done = step + 1
        if done % cfg.train.log_every == 0 or done == end:
            stats = torch.stack([loss_sum / n_window] + [v / n_window for v in extra_sum.values()]).float()
            if info.world_size > 1:
                torch.distributed.all_reduce(stats)
                stats /= info.world_size
            skipped = global_skips(tracker, skipped_before, info)
            stats = stats.tolist()  # host syncs happen only here, once per logging window
            elapsed = time.perf_counter() - t_window
            record = {
                "step": done, "loss": stats[0], "lr": lr, "wd": wd, **sched,
                "img_per_s": n_window * cfg.train.batch_size / max(elapsed, 1e-9),
                "skipped": sum(skipped.values()),
                **{f"skipped_{r}": n for r, n in skipped.items() if n},
                **{k: v for k, v in zip(extra_sum, stats[1:])},
            }
            if not np.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is {record['loss']} at step {done}; lower optim.lr or check the data")
            log.write(record)
            bar.set_postfix(loss=f"{stats[0]:.4f}", img_s=f"{record['img_per_s']:.1f}")
            loss_sum.zero_()
            extra_sum, n_window, t_window = {}, 0, time.perf_counter()
        bar.update(1)
        periodic = cfg.checkpoint.every and done % cfg.checkpoint.every == 0
        if periodic or (done == end and (end < total or cfg.checkpoint.every)):  # the last step: resumable
            save_checkpoint(engine, method, run_dir, done, global_skips(tracker, skipped_before, info), cfg, info)
    bar.close()

    if end < total:
        return run_dir
    _save_final(engine, method, run_dir, cfg, info)
    barrier()
    return run_dir


def _save_final(engine: Any, method: JEPA, run_dir: Path, cfg: Config, info: DistInfo) -> None:
    """``final/model.safetensors`` from rank 0; ZeRO-3 first gathers the partitioned weights."""
    import contextlib

    import deepspeed

    model = engine.module
    gather = (deepspeed.zero.GatheredParameters(list(model.parameters()))
              if engine.zero_optimization_partition_weights() else contextlib.nullcontext())
    with gather:
        if info.is_main:
            modules = {"encoder": model.encoder, "predictor": model.predictor, "teacher": method.teacher}
            if model.text is not None:
                modules["text"] = model.text
            save_final(run_dir, modules, cfg)


