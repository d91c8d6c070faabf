"""Model states per GPU by ZeRO stage: parameters, gradients and optimiser states as DeepSpeed's
estimators decompose them, plus the fp32 teacher and DeepSpeed's gradient reduction buckets
(:func:`model_states`, :func:`zero_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tcjepa.config import Config, ConfigError
from tcjepa.plan.model import ModelInventory

ADAM_STATE_BYTES = 8  # AdamW's two fp32 moments


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each model state, as DeepSpeed's estimators decompose them:
    the working weights and gradients (16-bit in their formula, fp32 in our runs), an fp32
    gradient partition, the fp32 master partition (cloned even from fp32 weights) and Adam's moments."""

    weight: int
    grad: int
    grad32: int = 4
    master: int = 4
    optim: int = ADAM_STATE_BYTES


DEEPSPEED_ASSUMED = StateBytes(weight=2, grad=2)  # the mixed-precision setup their estimators assume
FP32_MASTER = StateBytes(weight=4, grad=4)  # ours: fp32 weights in the engine, autocast for bf16


@dataclass(frozen=True)
class ModelStates:
    """Per-GPU bytes. ``params``: working weights (incl. a frozen text encoder; at ZeRO-3 the
    gathered largest layer); ``grads``: gradients and their fp32 partition; ``optimizer``: fp32
    master partition and Adam moments; ``teacher``: the fp32 EMA/frozen target encoder (outside
    the engine, on every rank); ``buffers``: DeepSpeed's gradient reduction buckets."""

    params: float
    grads: float
    optimizer: float
    teacher: float
    buffers: float

    @property
    def engine(self) -> float:
        """What DeepSpeed's estimators count."""
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.engine + self.teacher + self.buffers


# DeepSpeed's defaults for the ZeRO keys the planner reads (``DeepSpeedZeroConfig``; a test keeps
# them in step). Kept here so that planning does not import DeepSpeed, which prints an accelerator
# warning on stdout on machines without a GPU.
ZERO_DEFAULTS: dict[str, Any] = {"reduce_bucket_size": 500_000_000, "contiguous_gradients": True, "overlap_comm": None}


def zero_settings(cfg: Config) -> dict[str, Any]:
    """The run's ``zero_optimization`` keys the planner needs, DeepSpeed's defaults filled in
    (``overlap_comm`` defaults to on at stage 3 only, as in DeepSpeed)."""
    section = {**ZERO_DEFAULTS, **cfg.deepspeed.config.get("zero_optimization", {})}
    out: dict[str, Any] = {}
    for key, kind in (("reduce_bucket_size", int), ("contiguous_gradients", bool), ("overlap_comm", bool)):
        value = section[key]
        if key == "overlap_comm" and value is None:
            value = cfg.deepspeed.zero_stage == 3
        if key == "reduce_bucket_size" and isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON's 5e7
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
            raise ConfigError(f"deepspeed.config.zero_optimization.{key}: expected "
                              f"{'a positive integer' if kind is int else 'true or false'}, got {value!r}")
        out[key] = value
    return out


def model_states(inv: ModelInventory, stage: int, world: int, sb: StateBytes = FP32_MASTER,
                 zero: dict[str, Any] | None = None) -> ModelStates:
    """Model-state bytes per GPU at ZeRO ``stage`` over ``world`` ranks.

    Stage 0 is plain data parallelism: the optimiser steps the working weights (no master copy,
    no gradient copy). Stage 1 partitions the optimiser states (master + moments) and the fp32
    gradient copy, stage 2 also the working gradients, stage 3 also the weights, plus the largest
    layer gathered (weights and gradient) at a time.

    With ``DEEPSPEED_ASSUMED`` bytes, stage 2 equals DeepSpeed's
    ``estimate_zero2_model_states_mem_needs`` without offload (2 P + 18 P / N) exactly. Stage 3
    equals ``estimate_zero3_model_states_mem_needs`` (4 L + 18 P / N) plus the partition of the
    16-bit weights, 2 P / N: their formula reuses the ZeRO-2 18 bytes, which leave the weights out
    (ZeRO-2 counts them replicated), yet stage 3 keeps each rank's weight partition
    (``param.ds_tensor``) next to the gradient partitions and fp32 copies they do count."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    P, F, N = inv.trainable, inv.frozen, world
    teacher = 4.0 * inv.teacher_params
    if stage == 0:
        params, grads, optim = (P + F) * sb.weight, P * sb.grad, P * sb.optim
    else:
        shard = P / N
        optim = shard * (sb.master + sb.optim)
        params = (P + F) * sb.weight if stage < 3 else (P + F) / N * sb.weight + inv.largest_layer * sb.weight
        grads = (P * sb.grad if stage == 1 else shard * sb.grad) + shard * sb.grad32
        if stage == 3:
            grads += inv.largest_layer * sb.grad
    buffers = 0.0  # stage 0 flattens its all-reduce buckets after backward, when the activations are gone
    if zero is not None:  # allocated at full size whatever the model and world size
        if stage in (1, 2) and zero["contiguous_gradients"]:
            buffers = zero["reduce_bucket_size"] * sb.grad * (2 if zero["overlap_comm"] else 1)
        elif stage == 3:
            buffers = zero["reduce_bucket_size"] * sb.grad
    return ModelStates(params, grads, optim, teacher, buffers)
