"""The plan (:func:`plan_run`): every ZeRO stage's memory per GPU at the recipe's micro-batch (the
worst of several mask draws), the largest micro-batch each stage fits, the fewest GPUs at which
the recipe fits, and the time per step / epoch / run at an assumed model-FLOP utilisation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tcjepa.config import Config, ConfigError
from tcjepa.plan.activations import Activations, activation_memory
from tcjepa.plan.flops import Flops, mean_flops
from tcjepa.plan.model import ModelInventory, inventory
from tcjepa.plan.states import FP32_MASTER, ModelStates, model_states, zero_settings
from tcjepa.plan.tokens import MaskCounts, TokenStats, attention_mode, draw_mask_counts

GIB = 2**30
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM
RESERVE = 0.10  # share of GPU memory kept for the CUDA context, allocator fragmentation and NCCL


@dataclass(frozen=True)
class StagePlan:
    stage: int
    states: ModelStates
    activations: Activations  # at the recipe's micro-batch, no checkpointing
    activations_ckpt: Activations  # ... with per-block activation checkpointing
    max_micro: int  # largest micro-batch that fits (0: none)
    max_micro_ckpt: int

    @property
    def total(self) -> float:
        return self.states.total + self.activations.peak

    @property
    def total_ckpt(self) -> float:
        return self.states.total + self.activations_ckpt.peak


@dataclass(frozen=True)
class Plan:
    recipe: str
    gpus: int  # per node
    nodes: int
    gpu_memory: float  # bytes
    usable: float  # bytes available for the run after RESERVE
    global_batch: int
    micro_batch: int
    grad_accum_steps: int  # micro-batches per optimiser step (train.grad_accum_steps)
    precision: str
    inventory: ModelInventory
    tokens: TokenStats
    flops: Flops
    stages: tuple[StagePlan, ...]
    samples: int | None
    steps: int
    mfu: float
    gpu_tflops: float
    configured_stage: int
    checkpointing: bool  # the recipe's model.activation_checkpointing
    min_gpus: int | None  # fewest GPUs (dividing the global batch) at which some stage fits; None: none does
    accumulation: tuple[int, int] | None = None  # (steps, stage): fewest grad_accum_steps at which a stage fits


    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def step_seconds(self) -> float:
        return self.global_batch * self.flops.train / (self.world * self.gpu_tflops * 1e12 * self.mfu)

    @property
    def epoch_seconds(self) -> float | None:
        return None if self.samples is None else self.samples / self.global_batch * self.step_seconds

    @property
    def run_seconds(self) -> float:
        return self.steps * self.step_seconds

    def fitting(self, checkpointing: bool = False) -> list[int]:
        """Stages whose recipe micro-batch fits."""
        return [s.stage for s in self.stages if (s.total_ckpt if checkpointing else s.total) <= self.usable]


def _largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """Largest m in [1, limit] with ``fits(m)`` (assumed monotone), 0 if none."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


MICRO_LIMIT = 4096  # the micro-batch search stops here
# Independent mask draws the plan takes the worst micro-batch of: a run's peak memory is its
# largest step's, and under mask.policy=official the sizes are drawn once per batch, so one
# draw's activations can be 13 % under the largest of 20 steps' (ViT-B/16, batch 256). The worst
# of 8 is a high percentile of the steps, not a bound (at ViT-H/14, batch 256, 2-9 % of draws
# exceed it, by up to 6 %); the 10 % of the GPU the plan keeps back covers that.
MASK_DRAWS = 8


def plan_run(cfg: Config, gpus: int = 1, nodes: int = 1, gpu_memory_gb: float = 80.0, samples: int | None = None,
             mfu: float = 0.4, gpu_tflops: float = H100_BF16_TFLOPS, recipe: str = "", reserve: float = RESERVE) -> Plan:
    """Plan ``cfg`` on ``nodes`` x ``gpus`` GPUs of ``gpu_memory_gb`` GiB each. Raises
    ConfigError for impossible inputs (the CLI turns it into ``error: ...``)."""
    for name, value, ok, want in (("--gpus", gpus, gpus >= 1, ">= 1"), ("--nodes", nodes, nodes >= 1, ">= 1"),
                                  ("--gpu-memory", gpu_memory_gb, gpu_memory_gb > 0, "> 0 (GiB)"),
                                  ("--mfu", mfu, 0 < mfu <= 1, "in (0, 1], e.g. 0.4"),
                                  ("--gpu-tflops", gpu_tflops, gpu_tflops > 0, "> 0"),
                                  ("--samples", samples, samples is None or samples >= 1, ">= 1")):
        if not ok:
            raise ConfigError(f"{name} must be {want}, got {value}")
    world, accum = gpus * nodes, cfg.train.grad_accum_steps
    if cfg.train.batch_size % (world * accum):
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world} GPUs "
                          f"({nodes} nodes x {gpus}) x train.grad_accum_steps {accum}; tcjepa train splits the "
                          "global batch evenly over ranks and micro-batches")
    inv = inventory(cfg)
    zero = zero_settings(cfg)
    usable = gpu_memory_gb * GIB * (1 - reserve)
    micro = cfg.train.batch_size // (world * accum)
    draws = [draw_mask_counts(cfg, max(MICRO_LIMIT, cfg.train.batch_size), seed) for seed in range(MASK_DRAWS)]

    @functools.lru_cache(maxsize=None)  # every stage's search asks for the same micro-batches
    def worst(m: int, ckpt: bool) -> tuple[Activations, TokenStats]:
        return worst_activations(cfg, inv, draws, m, ckpt)

    def acts(m: int, ckpt: bool) -> Activations:
        return worst(m, ckpt)[0]

    stages = []
    for stage in (0, 1, 2, 3):
        st = model_states(inv, stage, world, FP32_MASTER, zero)
        best = [_largest_fitting(lambda m, c=c: st.total + acts(m, c).peak <= usable, MICRO_LIMIT) for c in (False, True)]
        stages.append(StagePlan(stage, st, acts(micro, False), acts(micro, True), best[0], best[1]))
    tok = worst(micro, False)[1]
    flops = mean_flops(inv, draws, micro)
    return Plan(
        recipe=recipe, gpus=gpus, nodes=nodes, gpu_memory=gpu_memory_gb * GIB, usable=usable,
        global_batch=cfg.train.batch_size, micro_batch=micro, grad_accum_steps=accum, precision=cfg.train.precision,
        inventory=inv,
        tokens=tok, flops=flops, stages=tuple(stages), samples=samples,
        steps=cfg.train.steps, mfu=mfu, gpu_tflops=gpu_tflops, configured_stage=cfg.deepspeed.zero_stage,
        checkpointing=cfg.model.activation_checkpointing, min_gpus=_min_gpus(cfg, inv, zero, usable, acts),
        accumulation=fewest_accumulation_steps(cfg.train.batch_size // world, stages, cfg.model.activation_checkpointing),
    )


def fewest_accumulation_steps(per_gpu: int, stages: list[StagePlan], checkpointing: bool) -> tuple[int, int] | None:
    """``(steps, stage)``: the fewest ``train.grad_accum_steps`` (dividing the ``per_gpu`` share of
    the global batch) whose micro-batch some stage fits, and the lowest such stage; None if not
    even one image fits. Accumulation keeps the global batch, so the recipe's optimisation stays."""
    for steps in (k for k in range(1, per_gpu + 1) if per_gpu % k == 0):
        for s in stages:
            if per_gpu // steps <= (s.max_micro_ckpt if checkpointing else s.max_micro):
                return steps, s.stage
    return None


def worst_activations(cfg: Config, inv: ModelInventory, draws: list[MaskCounts], micro: int,
                      checkpointing: bool) -> tuple[Activations, TokenStats]:
    """The activations (and token counts) of the micro-batch, among the first ``micro`` images of
    each draw, with the highest peak."""
    plans = [(activation_memory(inv, tok, cfg.train.precision, checkpointing, attention=attention_mode(cfg)), tok)
             for tok in (d.batch(micro) for d in draws)]
    return max(plans, key=lambda p: p[0].peak)


def _min_gpus(cfg: Config, inv: ModelInventory, zero: dict[str, Any], usable: float,
              acts: Callable[[int, bool], Activations]) -> int | None:
    """Fewest GPUs, among those the global batch splits over (with the recipe's accumulation steps),
    at which some stage fits the recipe as it is (with or without its activation checkpointing;
    more GPUs: smaller micro-batches and partitions)."""
    batch, ckpt, accum = cfg.train.batch_size, cfg.model.activation_checkpointing, cfg.train.grad_accum_steps
    for world in (w for w in range(1, batch + 1) if batch % (w * accum) == 0):
        act = acts(batch // (world * accum), ckpt).peak
        if any(model_states(inv, s, world, FP32_MASTER, zero).total + act <= usable for s in (0, 1, 2, 3)):
            return world
    return None
