"""Time one I-JEPA training step: tcjepa against the official facebookresearch/ijepa code.

One step = EMA-teacher targets (no grad) + context encoder + predictor + smooth-L1 loss,
backward, AdamW step, EMA update of the teacher; I-JEPA multi-block masks (4 targets of scale
0.15-0.2 and aspect 0.75-1.5, one context block of scale 0.85-1.0, at least 10 context patches).

Variants, all under the same config (encoder, image size, predictor depth/width, batch, fp32,
thread count):

* ``ours/pad``      tcjepa with ``mask.policy=pad`` (every context patch kept, rows padded,
                    key-padding attention masks);
* ``ours/official`` tcjepa with ``mask.policy=official`` (contexts truncated to the batch minimum,
                    as the official collator does; no attention masks);
* ``official``      facebookresearch/ijepa, imported at run time from ``--official PATH`` (a
                    checkout; nothing of it is copied here): ``src/models/vision_transformer.py``
                    (``vit_tiny``/``vit_small`` + ``vit_predictor``), ``src/masks/multiblock.py``
                    ``MaskCollator``, ``src/masks/utils.py`` ``apply_masks``,
                    ``src/utils/tensors.py`` ``repeat_interleave_batch``; the step follows
                    ``train_step`` in its ``src/train.py`` line by line (loss, backward, AdamW with
                    the param groups of ``src/helper.py`` ``init_opt``, per-parameter EMA loop).
                    ``src/train.py`` itself is not imported (it needs CUDA/SLURM bits); the modules
                    above import on CPU as they are, so no shim is needed. Left out of the official
                    step: ``AllReduce`` (identity in one process), ``grad_logger`` and the lr/wd
                    schedulers (logging and bookkeeping, also absent from our timed step).

``--bf16`` adds ours under ``train.precision: bf16`` (CPU autocast, fp32 master weights, optimiser
and EMA teacher) at both policies; the official code stays fp32, its only mode on a CPU (its
autocast is CUDA's).

Also reported: model FLOPs per image (analytic, real tokens only), the model FLOP utilisation
against a matmul peak in the variant's precision measured in the same run, and the activation memory per image (bytes
autograd keeps for backward, averaged over 3 steps).

Masks are sampled before timing (in real training they come from data-loader workers); the time
to sample one batch of masks is reported separately (ours includes a second, untruncated draw used
only for the context-kept statistic). Variants are interleaved step by step: each round runs
``--steps`` steps of every variant, one step of each in turn with the order rotating, so that
machine load hits all variants alike. The machine may be shared: the load other processes put on
it is read from /proc around every step, and when enough steps ran on an otherwise idle machine
the summary uses those only (the JSON holds both). Reported: the median step time, images/s, and
the ratio ours/official as the median of the ratios of back-to-back steps (< 1: ours is faster;
the ratio of the medians is in the JSON too).

    python benchmarks/bench_train_step.py --official /path/to/ijepa
    python benchmarks/bench_train_step.py --quick            # smoke run, ours only
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tcjepa.config import Config, load_config
from tcjepa.masks import sample_block_masks, sample_masks
from tcjepa.methods.jepa import JEPA, autocast, ema_update, param_groups
from tcjepa.models.attention import whole_row_attention

MOMENTUM = 0.996  # EMA momentum (the official schedule starts here)
LR = 1e-3
WEIGHT_DECAY = 0.04  # what the official wd schedule sets at step 0 on the decayed groups
MASK = {  # I-JEPA ViT recipe (configs/in1k_vith14_ep300.yaml in the official repo)
    "num_targets": 4,
    "target_scale": (0.15, 0.2),
    "target_aspect": (0.75, 1.5),
    "context_scale": (0.85, 1.0),
    "context_aspect": (1.0, 1.0),
    "min_context": 10,
}


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def make_config(encoder: str, image_size: int, pred_depth: int, pred_width: int, batch: int, policy: str,
                precision: str = "fp32") -> Config:
    m = MASK
    return load_config(None, [
        f"model.encoder={encoder}",
        f"model.image_size={image_size}",
        f"model.predictor_depth={pred_depth}",
        f"model.predictor_width={pred_width}",
        f"train.batch_size={batch}",
        f"train.precision={precision}",
        f"mask.policy={policy}",
        f"mask.num_targets={m['num_targets']}",
        f"mask.target_scale={list(m['target_scale'])}",
        f"mask.target_aspect={list(m['target_aspect'])}",
        f"mask.context_scale={list(m['context_scale'])}",
        f"mask.context_aspect={list(m['context_aspect'])}",
        f"mask.min_context={m['min_context']}",
    ])


def stock_layer_norms(*modules: torch.nn.Module) -> None:
    """Turn the transformer blocks' norms back into ``nn.LayerNorm`` (same parameters), which CUDA
    autocast runs in fp32: the layout before ``tcjepa.models.vit.LayerNorm``, for comparisons."""
    from tcjepa.models.vit import LayerNorm

    for module in modules:
        for m in module.modules():
            if isinstance(m, LayerNorm):
                m.__class__ = torch.nn.LayerNorm


# ----------------------------------------------------------------------------- ours


class Ours:
    """tcjepa: JEPA targets, JEPAStudent loss, fused AdamW on param_groups, foreach EMA."""

    def __init__(self, cfg: Config, seed: int, checkpointing: bool = False, one_group: bool = False):
        from tcjepa.models.vit import set_activation_checkpointing

        self.name = (f"ours/{cfg.mask.policy}" + ("+bf16" if cfg.train.precision == "bf16" else "")
                     + ("+ckpt" if checkpointing else "") + ("+1group" if one_group else ""))
        self.one_group = one_group  # attention over the whole padded rows, as before length groups
        self.cfg = cfg
        torch.manual_seed(seed)
        self.method = JEPA(cfg)
        self.student = self.method.model.train()
        set_activation_checkpointing(self.student, checkpointing)
        groups = param_groups(self.student)
        for g in groups:  # what tcjepa.train's weight-decay schedule sets at step 0
            g["weight_decay"] = WEIGHT_DECAY if g["apply_wd"] else 0.0
        self.opt = torch.optim.AdamW(groups, lr=LR, fused=True)  # as tcjepa.train on the CPU
        self.grid = self.student.encoder.grid
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, batch: int) -> tuple[Any, dict[str, float]]:
        """One batch of masks, plus: tokens the encoder computes per sample (padded length),
        fraction of the sampled context patches kept, target tokens per block."""
        mk = self.cfg.mask
        kwargs = dict(num_targets=mk.num_targets, target_scale=mk.target_scale, target_aspect=mk.target_aspect,
                      context_scale=mk.context_scale, context_aspect=mk.context_aspect,
                      min_context=mk.min_context, policy=mk.policy)
        state = self.gen.get_state()
        masks = sample_masks(batch, self.grid, self.gen, **kwargs)
        # same generator state, same draws: the context sizes before any truncation
        _, context = sample_block_masks(batch, self.grid, torch.Generator().set_state(state), **kwargs)
        stats = {
            "ctx_len": float(masks.context_idx.shape[1]),
            "ctx_kept": float(masks.num_context().sum() / context.sum()),
            "tgt_len": float(masks.target_idx.shape[2]),
        }
        return masks, stats

    def step(self, images: torch.Tensor, masks: Any) -> float:
        with whole_row_attention() if self.one_group else contextlib.nullcontext():
            targets = self.method.targets(images, masks)
            with autocast(images.device, self.method.autocast_dtype):  # as JEPA.loss: bf16 autocast or explicitly off
                loss = self.student(images, masks, targets)
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        ema_update(self.method.teacher, self.student.encoder, MOMENTUM)
        return float(loss.detach())


# ----------------------------------------------------------------------------- official


def import_official(root: Path) -> dict[str, Any]:
    """Import the official model, mask and util modules from a checkout (``src`` is a namespace
    package there, so the checkout root goes first on ``sys.path``)."""
    root = root.resolve()
    if not (root / "src/models/vision_transformer.py").is_file():
        fail(f"--official {root}: not a facebookresearch/ijepa checkout (no src/models/vision_transformer.py)")
    sys.path.insert(0, str(root))
    import src.masks.multiblock as multiblock
    import src.masks.utils as mask_utils
    import src.models.vision_transformer as vit
    import src.utils.tensors as tensors

    if root not in Path(vit.__file__).resolve().parents:
        fail(f"--official {root}: 'src' resolved to {vit.__file__}, another package named src shadows it")
    return {"vit": vit, "MaskCollator": multiblock.MaskCollator, "apply_masks": mask_utils.apply_masks,
            "repeat_interleave_batch": tensors.repeat_interleave_batch}


def official_commit(root: Path) -> str:
    """The checkout's commit: its own git HEAD, or the ``COMMIT`` file of an exported tree (a tree
    inside another repository must not report that repository's HEAD)."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.split()
        if Path(out[0]).resolve() == root.resolve():
            return out[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        pass
    if (root / "COMMIT").is_file():
        return (root / "COMMIT").read_text().strip()
    return "unknown (not a git checkout)"


class Official:
    """facebookresearch/ijepa: its models, collator and helpers; the step of its train.py."""

    name = "official"

    def __init__(self, mods: dict[str, Any], cfg: Config, seed: int):
        self.cfg = cfg  # the same architecture: the analytic FLOP count reads it
        vit = mods["vit"]
        self.apply_masks = mods["apply_masks"]
        self.repeat_interleave_batch = mods["repeat_interleave_batch"]
        size, patch = cfg.model.encoder.split("_")[1:]
        model_name, patch = f"vit_{size}", int(patch)
        if model_name not in vit.__dict__:
            fail(f"--models: the official code has no {model_name}")
        torch.manual_seed(seed)
        # as src/helper.py init_model
        self.encoder = vit.__dict__[model_name](img_size=[cfg.model.image_size], patch_size=patch)
        self.predictor = vit.vit_predictor(
            num_patches=self.encoder.patch_embed.num_patches,
            embed_dim=self.encoder.embed_dim,
            predictor_embed_dim=cfg.model.predictor_width,
            depth=cfg.model.predictor_depth,
            num_heads=self.encoder.num_heads,
        )
        # as src/train.py
        self.target_encoder = copy.deepcopy(self.encoder)
        for p in self.target_encoder.parameters():
            p.requires_grad = False
        # as src/helper.py init_opt (weight decay as its CosineWDSchedule sets it at step 0)
        enc, pred = list(self.encoder.named_parameters()), list(self.predictor.named_parameters())

        def decayed(n: str, p: torch.Tensor) -> bool:
            return ("bias" not in n) and (len(p.shape) != 1)

        groups = [
            {"params": [p for n, p in enc if decayed(n, p)], "weight_decay": WEIGHT_DECAY},
            {"params": [p for n, p in pred if decayed(n, p)], "weight_decay": WEIGHT_DECAY},
            {"params": [p for n, p in enc if not decayed(n, p)], "WD_exclude": True, "weight_decay": 0},
            {"params": [p for n, p in pred if not decayed(n, p)], "WD_exclude": True, "weight_decay": 0},
        ]
        self.opt = torch.optim.AdamW(groups, lr=LR)  # as init_opt: no foreach argument
        self.bf16, self.scaler = False, None  # the fp32 branch of train_step (bench_gpu.py sets both)
        m = MASK
        self.collator = _recording_collator(mods["MaskCollator"])(
            input_size=(cfg.model.image_size, cfg.model.image_size),
            patch_size=patch,
            enc_mask_scale=m["context_scale"],
            pred_mask_scale=m["target_scale"],
            aspect_ratio=m["target_aspect"],
            nenc=1,
            npred=m["num_targets"],
            min_keep=m["min_context"],
            allow_overlap=False,
        )

    def sample(self, batch: int) -> tuple[Any, dict[str, float]]:
        self.collator.enc_lengths = []
        _, masks_enc, masks_pred = self.collator([0] * batch)  # the collator also collates the batch
        stats = {
            "ctx_len": float(masks_enc[0].shape[1]),
            "ctx_kept": masks_enc[0].numel() / sum(self.collator.enc_lengths),
            "tgt_len": float(masks_pred[0].shape[1]),
        }
        return (masks_enc, masks_pred), stats

    def step(self, imgs: torch.Tensor, masks: Any) -> torch.Tensor:
        """``train_step`` of its ``src/train.py``: the fp32 branch, or under ``self.bf16`` the bf16 one
        (autocast around targets, context and loss; ``self.scaler``, a GradScaler, if set)."""
        masks_enc, masks_pred = masks
        apply_masks, repeat_interleave_batch = self.apply_masks, self.repeat_interleave_batch
        # -- Step 1. Forward
        with torch.autocast(imgs.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            with torch.no_grad():  # forward_target
                h = self.target_encoder(imgs)
                h = F.layer_norm(h, (h.size(-1),))
                B = len(h)
                h = apply_masks(h, masks_pred)
                h = repeat_interleave_batch(h, B, repeat=len(masks_enc))
            z = self.encoder(imgs, masks_enc)  # forward_context
            z = self.predictor(z, masks_enc, masks_pred)
            loss = F.smooth_l1_loss(z, h)  # loss_fn (AllReduce: identity in one process)
        # -- Step 2. Backward & step
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad()
        # -- Step 3. momentum update of target encoder
        with torch.no_grad():
            m = MOMENTUM
            for param_q, param_k in zip(self.encoder.parameters(), self.target_encoder.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
        return loss.detach()


def _recording_collator(base: type) -> type:
    """The official MaskCollator, also recording each context block's size before truncation
    (to report the fraction of context the truncation keeps). Sampling itself is untouched."""

    class RecordingCollator(base):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.enc_lengths: list[int] = []

        def _sample_block_mask(self, b_size, acceptable_regions=None):
            mask, complement = super()._sample_block_mask(b_size, acceptable_regions=acceptable_regions)
            if acceptable_regions is not None:  # context blocks are the constrained ones
                self.enc_lengths.append(int(mask.numel()))
            return mask, complement

    return RecordingCollator


# ----------------------------------------------------------------------------- timing


def run_steps(runner: Any, images: torch.Tensor, masks: list[Any]) -> None:
    for mb in masks:
        runner.step(images, mb)


def sample_many(runner: Any, batch: int, n: int) -> tuple[list[Any], list[dict[str, float]], list[float]]:
    masks, stats, secs = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        mb, st = runner.sample(batch)
        secs.append(time.perf_counter() - t0)  # includes our untruncated re-draw for the stats
        masks.append(mb)
        stats.append(st)
    return masks, stats, secs


def profile(runner: Any, images: torch.Tensor, masks: list[Any], rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for mb in masks:
            runner.step(images, mb)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


class LoadMonitor:
    """How busy the rest of the machine was during a timed step, in cores: (all busy CPU time,
    steal included, minus this process's CPU time) / wall time, from /proc (Linux). Steps during
    which other processes ran are flagged so the summary can use quiet steps only; None where
    /proc is unavailable."""

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ok = self._read() is not None

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(vals) - vals[3] - vals[4]  # minus idle and iowait
        return busy, int(fields[11]) + int(fields[12])  # utime + stime of this process

    def start(self) -> tuple[float, tuple[int, int] | None]:
        return time.perf_counter(), self._read()

    def stop(self, mark: tuple[float, tuple[int, int] | None]) -> tuple[float, float | None]:
        t0, a = mark
        wall = time.perf_counter() - t0
        b = self._read()
        if a is None or b is None:
            return wall, None
        other = ((b[0] - a[0]) - (b[1] - a[1])) / self.tick
        return wall, max(0.0, other / wall)


    def wait_idle(self, limit_s: float, max_other: float, window_s: float = 2.0) -> float:
        """Sleep until the rest of the machine used at most ``max_other`` cores over ``window_s``,
        or ``limit_s`` passed; returns the seconds waited."""
        t0 = time.perf_counter()
        while self.ok and time.perf_counter() - t0 < limit_s:
            mark = self.start()
            time.sleep(window_s)
            if self.stop(mark)[1] <= max_other:
                break
        return time.perf_counter() - t0


def matmul_peak(threads: int, n: int = 1024, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """The machine's matmul FLOP/s in ``dtype`` with ``threads`` threads, measured now (best of
    ``reps`` rounds of square ``n x n`` products): the denominator of the model FLOP utilisation."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def step_flops(runner: Any, inv: Any, masks: Any) -> float:
    """Model FLOPs per image of a step on these masks: analytic, real tokens only
    (``tcjepa.plan.model_flops``, the count that equals torch's FLOP counter on unpadded masks);
    ``inv``: the runner's ``tcjepa.plan.inventory``."""
    from tcjepa.plan import TokenStats, model_flops, stats_of_masks

    full = inv.grid ** 2
    if isinstance(runner, Ours):
        return model_flops(inv, stats_of_masks(masks, full)).train
    enc, pred = masks
    B, nc, nt = enc[0].shape[0], enc[0].shape[1], pred[0].shape[1]
    return model_flops(inv, TokenStats(B, len(pred), full, (nc,) * B, nc, ((nt,) * len(pred),) * B, nt, False)).train


def activation_bytes(runner: Any, images: torch.Tensor, masks: Any) -> float:
    """Bytes autograd keeps for backward in one step (tensor storages; parameters excluded), per image."""
    from tcjepa.plan import saved_tensor_bytes

    if isinstance(runner, Ours):
        exclude = [*runner.student.parameters(), *runner.method.teacher.parameters(), *runner.student.buffers()]
    else:
        exclude = [*runner.encoder.parameters(), *runner.predictor.parameters(), *runner.target_encoder.parameters()]
    _, saved = saved_tensor_bytes(lambda: runner.step(images, masks), exclude)
    return saved / images.size(0)


def summarise(times: list[float], ref: list[float] | None, B: int) -> dict[str, Any]:
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [med, med, med]
    return {
        "step_s_median": med,
        "step_s_q1": q[0],
        "step_s_q3": q[2],
        "img_per_s": B / med,
        # step i of every variant ran back to back, so their ratio saw the same machine load
        "ratio_vs_official": statistics.median(a / b for a, b in zip(times, ref)) if ref else None,
        "ratio_of_medians": med / statistics.median(ref) if ref else None,
        "steps": len(times),
    }


def bench_model(encoder: str, args: argparse.Namespace, mods: dict[str, Any] | None) -> dict[str, Any]:
    B = args.batch_size
    runners: list[Any] = [
        Ours(make_config(encoder, args.image_size, args.pred_depth, args.pred_width, B, policy), args.seed)
        for policy in ("pad", "official")
    ]
    if args.checkpointing:  # model.activation_checkpointing: its time and memory beside plain pad
        runners.append(Ours(make_config(encoder, args.image_size, args.pred_depth, args.pred_width, B, "pad"),
                            args.seed, checkpointing=True))
    if args.one_group:  # attention over whole padded rows: the layout before length grouping
        runners.append(Ours(make_config(encoder, args.image_size, args.pred_depth, args.pred_width, B, "pad"),
                            args.seed, one_group=True))
    if args.bf16:  # train.precision=bf16 (CPU autocast; fp32 master weights, optimiser and EMA)
        runners += [Ours(make_config(encoder, args.image_size, args.pred_depth, args.pred_width, B, policy, "bf16"),
                         args.seed) for policy in ("pad", "official")]
    if mods is not None:
        runners.append(Official(mods, runners[0].cfg, args.seed))
    names = [r.name for r in runners]
    images = torch.randn(B, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(args.seed))
    monitor = LoadMonitor()

    times: dict[str, list[float]] = {n: [] for n in names}
    quiet_pair: list[bool] = []  # step i of every variant ran while the rest of the machine was idle
    round_medians: dict[str, list[float]] = {n: [] for n in names}
    stats: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    sample_secs: dict[str, list[float]] = {n: [] for n in names}
    flops: dict[str, list[float]] = {n: [] for n in names}
    from tcjepa.plan import inventory

    inventories = {r.name: inventory(r.cfg) for r in runners}  # built once: it depends on the config only

    for r in runners:  # warm-up (allocator, oneDNN primitive caches)
        masks, _, _ = sample_many(r, B, args.warmup)
        run_steps(r, images, masks)
    for rnd in range(args.rounds):
        batches = {}
        for r in runners:  # masks first, outside the timed region
            masks, st, secs = sample_many(r, B, args.steps)
            flops[r.name] += [step_flops(r, inventories[r.name], m) for m in masks]
            batches[r.name] = masks
            stats[r.name] += st
            sample_secs[r.name] += secs
        gc.collect()
        if args.wait_idle:
            waited = monitor.wait_idle(args.wait_idle, args.max_other_load)
            if waited > 2.5:
                print(f"  waited {waited:.0f} s for other processes to finish", flush=True)
        round_times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(args.steps):  # interleave step by step, rotating who goes first
            k = (rnd * args.steps + i) % len(runners)
            quiet = True
            for r in runners[k:] + runners[:k]:
                mark = monitor.start()
                r.step(images, batches[r.name][i])
                wall, other = monitor.stop(mark)
                round_times[r.name].append(wall)
                quiet = quiet and (other is None or other <= args.max_other_load)
            quiet_pair.append(quiet)
        for n in names:
            times[n] += round_times[n]
            round_medians[n].append(statistics.median(round_times[n]))
        print(f"  {encoder} round {rnd + 1}/{args.rounds}: "
              + ", ".join(f"{n} {round_medians[n][-1]:.3f}" for n in names)
              + f" s/step (median); quiet steps so far {sum(quiet_pair)}/{len(quiet_pair)}", flush=True)

    quiet_times = {n: [t for t, q in zip(times[n], quiet_pair) if q] for n in names}
    use_quiet = sum(quiet_pair) >= args.min_quiet
    result: dict[str, Any] = {"encoder": encoder, "summary_from": "quiet" if use_quiet else "all", "variants": {}}
    for r in runners:
        n = r.name
        every = summarise(times[n], times.get("official"), B)
        quiet = summarise(quiet_times[n], quiet_times.get("official"), B) if sum(quiet_pair) else None
        result["variants"][n] = {
            **(quiet if use_quiet else every),
            "all_steps": every,
            "quiet_steps": quiet,
            "round_medians_s": round_medians[n],
            "ctx_tokens_computed": statistics.mean(s["ctx_len"] for s in stats[n]),
            "ctx_fraction_kept": statistics.mean(s["ctx_kept"] for s in stats[n]),
            "target_tokens_per_block": statistics.mean(s["tgt_len"] for s in stats[n]),
            "mask_sample_ms_median": 1e3 * statistics.median(sample_secs[n]),
        }
    peaks = {"fp32": matmul_peak(args.threads)}
    result["matmul_peak_flops"] = peaks["fp32"]
    if args.bf16:  # bf16 variants' MFU is against the bf16 peak (about twice the fp32 one on AVX512-BF16 / AMX CPUs)
        peaks["bf16"] = result["matmul_peak_flops_bf16"] = matmul_peak(args.threads, dtype=torch.bfloat16)
    for r in runners:
        v = result["variants"][r.name]
        v["model_flops_per_img"] = statistics.mean(flops[r.name])  # over every timed batch of masks
        v["achieved_flops"] = v["model_flops_per_img"] * v["img_per_s"]
        v["mfu"] = v["achieved_flops"] / peaks[r.cfg.train.precision]
        masks, _, _ = sample_many(r, B, 3)
        v["activation_bytes_per_img"] = statistics.mean(activation_bytes(r, images, m) for m in masks)
    if args.profile:
        for r in runners:
            masks, _, _ = sample_many(r, B, args.profile)
            print(f"\n### profile: {encoder} {r.name} ({args.profile} steps, self CPU time)\n")
            print(profile(r, images, masks, args.profile_rows))
    return result


def markdown(results: list[dict[str, Any]], batch: int) -> str:
    lines = [
        "| encoder | variant | step s (median) | [q1, q3] | img/s | time ratio ours/official | steps used "
        "| context tokens computed | context kept | target tokens/block | mask sampling ms "
        "| model GFLOP/img | MFU | activation MiB/img |",
        "|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for name, v in res["variants"].items():
            ratio = "1.00 (ref)" if name == "official" else (
                f"{v['ratio_vs_official']:.2f}" if v["ratio_vs_official"] is not None else "n/a")
            lines.append(
                f"| {res['encoder']} | {name} | {v['step_s_median']:.3f} | [{v['step_s_q1']:.3f}, {v['step_s_q3']:.3f}] "
                f"| {v['img_per_s']:.2f} | {ratio} | {v['steps']} {res['summary_from']} "
                f"| {v['ctx_tokens_computed']:.1f} | {v['ctx_fraction_kept']:.3f} "
                f"| {v['target_tokens_per_block']:.1f} | {v['mask_sample_ms_median']:.1f} "
                f"| {v['model_flops_per_img'] / 1e9:.2f} | {v['mfu']:.1%} | {v['activation_bytes_per_img'] / 2**20:.1f} |"
            )
        bf16 = f", bf16 {res['matmul_peak_flops_bf16'] / 1e9:.1f}" if "matmul_peak_flops_bf16" in res else ""
        lines.append(f"\n{res['encoder']}: matmul peak measured in the same run: fp32 "
                     f"{res['matmul_peak_flops'] / 1e9:.1f}{bf16} GFLOP/s.")
    lines.append(
        f"\nbatch {batch}. Ratio: median over steps of ours / official for steps run back to back (< 1: ours is "
        "faster). Steps used: 'quiet' = only steps during which the rest of the machine used at most "
        "--max-other-load cores (all variants' step i together), else 'all'. Context kept: context patches the "
        "encoder sees / context patches sampled (truncation to the batch minimum drops the rest). Model GFLOP/img: "
        "analytic matmul FLOPs of a training step per image (forward x3 for the student, x1 for the teacher; real "
        "tokens only), MFU: those FLOPs x img/s over the matmul peak of the same run in the variant's precision "
        "(official: fp32). Activation MiB/img: bytes "
        "autograd keeps for backward (tensor storages, parameters excluded) per image."
    )
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "official_path": str(args.official) if args.official else None,
        "official_commit": official_commit(args.official) if args.official else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_tiny_16,vit_small_16", help="comma-separated encoder names")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before the rounds")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--pred-depth", type=int, default=6, help="predictor depth (the official ViT-H recipe uses 12)")
    p.add_argument("--pred-width", type=int, default=384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-other-load", type=float, default=0.15, metavar="CORES",
                   help="a step is quiet if other processes used at most this many cores meanwhile")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                   help="before each round, wait up to S seconds for the rest of the machine to go idle")
    p.add_argument("--min-quiet", type=int, default=5,
                   help="summarise quiet steps only if at least this many steps (one of each variant) were quiet")
    p.add_argument("--official", type=Path, default=None, help="checkout of facebookresearch/ijepa")
    p.add_argument("--checkpointing", action="store_true",
                   help="also time ours/pad with model.activation_checkpointing (variant ours/pad+ckpt)")
    p.add_argument("--quick", action="store_true", help="smoke run: vit_tiny_16, batch 8, 2 rounds of 2 steps")
    p.add_argument("--one-group", action="store_true",
                   help="also time ours/pad with attention over whole padded rows (variant ours/pad+1group), "
                        "the layout before length-grouped attention")
    p.add_argument("--bf16", action="store_true",
                   help="also time ours with train.precision=bf16 at both policies (ours/pad+bf16, ours/official+bf16); "
                        "the official code stays fp32, its only CPU mode (its autocast is CUDA-only)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="after timing, profile N steps per variant")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batch_size, args.steps, args.rounds, args.warmup = "vit_tiny_16", 8, 2, 2, 1
    for name in ("batch_size", "steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.profile < 0:
        fail("--warmup and --profile must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    mods = import_official(args.official) if args.official else None
    if mods is None:
        print("no --official checkout given: measuring ours only (no ratios)", flush=True)
    env = environment(args)
    print(f"torch {env['torch']}, {env['threads']} threads, {env['cpu']}; official: {env['official_commit']}", flush=True)
    encoders = [m.strip() for m in args.models.split(",") if m.strip()]
    for encoder in encoders:  # check every config before spending minutes on the first
        try:
            make_config(encoder, args.image_size, args.pred_depth, args.pred_width, args.batch_size, "pad")
        except ValueError as e:
            fail(f"--models: {e}")
    results = [bench_model(encoder, args, mods) for encoder in encoders]
    table = markdown(results, args.batch_size)
    print("\n" + table)
    if args.json:
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        payload = {"environment": env, "settings": settings, "mask": MASK, "momentum": MOMENTUM, "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
