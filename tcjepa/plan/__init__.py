"""Run planner: what a recipe needs per GPU (memory by ZeRO stage), how much compute an image
costs, and how long an epoch takes, before any GPU is rented.

Three parts, each a pure function of the config:

* **Model states** (parameters, gradients, optimiser states) by ZeRO stage, decomposed as
  DeepSpeed's own estimators decompose them (``estimate_zero2_model_states_mem_needs`` and
  ``estimate_zero3_model_states_mem_needs``): with 16-bit weights the planner gives their
  numbers (ZeRO-3: plus the weight partition their formula leaves out; see :func:`model_states`
  and tests/test_plan.py). Our runs keep fp32 weights in the engine and use
  autocast for bf16 (``tcjepa.train.deepspeed_config``), so the planner uses 4-byte weights and
  gradients; the EMA teacher is one more fp32 copy of the encoder on every rank, outside the
  engine, which DeepSpeed's estimators cannot see.
* **Activations**: the bytes autograd saves for backward, counted tensor by tensor for
  ``tcjepa.models`` (encoder over the context tokens, predictor over context + target tokens per
  target block, text tower and conditioner), with token counts from the real mask sampler, with
  and without per-block activation checkpointing. ``measure_activations`` counts the same bytes
  on a real model through saved-tensor hooks; benchmarks/bench_plan_memory.py compares the two.
* **Compute**: matmul FLOPs per image (forward x3 for trained parts, x1 for the teacher and
  frozen towers), and time per step / epoch / run at an assumed model-FLOP utilisation.

The model is built on the ``meta`` device: parameters are counted without allocating them.

The parts live in modules named for what they compute: ``model`` (the model on ``meta``: shapes
and parameter counts), ``tokens`` (token counts per micro-batch from the mask sampler),
``states`` (model states by ZeRO stage), ``activations``, ``flops``, ``search`` (:func:`plan_run`:
the micro-batch and GPU-count search, the time per step), ``report`` (:func:`format_plan`, the
printed text) and ``measure`` (real steps, for checking the estimates). Their public names are
re-exported here.
"""

from __future__ import annotations

from tcjepa.plan.activations import ActBytes, Activations, Seqs, act_bytes, activation_memory, block_bytes, tower_bytes
from tcjepa.plan.flops import Flops, mean_flops, model_flops, tower_flops
from tcjepa.plan.measure import (StepProbe, _FlashSaves, checkpoint_blocks, estimate_for_masks, measure_activations,
                                 measure_activations_cuda_bf16, probe_step, saved_tensor_bytes, simulated_cuda_autocast,
                                 warnings_off)
from tcjepa.plan.model import ModelInventory, TextShape, Tower, count_params, inventory
from tcjepa.plan.report import format_plan
from tcjepa.plan.search import (GIB, H100_BF16_TFLOPS, MASK_DRAWS, MICRO_LIMIT, RESERVE, Plan, StagePlan, plan_run,
                                worst_activations)
from tcjepa.plan.states import (ADAM_STATE_BYTES, DEEPSPEED_ASSUMED, FP32_MASTER, ZERO_DEFAULTS, ModelStates,
                                StateBytes, model_states, zero_settings)
from tcjepa.plan.tokens import (ATTENTION_MODES, MaskCounts, TokenStats, attention_mode, draw_mask_counts,
                                stats_of_masks)

__all__ = [
    "ActBytes", "Activations", "Seqs", "act_bytes", "activation_memory", "block_bytes", "tower_bytes",
    "Flops", "mean_flops", "model_flops", "tower_flops",
    "StepProbe", "_FlashSaves", "checkpoint_blocks", "estimate_for_masks", "measure_activations",
    "measure_activations_cuda_bf16", "probe_step", "saved_tensor_bytes", "simulated_cuda_autocast", "warnings_off",
    "ModelInventory", "TextShape", "Tower", "count_params", "inventory",
    "format_plan",
    "GIB", "H100_BF16_TFLOPS", "MASK_DRAWS", "MICRO_LIMIT", "RESERVE", "Plan", "StagePlan", "plan_run",
    "worst_activations",
    "ADAM_STATE_BYTES", "DEEPSPEED_ASSUMED", "FP32_MASTER", "ZERO_DEFAULTS", "ModelStates", "StateBytes",
    "model_states", "zero_settings",
    "ATTENTION_MODES", "MaskCounts", "TokenStats", "attention_mode", "draw_mask_counts", "stats_of_masks",
]
