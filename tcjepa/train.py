"""The one training loop. Every method runs through it on a DeepSpeed engine (ZeRO 0-3):

    batch -> masks -> method.micro_losses (teacher targets, engine forward) -> engine.backward
          -> engine.step -> method.after_step (EMA) -> log -> checkpoint

Without a launcher it runs as a single process (CPU or one GPU); under ``deepspeed`` or
``torchrun`` each rank runs the same code on its share of the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from data_pipelines.loader import SKIP_REASONS, LoaderSpec, SkipTracker, make_loader, normalize, resolve_shards
from tcjepa.checkpoint import init_from_final, save_final
from tcjepa.config import Config, ConfigError, captions_per_image, inactive_conditioner_keys, save_config
from tcjepa.distributed import DistInfo, barrier, init_distributed, quiet_libraries
from tcjepa.masks import sample_masks
from tcjepa.methods import build_method, pin_teacher
from tcjepa.methods.jepa import param_groups
from tcjepa.models.vit import set_activation_checkpointing
from tcjepa.rundir import (ResumePlan, check_disk_space, check_resume, check_run_dir, check_writable, create_run_dir,
                           read_saved_config, record_changes, set_aside_evals)
from tcjepa.resume import (gather, list_checkpoints, load_latest, restore_rng_states, rng_states,
                           save_checkpoint)
from tcjepa.schedules import lr_at, weight_decay_at
from tcjepa.trackers import Trackers, check_trackers

_RESERVED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "optimizer", "scheduler", "fp16", "bf16")


def check_batch_split(cfg: Config, world_size: int) -> None:
    """The global batch splits evenly over the ranks and their micro-batches."""
    batch, parts = cfg.train.batch_size, cfg.train.grad_accum_steps
    if batch % (world_size * parts):
        raise ConfigError(f"train.batch_size {batch} is not divisible by the world size {world_size} x "
                          f"train.grad_accum_steps {parts}; choose a batch size that is a multiple of {world_size * parts}")


def fused_adamw_runs(device: torch.device) -> bool:
    """AdamW's fused kernel (one pass over each tensor) where torch has it: on the CPU it steps a
    ViT-S/16 I-JEPA's 33M parameters in 28 ms against 86 ms for the default per-tensor loop and 121
    ms for ``foreach`` (benchmarks/RESULTS.md, "bf16 on the CPU")."""
    return device.type in ("cpu", "cuda")


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """DeepSpeed JSON for this run. Precision is handled by autocast in the method (fp32 master
    weights, fp32 EMA teacher), so DeepSpeed's own fp16/bf16 modes stay off."""
    bad = [k for k in cfg.deepspeed.config if k in _RESERVED_DS_KEYS]
    if bad:
        raise ConfigError(f"deepspeed.config: {bad[0]} is set by tcjepa (train.batch_size, optim.*, train.precision); remove it")
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.batch_size // (world_size * cfg.train.grad_accum_steps),
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
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


NOTES = ("captions_over_max",)  # kept samples that lost something, counted beside the skips


def global_skips(tracker: SkipTracker, before: dict[str, int], info: DistInfo) -> dict[str, int]:
    """Skipped samples by reason (and the :data:`NOTES` counts), summed over ranks and over
    earlier invocations of the run."""
    local = {**tracker.counts, **tracker.notes}
    counts = torch.tensor([float(local.get(r, 0)) for r in (*SKIP_REASONS, *NOTES)], device=info.device)
    if info.world_size > 1:
        torch.distributed.all_reduce(counts)
    return {r: int(c) + int(before.get(r, 0)) for r, c in zip((*SKIP_REASONS, *NOTES), counts.tolist())}


def checkpoint_client(method: Any, step: int, skipped: dict[str, int], bad_steps: int, streams: dict[int, Any],
                      workers: int, info: DistInfo) -> dict[str, Any]:
    """What a checkpoint holds beside DeepSpeed's weights and optimiser: the step, the teacher,
    skip and bad-step counts and, per rank, the RNG states and every loader worker's stream position."""
    per_rank = gather({"rng": rng_states(), "workers": workers, "streams": streams}, info.world_size)
    trained_teacher = method.teacher is not None and method.cfg.teacher.update != "frozen"
    teacher = method.teacher.state_dict() if trained_teacher else {}  # a frozen one: by reference (teacher.sha256)
    return {"step": step, "teacher": teacher, "skipped": skipped, "bad_steps": bad_steps,
            "ranks": per_rank}


def restore_client(client: dict[str, Any], method: Any, info: DistInfo, workers: int) -> dict[int, Any] | None:
    """Restore the teacher and this rank's RNGs; return its loader stream states, or None (with a
    warning) when the data stream cannot be continued exactly (another world size or worker count)."""
    if method.teacher is not None and client.get("teacher"):  # a frozen teacher was rebuilt from teacher.checkpoint
        method.teacher.load_state_dict(client["teacher"])
    ranks = client.get("ranks")
    if not ranks or len(ranks) != info.world_size:
        warnings.warn(f"--resume: the checkpoint was written by {len(ranks) if ranks else 'an older'} process(es), "
                      f"this run has {info.world_size}: the data stream restarts (same data, another order)", stacklevel=2)
        return None
    mine = ranks[info.rank]
    restore_rng_states(mine["rng"])
    if mine["workers"] != workers:
        warnings.warn(f"--resume: data.workers changed ({mine['workers']} -> {workers} readers): the data stream "
                      "restarts (same data, another order)", stacklevel=2)
        return None
    return {int(k): v for k, v in mine["streams"].items()}


class DivergenceError(RuntimeError):
    """Training produced non-finite losses or gradients for too many steps in a row."""


class StopRequest:
    """SIGTERM / SIGINT -> finish the current step, write a checkpoint, exit 0: what schedulers
    (Slurm preemption) expect. The handlers are removed on the first signal, so a second one
    stops the process at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum
        self._restore()
        # os.write, not print: a handler that interrupts a print (the progress bar) must not re-enter it
        os.write(2, f"\nsignal {signum}: finishing this step and writing a checkpoint; send it again to stop at "
                    "once\n".encode())

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def all_ranks(info: DistInfo, *flags: bool | torch.Tensor) -> list[bool]:
    """Each flag ANDed over the ranks, all in one all-reduce (a host sync only for tensor flags in
    one process): ranks must agree, e.g. to skip a step or to stop at the same one."""
    if info.world_size == 1:
        return [bool(f) for f in flags]
    t = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=info.device).reshape(()) for f in flags])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return [bool(v) for v in t.tolist()]


def grads_finite(model: torch.nn.Module) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    return torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()


def run_periodic_probe(method: Any, engine: Any, cfg: Config, info: DistInfo) -> dict[str, float]:
    """``train.eval_every``: a linear probe on ``data.val`` with the encoder a finished run would
    be evaluated with (the EMA teacher, or the student when the teacher is frozen or absent)."""
    from tcjepa.eval.probe import periodic_probe

    encoder = method.eval_encoder(engine.module)
    was_training = encoder.training
    try:
        return periodic_probe(encoder, cfg.data.val, cfg.model.image_size, cfg.probe, cfg.train.seed, info.device)
    finally:
        encoder.train(was_training)


def warn_collapse(record: dict[str, Any], cfg: Config, step: int) -> None:
    """Warn when the targets (or, without a teacher, the encoder's features) look collapsed:
    effective rank or per-channel spread below thresholds."""
    rank, std = record.get("target_rankme", record.get("feature_rankme")), record.get("target_std")
    what = "target" if "target_rankme" in record else "feature"
    low = []
    if rank is not None and rank < cfg.train.collapse_rankme:
        low.append(f"{what} RankMe {rank:.2f} < train.collapse_rankme {cfg.train.collapse_rankme}")
    if std is not None and std < cfg.train.collapse_std:
        low.append(f"target std {std:.4f} < train.collapse_std {cfg.train.collapse_std}")
    if low:
        warnings.warn(f"step {step}: representation collapse? {'; '.join(low)}", stacklevel=2)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mask_seed(seed: int, rank: int, step: int) -> int:
    """Masks are a pure function of (seed, rank, step): a resumed run draws the same ones."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)


# ----------------------------------------------------------------------------- one step, one window


def set_schedules(optimizer: Any, o: Any, step: int, total: int) -> tuple[float, float]:
    """This step's learning rate and weight decay (pure functions of the step), set on every
    parameter group (groups with ``apply_wd`` False get no decay)."""
    lr = lr_at(step, total, lr=o.lr, start_lr=o.start_lr, final_lr=o.final_lr, warmup=o.warmup_steps)
    wd = weight_decay_at(step, total, start=o.weight_decay, final=o.final_weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = wd if group.get("apply_wd", True) else 0.0
    return lr, wd


def step_inputs(batch: dict[str, Any], method: Any, cfg: Config, info: DistInfo, gen: torch.Generator,
                step: int, mask_kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any, Any]:
    """The step's images, masks (a pure function of seed, rank and step) and caption tokens (with
    caption dropout drawn after the masks, so TC-JEPA sees the same masks as I-JEPA)."""
    images = normalize(batch["images"].to(info.device, non_blocking=True))
    gen.manual_seed(_mask_seed(cfg.train.seed, info.rank, step))
    masks = None
    if method.uses_masks:
        masks = sample_masks(images.size(0), method.model.encoder.grid, gen, **mask_kwargs)
        masks = masks.to(info.device)
    tokens = method.text_inputs(batch.get("caption_sets", batch["captions"]), gen, batch.get("tokens"))
    return images, masks, (tokens.to(info.device) if tokens is not None else None)


def guarded_step(engine: Any, method: Any, inputs: tuple[torch.Tensor, Any, Any], cfg: Config, info: DistInfo,
                 stop: "StopRequest", health: bool = False) -> tuple[torch.Tensor | None, dict[str, torch.Tensor], bool, bool]:
    """One optimiser step over ``train.grad_accum_steps`` micro-batches (tcjepa.accumulate):
    backward and ``engine.step`` per micro-batch, DeepSpeed updating at the last. The whole step is
    skipped if a micro-batch's loss (or, with ZeRO 0, the step's gradient) is not finite on some
    rank (``train.nan_guard``). Returns ``(loss, metrics, stepped, running)``, loss and metrics
    averaged over the micro-batches (None when skipped); ``running`` is False once any rank got a
    stop signal. One agreement per micro-batch covers both."""
    guard, parts = cfg.train.nan_guard, cfg.train.grad_accum_steps
    losses, extras, stepped, backward, running = [], [], 0, False, True
    for i, (loss, extra) in enumerate(method.micro_losses(engine, *inputs, parts, health)):
        ok, go_on = all_ranks(info, torch.isfinite(loss) if guard else True, stop.signal is None)
        running = running and go_on
        if not ok:
            break
        engine.backward(loss)
        backward = True
        if i == parts - 1 and guard and cfg.deepspeed.zero_stage == 0:  # with ZeRO >= 1 gradients live in partitions
            (ok,) = all_ranks(info, grads_finite(engine.module))
            if not ok:
                break
        engine.step()
        stepped += 1
        losses.append(loss.detach())
        extras.append(extra)
    if not ok:
        discard_step(engine, method, inputs, cfg, parts - stepped, backward)
        return None, {}, False, running
    if parts == 1:
        return losses[0], extras[0], True, running
    return torch.stack(losses).mean(), {k: torch.stack([e[k] for e in extras]).mean() for k in extras[0]}, True, running


def discard_step(engine: Any, method: Any, inputs: tuple[torch.Tensor, Any, Any], cfg: Config, remaining: int,
                 backward: bool) -> None:
    """Undo a skipped step: drop its gradients (if a backward made any) and, under accumulation,
    bring DeepSpeed to the next step's boundary. ZeRO 0 accumulates in ``param.grad``: clear it
    and count the micro-batches that never ran. ZeRO 1-3 accumulate in their own partitions,
    which only their step clears: finish the accumulation with zero-weighted losses of the step's
    first (finite) micro-batch and take a step whose optimiser update does nothing."""
    parts = cfg.train.grad_accum_steps
    if parts == 1 or not backward or cfg.deepspeed.zero_stage == 0:
        if backward:
            engine.zero_grad()
        if parts > 1:
            engine.micro_steps += remaining
        return
    for _ in range(remaining):
        loss, _ = next(method.micro_losses(engine, *inputs, parts))
        engine.backward(loss * 0.0)
        with optimizer_update_skipped(engine):
            engine.step()


@contextlib.contextmanager
def optimizer_update_skipped(engine: Any) -> Iterator[None]:
    """``engine.step`` without the update: the wrapped torch optimiser's ``step`` does nothing
    (weights and Adam moments stay), DeepSpeed's own bookkeeping runs as usual."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    inner.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del inner.step


def note_bad_step(done: int, in_a_row: int, cfg: Config, info: DistInfo, run_dir: Path) -> None:
    """Warn about a skipped step; too many in a row end the run (naming the last good checkpoint)."""
    if info.is_main:
        warnings.warn(f"step {done}: non-finite loss or gradient; step skipped ({in_a_row} in a row)", stacklevel=2)
    if in_a_row >= cfg.train.max_bad_steps:
        last = list_checkpoints(run_dir)
        raise DivergenceError(
            f"{in_a_row} steps in a row (train.max_bad_steps) had a non-finite loss or gradient, the last at step "
            f"{done}; the last good checkpoint is {last[-1] if last else 'none (checkpoint.every)'}. Lower optim.lr, "
            "enable optim.grad_clip or check the data, then --resume")


class Window:
    """What a logging window accumulates on the device (no host sync until its record)."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.extra_sum: dict[str, torch.Tensor] = {}
        self.n_steps, self.n_good, self.t_start = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, extra: dict[str, torch.Tensor]) -> None:
        self.loss_sum += loss.detach()
        for k, v in extra.items():
            self.extra_sum[k] = self.extra_sum.get(k, 0) + v.detach()
        self.n_good += 1

    def record(self, done: int, schedules: dict[str, float], cfg: Config, info: DistInfo, skipped: dict[str, int],
               bad_steps: int) -> dict[str, Any]:
        """The window's ``metrics.jsonl`` record: means over its good steps (and ranks), speed,
        skip and bad-step counts. ``loss`` is None when every step of the window was skipped."""
        denom = max(self.n_good, 1)
        stats = torch.stack([self.loss_sum / denom] + [v / denom for v in self.extra_sum.values()]).float()
        if info.world_size > 1:
            torch.distributed.all_reduce(stats)
            stats /= info.world_size
        stats = stats.tolist()  # host syncs happen only here, once per logging window
        elapsed = time.perf_counter() - self.t_start
        record = {
            "step": done, "loss": stats[0], **schedules,
            "img_per_s": self.n_steps * cfg.train.batch_size / max(elapsed, 1e-9),
            "skipped": sum(skipped.get(r, 0) for r in SKIP_REASONS),
            **{f"skipped_{r}": skipped[r] for r in SKIP_REASONS if skipped.get(r)},
            **{r: skipped[r] for r in NOTES if skipped.get(r)},
            "bad_steps": bad_steps,
            **{k: v for k, v in zip(self.extra_sum, stats[1:])},
        }
        if self.n_good == 0:
            record["loss"] = None
        elif not np.isfinite(record["loss"]):  # only without train.nan_guard
            raise DivergenceError(f"loss is {record['loss']} at step {done}; lower optim.lr or check the data")
        return record


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class TrainOutcome:
    run_dir: Path
    step: int  # the last step trained
    finished: bool  # reached train.steps and wrote final/ (False: stopped by a signal or stop_at)


def preflight(cfg: Config, run_dir: Path, resume: bool, allow_change: tuple[str, ...]
              ) -> tuple[Config, list[str], ResumePlan]:
    """The checks that need no process group, run by every rank before anything is written: the
    training shards, the run directory and, on a resume, the run's own settings; a frozen teacher
    is pinned to its weights' digest (the returned config carries it)."""
    urls = resolve_shards(cfg.data.train, "data.train")
    ignored = inactive_conditioner_keys(cfg.conditioner)
    if ignored:
        warnings.warn(f"conditioner.variant {cfg.conditioner.variant} ignores "
                      + ", ".join(f"conditioner.{k}={getattr(cfg.conditioner, k)!r}" for k in ignored), stacklevel=2)
    check_run_dir(run_dir, resume)
    cfg = pin_teacher(cfg, read_saved_config(run_dir) if resume else None)
    plan = check_resume(run_dir, cfg, allow_change) if resume else ResumePlan()
    return cfg, urls, plan


def train(
    cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True, stop_at: int | None = None,
    allow_change: tuple[str, ...] = (),
) -> Path:
    """Train ``cfg`` into ``out_dir`` (the run directory the README describes); returns its path.
    :func:`run_training` does the work and also says whether the run finished."""
    return run_training(cfg, out_dir, resume, progress, stop_at, allow_change).run_dir


def run_training(
    cfg: Config, out_dir: str | Path, resume: bool = False, progress: bool = True, stop_at: int | None = None,
    allow_change: tuple[str, ...] = (),
) -> TrainOutcome:
    """Train ``cfg`` into ``out_dir``.

    ``stop_at`` ends this invocation after that many steps with a resumable checkpoint (schedules
    still span ``train.steps``); ``--resume`` later continues to the end. A resume is checked
    against the run's saved settings first (:func:`tcjepa.rundir.check_resume`); ``allow_change``
    names keys whose change the user accepts.
    """
    quiet_libraries()
    import deepspeed
    from tqdm.auto import tqdm

    run_dir = Path(out_dir)
    cfg, urls, plan = preflight(cfg, run_dir, resume, allow_change)
    info = init_distributed()
    check_batch_split(cfg, info.world_size)
    if info.is_main:  # one rank writes the probe file: several at once would race on its name
        check_writable(run_dir)
    barrier()

    _seed_everything(cfg.train.seed)
    method = build_method(cfg, info.rank, info.world_size)  # may refuse (e.g. a missing teacher run)
    if cfg.model.activation_checkpointing:
        set_activation_checkpointing(method.model)
    check_disk_space(run_dir, method, cfg)
    check_trackers(cfg.train.log_to)
    if info.is_main:  # every check passed: only now does anything get written
        create_run_dir(run_dir)
        record_changes(run_dir, plan)
    barrier()
    from_import = resume and not list_checkpoints(run_dir)  # prepare_run_dir let it pass: an imported run
    if from_import:  # before DeepSpeed partitions the weights; the optimiser starts fresh at step 0
        init_from_final(run_dir, cfg, method)
    model = method.model.to(info.device)
    method.to(info.device)
    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model), lr=o.start_lr, betas=o.betas, eps=o.eps,
                                  fused=fused_adamw_runs(info.device))
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, info.world_size)
    )
    if cfg.train.compile:
        compile_method(engine, method)

    start, skipped_before, streams, bad_steps_before = 0, {}, None, 0
    readers = max(cfg.data.workers, 1)  # loader streams: one per worker (the main process when 0)
    if resume and not from_import:
        client = load_latest(engine, run_dir)
        start, skipped_before = int(client["step"]), dict(client.get("skipped", {}))
        bad_steps_before = int(client.get("bad_steps", 0))
        streams = restore_client(client, method, info, readers)
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
    total = cfg.train.steps
    micro = cfg.train.batch_size // info.world_size
    loader = make_loader(LoaderSpec(
        urls, micro, cfg.model.image_size, rank=info.rank, world_size=info.world_size,
        # a stream that cannot be continued exactly restarts from another seed, not from the beginning
        seed=cfg.train.seed if (streams is not None or not resume) else cfg.train.seed + 1_000_003 * start,
        workers=cfg.data.workers, train=True, shuffle_buffer=cfg.data.shuffle_buffer,
        crop_scale=cfg.data.crop_scale, hflip=cfg.data.hflip, resume=streams, consumed=start,
        require_caption=cfg.data.require_captions, max_caption_bytes=cfg.data.max_caption_bytes,
        tokenizer=method.tokenizer,  # captions are tokenized in the loader's workers
        max_captions=max(captions_per_image(cfg.conditioner), 1), labels=False,
    ))
    streams = dict(streams or {})
    log = MetricsLog(run_dir / "metrics.jsonl", info.is_main, start)
    gen = torch.Generator()
    mask_kwargs = dataclasses.asdict(cfg.mask)  # MaskConfig fields are sample_masks' keywords
    tracker = SkipTracker()

    trackers = Trackers(cfg.train.log_to, run_dir, cfg, info.is_main, start)
    if cfg.train.eval_every and start == 0 and info.is_main:  # the curve's first point: the encoder at init
        first = {"step": 0, **run_periodic_probe(method, engine, cfg, info)}
        log.write(first)
        trackers.log(first)
    bar = tqdm(total=total, initial=start, disable=not (progress and info.is_main), desc="train", unit="step")
    batches = iter(loader)
    window = Window(info.device)
    end = total if stop_at is None else min(total, stop_at)
    bad_in_a_row, bad_steps = 0, bad_steps_before
    sched: dict[str, float] = {}
    pending_eval: dict[str, float] = {}
    with StopRequest() as stop, trackers:
        for step in range(start, end):
            # inputs: a batch, this step's schedules, masks and captions
            batch = next(batches)
            streams[batch["stream"]["role"]] = batch["stream"]["state"]  # where the loader stands after this batch
            tracker.update(batch["skipped"])
            tracker.check_rate(cfg.data.max_skip_rate, cfg.data.skip_rate_min_samples, f"data.train {cfg.data.train}")
            lr, wd = set_schedules(optimizer, o, step, total)
            images, masks, tokens = step_inputs(batch, method, cfg, info, gen, step, mask_kwargs)

            # one guarded optimiser step
            done = step + 1
            log_step = done % cfg.train.log_every == 0 or done == end
            loss, extra, ok, running = guarded_step(engine, method, (images, masks, tokens), cfg, info, stop,
                                                    health=log_step and info.is_main)
            if ok:
                sched = method.after_step(engine, step, total)
                bad_in_a_row = 0
                window.add(loss, extra)
            else:  # the step is skipped: no update, no EMA; the schedules move on
                bad_in_a_row, bad_steps = bad_in_a_row + 1, bad_steps + 1
                note_bad_step(done, bad_in_a_row, cfg, info, run_dir)
            window.n_steps += 1
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and info.is_main:
                t_eval = time.perf_counter()
                pending_eval = run_periodic_probe(method, engine, cfg, info)  # logged with this or the next record
                window.t_start += time.perf_counter() - t_eval  # img_per_s counts training only

            # a logging window ends
            if log_step:
                record = window.record(done, {"lr": lr, "wd": wd, **sched}, cfg, info,
                                       global_skips(tracker, skipped_before, info), bad_steps)
                if info.is_main and method.last_health:
                    record.update(method.last_health)
                    warn_collapse(record, cfg, done)
                record.update(pending_eval)
                pending_eval = {}
                log.write(record)
                trackers.log(record)
                if record["loss"] is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['img_per_s']:.1f}")
                window.reset()
            bar.update(1)

            # checkpoint, or stop
            stopping = not running
            periodic = cfg.checkpoint.every and done % cfg.checkpoint.every == 0
            if periodic or stopping or (done == end and (end < total or cfg.checkpoint.every)):  # the last: resumable
                client = checkpoint_client(method, done, global_skips(tracker, skipped_before, info), bad_steps,
                                           streams, readers, info)
                save_checkpoint(engine, run_dir, done, client, cfg.checkpoint.keep, info.is_main)
            if stopping:
                if info.is_main:
                    print(f"stopped by signal {stop.signal} after step {done}; checkpoint written; continue with "
                          f"--resume", file=sys.stderr)
                end = done
                break
    bar.close()

    if end < total:
        return TrainOutcome(run_dir, end, finished=False)
    _save_final(engine, method, run_dir, cfg, info)
    barrier()
    return TrainOutcome(run_dir, end, finished=True)


def compile_method(engine: Any, method: Any) -> None:
    """``torch.compile`` the engine's module (DeepSpeed's ``engine.compile``) and the teacher, in
    place (``nn.Module.compile``: parameter names, checkpoints and EMA updates are unchanged).

    Context and target lengths change from batch to batch, so sizes are dynamic from the first
    compile (one compile, not a static one and then a dynamic one); the first step is slow. Per-sample
    padding (``Packing``) needs data-dependent sizes and splits the graph there; compiled, attention
    runs on the whole padded rows rather than on length groups. On the H200, compiling the
    ``mask.policy=pad`` step made it 1.39x faster (before length groups); on a 2-core CPU 1.04x
    against the grouped eager step, and 1.00x at the official policy (benchmarks/RESULTS.md)."""
    engine.compile(compile_kwargs={"dynamic": True})
    if method.teacher is not None:
        method.teacher.compile(dynamic=True)


def _save_final(engine: Any, method: Any, run_dir: Path, cfg: Config, info: DistInfo) -> None:
    """``final/model.safetensors`` from rank 0; ZeRO-3 first gathers the partitioned weights."""
    import contextlib

    import deepspeed

    model = engine.module
    gather = (deepspeed.zero.GatheredParameters(list(model.parameters()))
              if engine.zero_optimization_partition_weights() else contextlib.nullcontext())
    with gather:
        if info.is_main:
            set_aside_evals(run_dir, cfg.train.steps)  # results of the weights replaced now stay, apart
            save_final(run_dir, method.final_modules(model), cfg, step=cfg.train.steps)


