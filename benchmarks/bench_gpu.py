"""GPU throughput and model FLOP utilisation (MFU) of one I-JEPA training step, beside the official code.

The step is the one ``bench_train_step.py`` times on CPU (EMA-teacher targets, context encoder,
predictor, smooth-L1 loss, backward, AdamW, EMA update; I-JEPA multi-block masks: 4 targets of
scale 0.15-0.2 and aspect 0.75-1.5, one context block of scale 0.85-1.0, at least 10 context
patches), run here on one GPU under bf16 autocast (fp32 master weights, fp32 EMA teacher).
Model construction, masks and the official import are reused from ``bench_train_step.py``.
Predictor: depth 6, width 384 (``--pred-depth``/``--pred-width``, as in ``bench_train_step.py``;
the official ViT-H recipe uses depth 12), heads = the encoder's.

Variants (``--variants``), each in its own ``try`` so that a failure (compile error, OOM, time
budget) is recorded and the rest still runs:

* ``official``             facebookresearch/ijepa from ``--official PATH``: its models (attention is
                           the manual ``softmax(q k^T) v``), collator and helpers; the bf16 branch of
                           ``train_step`` in its ``src/train.py``: ``autocast(bfloat16)`` around targets,
                           context and loss, ``GradScaler`` (as ``src/helper.py`` creates for bf16),
                           AdamW with ``init_opt``'s groups, per-parameter EMA loop;
* ``ours/pad``             tcjepa, ``mask.policy=pad`` (every context patch kept, so sequence lengths
                           differ): per-token layers on the packed real tokens, attention by torch's
                           varlen flash attention on them where it runs (CUDA, bf16, torch >= 2.10),
                           else on length groups with padded keys masked;
* ``ours/pad+groups``      ``ours/pad`` with varlen switched off (``varlen_attention(False)``): the
                           length groups, the layout before varlen attention;
* ``ours/pad+1group``      ``ours/pad`` with attention over the whole padded rows (one group), the
                           layout before length-grouped attention (``tcjepa.models.attention.Packing``);
* ``ours/official+stocknorm``  ``ours/official`` with the blocks' norms turned back into
                           ``nn.LayerNorm``, which CUDA autocast runs in fp32 (bf16 -> fp32 -> bf16
                           copies around every norm); ours (``tcjepa.models.vit.LayerNorm``) keeps bf16;
* ``ours/official``        tcjepa, ``mask.policy=official`` (contexts truncated to the batch minimum as
                           the official collator does; no mask, so SDPA can pick flash attention;
                           the kernel that ran is reported per eager variant);
* ``...+compile``          the same with ``torch.compile`` (mode default) on the student (context
                           encoder + predictor + loss) and on the teacher; the mask-length dimensions
                           are marked dynamic. Compile time (warm-up wall time minus the warm-up steps
                           at the timed median) is reported separately and excluded from the timing.

Ours steps as ``tcjepa.train`` does (``JEPA.targets`` under autocast, student under autocast,
backward, fused AdamW on ``param_groups``, foreach EMA), without DeepSpeed and without
GradScaler (bf16 needs none). No variant copies the loss to the host inside the timed steps
(``tcjepa.train`` syncs once per logging window; the official loop's per-step ``float(loss)`` is
logging); syncs the code itself needs (GradScaler's inf check, the lengths in our padded path) stay.

Timing: masks are sampled on the CPU and moved to the GPU before timing (in training the loader
workers do this); images are one fixed random batch on the GPU. ``--warmup`` untimed steps, then
``--steps`` steps back to back with a CUDA event recorded between steps and one synchronize at the
end; step time = time between consecutive events (median reported; the mean is in the JSON).
img/s = batch / median step time. Peak memory = ``torch.cuda.max_memory_allocated`` over the timed
steps (reset after warm-up, so weights, AdamW state and activations of a steady step).

Peak: the mean of 10 back-to-back bf16 matmuls of ``--peak-size``^3 (8192) after warm-up, measured
in the same run. MFU = model FLOPs per step / median step time / measured peak (also given against
the datasheet dense bf16 peak where the GPU is known).

Model FLOPs, counted analytically (matmuls only, 2*m*n*k each; norms, softmax, GELU, optimizer
and EMA are not counted; backward = 2x forward, except the patch embedding whose input needs no
gradient, so its backward is 1x). Per ViT block of width D, MLP width F and a sequence of n
tokens attending over a tokens:  qkv 6nD^2 + proj 2nD^2 + MLP 4nDF + attention (q k^T and a v)
4a^2 D. With B images, N = 196 patches, P = 3*16*16, L encoder blocks, Lp predictor blocks of width
Dp, c_b context tokens of image b and n_bt tokens of its target block t:

    teacher   (fwd)          2BNPD + L * sum_b block(n=N, a=N)
    context   (fwd+bwd)      2 * 2BNPD + 3L * sum_b block(n=c_b, a=c_b)
    predictor (fwd+bwd)      3 * [ sum_b 2 c_b D Dp                              (predictor_embed)
                                 + Lp * sum_bt block_p(n=c_b+n_bt, a=c_b+n_bt)   (one sequence per target)
                                 + sum_bt 2 n_bt Dp D ]                          (predictor_proj)

"Model" FLOPs (used for MFU) count real tokens only, so padding never counts as useful work and
ours/pad (which keeps every context patch) does more useful work per image than the truncating
variants. "Executed" FLOPs count what the implementation computes: ours/pad runs per-token layers
on real tokens only, attention on length groups each padded to its longest (whole padded rows when
compiled), ``predictor_embed`` and ``predictor_proj`` on padded rows.
Cross-check with ``torch.utils.flop_counter.FlopCounterMode`` (run at every start on the CPU in a
tiny config: vit_tiny_16, 224 px, batch 17, predictor depth 2 width 96, fp32, math SDPA so that
attention shows up as counted ``bmm``; and on the device for one extra step of every eager
variant): the analytic executed FLOPs agree with the counter exactly (ratio 1.000000) for
ours/pad, ours/official and official on the CPU. On CUDA the counter also counts the flash and
memory-efficient SDPA kernels, so the same ratio is reported per eager variant.

Time budget: ``--time-budget`` seconds from the start of the script (imports included); a variant
still running at the deadline is interrupted (SIGALRM) and recorded as over budget, a compile
variant starts only with ``--compile-reserve`` seconds left. The JSON is rewritten after every
variant, so a run cut short keeps what finished.

    python benchmarks/bench_gpu.py --official /path/to/ijepa --json gpu.json      # one GPU, ~6 min
    python benchmarks/bench_gpu.py --device cpu --quick --official /path/to/ijepa   # CPU smoke run
"""

from __future__ import annotations

import time

_T0 = time.monotonic()  # the time budget counts from here: imports included

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
for _path in (_HERE.parent, _HERE):  # tcjepa from this checkout (no install needed), bench_train_step beside us
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

try:  # only tcjepa.config, tcjepa.masks and tcjepa.methods.jepa (no deepspeed, webdataset, open_clip)
    from bench_train_step import (MASK, MOMENTUM, Official, Ours, fail, import_official, make_config, official_commit,
                                  stock_layer_norms)
    from tcjepa.config import Config
    from tcjepa.masks import MaskBatch, sample_masks
    from tcjepa.methods.jepa import ema_update
    from tcjepa.plan import ATTENTION_MODES
    from tcjepa.models.attention import grouped_layout, varlen_attention, varlen_available, whole_row_attention
    from tcjepa.models.vit import parse_encoder_name
except ImportError as e:  # pragma: no cover - depends on the machine
    print(f"error: {e}; bench_gpu.py needs torch, numpy, pyyaml and this checkout's tcjepa "
          "(tcjepa.config, tcjepa.masks, tcjepa.methods.jepa); install the missing module", file=sys.stderr)
    sys.exit(2)

VARIANTS = ("official", "ours/pad", "ours/official", "ours/official+compile", "ours/pad+compile")
EXTRA_VARIANTS = ("ours/pad+groups", "ours/pad+1group", "ours/official+stocknorm")  # only when named in --variants
# Datasheet dense bf16 peaks (no sparsity), matched against torch.cuda.get_device_name in this order.
SPEC_PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
                  ("A100", 312e12), ("L40S", 362e12))


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {msg}", flush=True)


# ----------------------------------------------------------------------------- time budget


class OverBudget(Exception):
    """Raised by SIGALRM when the time budget runs out in the middle of a variant."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Interrupt the body with :class:`OverBudget` after ``seconds`` (main thread, POSIX)."""
    if seconds <= 0:
        raise OverBudget("no time left")
    if not hasattr(signal, "setitimer"):  # no alarms here: the budget is checked between variants only
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise OverBudget(f"time budget exhausted after {seconds:.0f} s in this variant")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------- device helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: torch.device, n: int, iters: int = 10, warmup: int = 3) -> float:
    """bf16 FLOP/s of an n x n x n matmul: the mean over ``iters`` back-to-back calls."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        seconds = time.perf_counter() - t0
    return 2.0 * n**3 * iters / seconds


def spec_peak(device: torch.device) -> tuple[str | None, float | None]:
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    for key, peak in SPEC_PEAK_BF16:
        if key in name:
            return key, peak
    return None, None


def unique_graphs() -> int | None:
    """Graphs dynamo compiled so far in this process (to spot recompiles during timed steps)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # a private counter; absent in some versions
        return None


class AttentionOps(TorchDispatchMode):
    """Records the aten attention kernels a step dispatches to (which SDPA backend ran)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = str(func.overloadpacket)
        if ("attention" in name or "varlen_attn" in name) and "backward" not in name:
            self.seen.add(name.removeprefix("aten."))
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- analytic FLOPs


@dataclasses.dataclass(frozen=True)
class Tower:
    """Matmul-relevant sizes of a stack of ViT blocks."""

    width: int
    depth: int
    mlp: int


@dataclasses.dataclass(frozen=True)
class StepDims:
    encoder: Tower
    predictor: Tower
    batch: int
    num_patches: int
    patch_in: int  # in_chans * patch^2: the patch embedding's reduction size


@dataclasses.dataclass(frozen=True)
class TokenCounts:
    """Token sums of one step. ``*_tokens``: tokens through per-token layers, summed over sequences;
    ``*_attn_sq``: squared attention length, summed over sequences (one sequence per image in the
    context encoder, one per image and target block in the predictor)."""

    enc_tokens: int
    enc_attn_sq: int
    embed_tokens: int  # through predictor_embed
    pred_tokens: int
    pred_attn_sq: int
    proj_tokens: int  # through predictor_proj

    def context_per_image(self, batch: int) -> float:
        return self.enc_tokens / batch


def dims_for(cfg: Config) -> StepDims:
    m = cfg.model
    arch = parse_encoder_name(m.encoder, m.depth)
    grid = m.image_size // arch.patch_size
    return StepDims(
        encoder=Tower(arch.width, arch.depth, int(arch.width * arch.mlp_ratio)),
        predictor=Tower(m.predictor_width, m.predictor_depth, int(m.predictor_width * arch.mlp_ratio)),
        batch=cfg.train.batch_size,
        num_patches=grid * grid,
        patch_in=3 * arch.patch_size**2,
    )


def blocks_flops(t: Tower, tokens: int, attn_sq: int) -> int:
    """Forward matmul FLOPs of ``t.depth`` blocks: qkv, proj, MLP on ``tokens``; q k^T and a v."""
    D = t.width
    return t.depth * (2 * tokens * D * 3 * D + 2 * tokens * D * D + 2 * 2 * tokens * D * t.mlp + 2 * 2 * attn_sq * D)


def step_flops(d: StepDims, c: TokenCounts) -> dict[str, int]:
    """Matmul FLOPs of one training step (see the module docstring), by part."""
    e, p, B, N = d.encoder, d.predictor, d.batch, d.num_patches
    patch = 2 * B * N * d.patch_in * e.width
    parts = {
        "teacher": patch + blocks_flops(e, B * N, B * N * N),
        "context_encoder": 2 * patch + 3 * blocks_flops(e, c.enc_tokens, c.enc_attn_sq),
        "predictor": 3 * (2 * c.embed_tokens * e.width * p.width
                          + blocks_flops(p, c.pred_tokens, c.pred_attn_sq)
                          + 2 * c.proj_tokens * p.width * e.width),
    }
    parts["total"] = sum(parts.values())
    return parts


def counts_ours(m: MaskBatch, executed: bool, attention: str = "groups") -> TokenCounts:
    """Token counts of a tcjepa mask batch: real tokens, or (``executed``) what our padded path
    computes: per-token layers on real tokens, embed/proj on padded rows, and attention on
    ``attention``: "groups", length groups padded to their longest (``tcjepa.models.attention.Packing``);
    "rows", the whole padded rows (under ``torch.compile``); "varlen", the real tokens only."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention: {attention!r}, expected one of {ATTENTION_MODES}")
    B, Nc = m.context_idx.shape
    T, Nt = m.target_idx.shape[1:]
    ctx = m.num_context()  # [B]
    seq = ctx[:, None] + m.num_target()  # [B, T]
    if executed and m.padded and attention == "rows":
        return TokenCounts(int(ctx.sum()), B * Nc * Nc, B * Nc, int(seq.sum()), B * T * (Nc + Nt) ** 2, B * T * Nt)
    if executed and m.padded and attention == "varlen":
        return TokenCounts(int(ctx.sum()), int((ctx**2).sum()), B * Nc, int(seq.sum()), int((seq**2).sum()), B * T * Nt)
    if executed and m.padded:
        enc_sq, pred_sq = grouped_layout(ctx.tolist())[1], grouped_layout(seq.flatten().tolist())[1]
        return TokenCounts(int(ctx.sum()), enc_sq, B * Nc, int(seq.sum()), pred_sq, B * T * Nt)
    return TokenCounts(int(ctx.sum()), int((ctx**2).sum()), int(ctx.sum()), int(seq.sum()), int((seq**2).sum()),
                       int(m.num_target().sum()))


def counts_official(masks_enc: list[torch.Tensor], masks_pred: list[torch.Tensor]) -> TokenCounts:
    """Token counts of the official collator's masks (every row the same length: nothing padded)."""
    B, Nc = masks_enc[0].shape
    E, T, Nt = len(masks_enc), len(masks_pred), masks_pred[0].shape[1]
    seqs, L = E * T * B, Nc + Nt
    return TokenCounts(E * B * Nc, E * B * Nc * Nc, E * B * Nc, seqs * L, seqs * L * L, seqs * Nt)


def count_step(step: Any, *args: Any) -> tuple[int, list[str]]:
    """FLOPs counted by ``FlopCounterMode`` over one call of ``step``, and the attention kernels run."""
    with FlopCounterMode(display=False) as counter, AttentionOps() as ops:
        step(*args)
    return int(counter.get_total_flops()), sorted(ops.seen)


def check_flops_cpu(mods: dict[str, Any] | None, seed: int) -> dict[str, Any]:
    """Analytic executed FLOPs against ``FlopCounterMode`` for one fp32 CPU step of each runner of
    ``bench_train_step`` in a tiny config (math SDPA, so attention is counted as ``bmm``)."""
    B = 17  # two length groups in the encoder, eight in the predictor (tcjepa.models.attention.length_groups)
    out: dict[str, Any] = {"config": f"vit_tiny_16, 224 px, batch {B}, predictor depth 2 width 96, fp32, math SDPA"}
    images = torch.randn(B, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    runners: list[Any] = [Ours(make_config("vit_tiny_16", 224, 2, 96, B, pol), seed) for pol in ("pad", "official")]
    if mods is not None:
        runners.append(Official(mods, runners[0].cfg, seed))
    dims = dims_for(runners[0].cfg)
    for r in runners:
        masks, _ = r.sample(B)
        counts = counts_official(*masks) if r.name == "official" else counts_ours(masks, executed=True)
        with sdpa_kernel(SDPBackend.MATH):
            counted, _ = count_step(r.step, images, masks)
        analytic = step_flops(dims, counts)["total"]
        out[r.name] = {"counted": counted, "analytic": analytic, "ratio": counted / analytic}
    return out


# ----------------------------------------------------------------------------- runners


def _check_on(opt: torch.optim.Optimizer, device: torch.device, who: str) -> None:
    """``Module.to`` keeps Parameter objects, so optimizers built on the CPU still hold the moved
    parameters; fail loudly if a torch version ever changes that."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.device.type != device.type:
                raise RuntimeError(f"{who}: optimizer parameter left on {p.device} after moving the model to {device}")


class GPUOurs(Ours):
    """tcjepa's step on a device, bf16 autocast, optionally compiled."""

    def __init__(self, cfg: Config, seed: int, device: torch.device, compile_: bool, one_group: bool = False,
                 groups: bool = False, stock_norm: bool = False):
        super().__init__(cfg, seed, one_group=one_group)
        self.name = (f"ours/{cfg.mask.policy}" + ("+compile" if compile_ else "") + ("+1group" if one_group else "")
                     + ("+groups" if groups else "") + ("+stocknorm" if stock_norm else ""))
        if stock_norm:
            stock_layer_norms(self.student, self.method.teacher)
        self.device, self.compiled, self.groups = device, compile_, groups
        self.bf16 = cfg.train.precision == "bf16"
        # what tcjepa.models.attention.Packing will run: varlen where its kernel can (eager), else groups
        self.varlen = (not (compile_ or one_group or groups)
                       and varlen_available(device, torch.bfloat16 if self.bf16 else torch.float32))
        self.student.to(device)
        self.method.to(device)
        _check_on(self.opt, device, self.name)
        self.ema_teacher = self.method.teacher  # the module whose parameters the EMA updates
        self.forward: Any = self.student
        if compile_:
            self.forward = torch.compile(self.student)
            self.method.teacher = torch.compile(self.ema_teacher)  # what JEPA.targets calls

    def prepare(self, n: int) -> tuple[list[MaskBatch], list[TokenCounts], list[TokenCounts]]:
        """n mask batches on the device, with their model and executed token counts."""
        batches, model, executed = [], [], []
        kwargs = dataclasses.asdict(self.cfg.mask)  # as tcjepa.train draws them
        for _ in range(n):
            m = sample_masks(self.cfg.train.batch_size, self.grid, self.gen, **kwargs)
            model.append(counts_ours(m, executed=False))
            attention = "rows" if self.compiled or self.one_group else "varlen" if self.varlen else "groups"
            executed.append(counts_ours(m, executed=True, attention=attention))
            m = m.to(self.device, non_blocking=True)
            if self.compiled:  # context and target lengths change every batch: compile one dynamic graph
                for t in (m.context_idx, m.context_valid):
                    torch._dynamo.maybe_mark_dynamic(t, 1)
                for t in (m.target_idx, m.target_valid):
                    torch._dynamo.maybe_mark_dynamic(t, 2)
            batches.append(m)
        return batches, model, executed

    def step(self, images: torch.Tensor, masks: MaskBatch) -> torch.Tensor:
        layout = whole_row_attention() if self.one_group else varlen_attention(False) if self.groups else contextlib.nullcontext()
        with layout:
            targets = self.method.targets(images, masks)  # autocast inside, per train.precision
            if self.compiled:
                torch._dynamo.maybe_mark_dynamic(targets, 2)  # [B, T, Nt, D]
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.forward(images, masks, targets)
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        ema_update(self.ema_teacher, self.student.encoder, MOMENTUM)
        return loss.detach()


class GPUOfficial(Official):
    """facebookresearch/ijepa on a device: the bf16 branch of its ``train_step``."""

    def __init__(self, mods: dict[str, Any], cfg: Config, seed: int, device: torch.device):
        super().__init__(mods, cfg, seed)
        self.cfg, self.device = cfg, device
        self.bf16 = cfg.train.precision == "bf16"
        for m in (self.encoder, self.predictor, self.target_encoder):
            m.to(device)
        _check_on(self.opt, device, self.name)
        self.scaler = torch.amp.GradScaler(device.type) if self.bf16 else None  # as src/helper.py init_opt

    def prepare(self, n: int) -> tuple[list[Any], list[TokenCounts], list[TokenCounts]]:
        batches, counts = [], []
        for _ in range(n):
            (masks_enc, masks_pred), _ = self.sample(self.cfg.train.batch_size)
            counts.append(counts_official(masks_enc, masks_pred))
            batches.append(([u.to(self.device, non_blocking=True) for u in masks_enc],
                            [u.to(self.device, non_blocking=True) for u in masks_pred]))
        return batches, counts, counts


# ----------------------------------------------------------------------------- one variant


def make_runner(variant: str, encoder: str, args: argparse.Namespace, mods: dict[str, Any] | None,
                device: torch.device) -> Any:
    policy = "official" if variant == "official" or variant.startswith("ours/official") else "pad"
    cfg = make_config(encoder, args.image_size, args.pred_depth, args.pred_width, args.batch_size, policy)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=args.precision))
    if variant == "official":
        if mods is None:
            raise ValueError("the official variant needs --official PATH")
        return GPUOfficial(mods, cfg, args.seed, device)
    return GPUOurs(cfg, args.seed, device, compile_=variant.endswith("+compile"), one_group=variant.endswith("+1group"),
                   groups=variant.endswith("+groups"), stock_norm=variant.endswith("+stocknorm"))


def time_steps(runner: Any, images: torch.Tensor, batches: list[Any]) -> tuple[list[float], float, list[torch.Tensor]]:
    """Run the batches back to back; per-step seconds (CUDA events between steps, or wall time
    on the CPU), total wall seconds, and the losses (still on the device)."""
    device = images.device
    losses: list[torch.Tensor] = []
    synchronize(device)
    t0 = time.perf_counter()
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(batches) + 1)]
        events[0].record()
        for i, masks in enumerate(batches):
            losses.append(runner.step(images, masks))
            events[i + 1].record()
        torch.cuda.synchronize(device)
        steps = [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]
    else:
        steps = []
        for masks in batches:
            ts = time.perf_counter()
            losses.append(runner.step(images, masks))
            steps.append(time.perf_counter() - ts)
    return steps, time.perf_counter() - t0, losses


def run_variant(variant: str, encoder: str, args: argparse.Namespace, mods: dict[str, Any] | None,
                device: torch.device, peak: float, spec: float | None) -> dict[str, Any]:
    """Build, warm up (compile), time and measure one variant; raises on any failure."""
    t_start = time.monotonic()
    runner = make_runner(variant, encoder, args, mods, device)
    B = args.batch_size
    images = torch.randn(B, 3, args.image_size, args.image_size,
                         generator=torch.Generator().manual_seed(args.seed)).to(device)
    warm, _, _ = runner.prepare(args.warmup)
    timed, model_counts, exec_counts = runner.prepare(args.steps)
    dims = dims_for(runner.cfg)
    log(f"  {encoder} {variant}: built and sampled masks in {time.monotonic() - t_start:.1f} s; warming up")

    graphs_before = unique_graphs()
    t0 = time.perf_counter()
    for i, masks in enumerate(warm):
        runner.step(images, masks)
        if runner.name.endswith("+compile") and i == 0:
            synchronize(device)
            log(f"  {encoder} {variant}: first (compiling) step done after {time.perf_counter() - t0:.1f} s")
    synchronize(device)
    warmup_s = time.perf_counter() - t0
    graphs_warm = unique_graphs()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps, wall, losses = time_steps(runner, images, timed)
    graphs_timed = unique_graphs()
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    final = torch.stack(losses).float()
    if not bool(torch.isfinite(final).all()):
        raise FloatingPointError(f"non-finite loss in the timed steps: {final.tolist()}")

    med = statistics.median(steps)
    q = statistics.quantiles(steps, n=4) if len(steps) > 1 else [med, med, med]
    model = statistics.mean(step_flops(dims, c)["total"] for c in model_counts)
    executed = statistics.mean(step_flops(dims, c)["total"] for c in exec_counts)
    parts = {k: statistics.mean(step_flops(dims, c)[k] for c in model_counts)
             for k in ("teacher", "context_encoder", "predictor")}
    result: dict[str, Any] = {
        "status": "ok",
        "step_s_median": med, "step_s_q1": q[0], "step_s_q3": q[2], "step_s_mean": wall / len(steps),
        "step_s_all": steps,
        "img_per_s": B / med, "img_per_s_mean": B * len(steps) / wall,
        "model_flops_per_step": model, "model_flops_parts": parts, "executed_flops_per_step": executed,
        "achieved_flops_per_s": model / med,
        "mfu_measured_peak": model / med / peak,
        "mfu_spec_peak": model / med / spec if spec else None,
        "peak_mem_gib": peak_mem,
        "warmup_s": warmup_s,
        "compile_s_est": max(0.0, warmup_s - args.warmup * med) if runner.name.endswith("+compile") else None,
        "graphs_compiled_warmup": (graphs_warm - graphs_before) if graphs_before is not None else None,
        "graphs_compiled_timed": (graphs_timed - graphs_warm) if graphs_warm is not None else None,
        "context_tokens_per_img": statistics.mean(c.context_per_image(B) for c in model_counts),
        "final_loss": float(final[-1]),
        "steps": len(steps), "warmup": args.warmup,
    }
    if not runner.name.endswith("+compile") and args.count_flops:
        extra, _, ex_exec = runner.prepare(1)
        # on the CPU, SDPA's fused kernel is invisible to the counter; math SDPA shows up as bmm
        with sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext():
            counted, ops = count_step(runner.step, images, extra[0])
        synchronize(device)
        analytic = step_flops(dims, ex_exec[0])["total"]
        result.update(flops_counted=counted, flops_counted_ratio=counted / analytic, attention_ops=ops)
    result["variant_s"] = time.monotonic() - t_start
    del runner, warm, timed, losses
    return result


def run_guarded(variant: str, encoder: str, args: argparse.Namespace, mods: dict[str, Any] | None,
                device: torch.device, env: dict[str, Any], end: float) -> dict[str, Any]:
    """One variant under the time budget (ending at monotonic time ``end``); any failure is
    recorded in the returned row (status ``skipped``, ``over budget``, ``OOM`` or ``failed``)."""
    left = end - time.monotonic()
    need = args.compile_reserve if variant.endswith("+compile") else args.min_variant
    row: dict[str, Any] = {"encoder": encoder, "variant": variant}
    if left < need:
        row.update(status="skipped", error=f"time budget: {max(0.0, left):.0f} s left, {need:.0f} s needed")
        log(f"{encoder} {variant}: skipped ({row['error']})")
        return row
    log(f"{encoder} {variant}: start ({left:.0f} s of budget left)")
    try:
        with deadline(left):
            row.update(run_variant(variant, encoder, args, mods, device, env["peak_flops_measured"], env["peak_flops_spec"]))
        log(f"{encoder} {variant}: {1e3 * row['step_s_median']:.1f} ms/step, {row['img_per_s']:.0f} img/s, "
            f"MFU {100 * row['mfu_measured_peak']:.1f}% of measured peak, peak mem {row['peak_mem_gib'] or 0:.1f} GiB")
    except OverBudget as e:
        row.update(status="over budget", error=str(e))
        log(f"{encoder} {variant}: {e}")
    except Exception as e:
        row.update(status="OOM" if isinstance(e, torch.cuda.OutOfMemoryError) else "failed",
                   error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=-8))
        log(f"{encoder} {variant}: {row['status']}: {type(e).__name__}: {str(e)[:300]}")
    finally:
        try:
            cleanup(device, variant.endswith("+compile"))
        except Exception as e:  # a broken context must not hide the results so far
            log(f"cleanup after {variant} failed: {type(e).__name__}: {e}")
    return row


def cleanup(device: torch.device, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- report


def add_ratios(results: list[dict[str, Any]]) -> None:
    """``time_ratio_vs_official``: median step time ours / official of the same encoder (< 1: ours is faster)."""
    ref = {r["encoder"]: r["step_s_median"] for r in results if r["variant"] == "official" and r["status"] == "ok"}
    for r in results:
        if r["status"] == "ok" and r["encoder"] in ref:
            r["time_ratio_vs_official"] = r["step_s_median"] / ref[r["encoder"]]


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(results: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> str:
    peak = env["peak_flops_measured"]
    spec = env.get("peak_flops_spec")
    lines = [
        f"{env['device_name']}: measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s "
        f"({args.peak_size}^3, mean of 10)" + (f"; datasheet {spec / 1e12:.0f} TFLOP/s" if spec else "")
        + f". torch {env['torch']}, batch {args.batch_size}, {args.image_size} px, {args.precision}, "
        f"predictor depth {args.pred_depth} width {args.pred_width}.",
        "",
        "| encoder | variant | step ms (median) | img/s | time ratio ours/official | model TFLOP/step "
        "| TFLOP/s | MFU (measured peak) | MFU (datasheet) | peak mem GiB | compile s | context tokens/img "
        "| attention kernel | counted/analytic FLOPs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        head = f"| {r['encoder']} | {r['variant']} |"
        if r["status"] != "ok":
            error = " ".join(r.get("error", "").replace("|", "/").split())[:160]
            lines.append(f"{head} {r['status']}: {error} |" + " |" * 11)
            continue
        ratio = "1.00 (ref)" if r["variant"] == "official" else _fmt(r.get("time_ratio_vs_official"), ".2f")

        if r["variant"] == "official":
            kernel = "manual (bmm)"
        else:
            kernel = ", ".join(r.get("attention_ops", [])) or "n/a"
        lines.append(
            f"{head} {1e3 * r['step_s_median']:.1f} | {r['img_per_s']:.0f} | {ratio} "
            f"| {r['model_flops_per_step'] / 1e12:.2f} | {r['achieved_flops_per_s'] / 1e12:.1f} "
            f"| {_fmt(r['mfu_measured_peak'], '.1%')} | {_fmt(r['mfu_spec_peak'], '.1%')} "
            f"| {_fmt(r['peak_mem_gib'], '.1f')} | {_fmt(r['compile_s_est'], '.0f')} "
            f"| {r['context_tokens_per_img']:.1f} | {kernel} | {_fmt(r.get('flops_counted_ratio'), '.4f')} |"
        )
    lines.append(
        "\nTime ratio: median step time ours / official (< 1: ours is faster). Model FLOPs count real tokens only "
        "(ours/pad keeps every context patch, so it does more work per image than the truncating variants; "
        "compare those by MFU). Counted/analytic: FlopCounterMode over one extra eager step against the analytic "
        "executed FLOPs of its masks."
    )
    return "\n".join(lines)


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "official_path": str(args.official) if args.official else None,
        "official_commit": official_revision(args.official) if args.official else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
            capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
            sdp_enabled={k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                         for k in ("flash", "mem_efficient", "math", "cudnn") if hasattr(torch.backends.cuda, f"{k}_sdp_enabled")},
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        env["threads"] = torch.get_num_threads()
    return env


def official_revision(root: Path) -> str:
    """The commit of ``root`` if it is the top of a git checkout, else the content of a ``COMMIT``
    file in it (an exported tree, e.g. one placed inside this repository, whose own HEAD
    ``git -C`` would report)."""
    try:
        top = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, check=True).stdout.strip()
        if Path(top).resolve() == root.resolve():
            return official_commit(root)
    except (OSError, subprocess.CalledProcessError):
        pass
    if (root / "COMMIT").is_file():
        return (root / "COMMIT").read_text().strip() + " (from the COMMIT file)"
    return "unknown (not a git checkout, no COMMIT file)"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, default=None, help="checkout (or exported tree) of facebookresearch/ijepa")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--models", default="vit_base_16,vit_small_16", help="comma-separated encoders, run in this order")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, run in this order: {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    p.add_argument("--batch-size", type=int, default=256, help="global batch (one device)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--pred-depth", type=int, default=6)
    p.add_argument("--pred-width", type=int, default=384)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant (they include compilation)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--time-budget", type=float, default=360.0, metavar="S",
                   help="seconds for the whole script from its start; a variant still running then is cut off")
    p.add_argument("--compile-reserve", type=float, default=120.0, metavar="S",
                   help="start a +compile variant only with at least this many seconds of budget left")
    p.add_argument("--min-variant", type=float, default=15.0, metavar="S",
                   help="start an eager variant only with at least this many seconds of budget left")
    p.add_argument("--peak-size", type=int, default=8192, help="n of the n^3 bf16 matmul measuring the peak")
    p.add_argument("--no-count-flops", dest="count_flops", action="store_false",
                   help="skip the extra FlopCounterMode step per eager variant")
    p.add_argument("--no-compile", action="store_true", help="drop the +compile variants")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the figures here (after every variant)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: vit_tiny_16, batch 4, 1 warm-up + 2 timed steps, no compile, small peak matmul")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batch_size, args.warmup, args.steps, args.no_compile = "vit_tiny_16", 4, 1, 2, True
        args.peak_size = min(args.peak_size, 1024)
    for name in ("batch_size", "steps", "image_size", "peak_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        fail("--warmup must be >= 0")
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variant_list if v not in VARIANTS + EXTRA_VARIANTS]
    if bad:
        fail(f"--variants: unknown {bad[0]!r}; choose from {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    if args.no_compile:
        args.variant_list = [v for v in args.variant_list if not v.endswith("+compile")]
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device visible to torch; use --device cpu for a smoke run")
    if args.threads:
        torch.set_num_threads(args.threads)
    for encoder in args.model_list:  # check every config before spending minutes on the first
        try:
            make_config(encoder, args.image_size, args.pred_depth, args.pred_width, args.batch_size, "pad")
        except ValueError as e:
            fail(f"--models: {e}")
    mods = import_official(args.official) if args.official else None
    if mods is None and "official" in args.variant_list:
        log("no --official checkout given: skipping the official variant (no ratios)")
        args.variant_list.remove("official")
    end = _T0 + args.time_budget

    env = environment(device, args)
    log(f"torch {env['torch']} on {env['device_name']}; official: {env['official_commit']}")
    env["peak_flops_measured"] = measure_peak(device, args.peak_size)
    env["peak_flops_spec_name"], env["peak_flops_spec"] = spec_peak(device)
    log(f"measured bf16 matmul peak: {env['peak_flops_measured'] / 1e12:.1f} TFLOP/s ({args.peak_size}^3)")
    try:
        env["flop_check_cpu"] = check_flops_cpu(mods, args.seed)
        log("FLOP cross-check on CPU (counted / analytic): " + ", ".join(
            f"{k} {v['ratio']:.6f}" for k, v in env["flop_check_cpu"].items() if isinstance(v, dict)))
    except Exception as e:  # the check is evidence, not a precondition for timing
        env["flop_check_cpu"] = {"error": f"{type(e).__name__}: {e}"}
        log(f"FLOP cross-check failed: {type(e).__name__}: {e}")

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    payload: dict[str, Any] = {"environment": env, "settings": settings, "mask": MASK, "momentum": MOMENTUM, "results": []}
    results: list[dict[str, Any]] = payload["results"]
    for encoder in args.model_list:
        for variant in args.variant_list:
            results.append(run_guarded(variant, encoder, args, mods, device, env, end))
            add_ratios(results)
            if args.json:
                write_json(args.json, payload)
    try:  # drift check (clocks, heat); a broken CUDA context must not cost the table
        env["peak_flops_measured_end"] = measure_peak(device, args.peak_size)
        log(f"bf16 matmul peak at the end: {env['peak_flops_measured_end'] / 1e12:.1f} TFLOP/s")
    except Exception as e:
        log(f"peak at the end: {type(e).__name__}: {e}")
    table = markdown(results, env, args)
    print("\n" + table, flush=True)
    payload["markdown"] = table
    if args.json:
        write_json(args.json, payload)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
