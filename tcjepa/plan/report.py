"""The plan as the text ``tcjepa plan`` prints (:func:`format_plan`): the memory table by ZeRO
stage, compute and time, and a verdict saying whether the recipe fits and what to change if not.
"""

from __future__ import annotations

from collections.abc import Callable

from tcjepa.plan.search import GIB, MICRO_LIMIT, Plan, StagePlan


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def format_plan(plan: Plan) -> str:
    """The plan as the text ``tcjepa plan`` prints."""
    inv, tok, f = plan.inventory, plan.tokens, plan.flops
    lines = [
        f"plan: {plan.recipe or 'config'} on {plan.nodes} node(s) x {plan.gpus} GPU(s) = {plan.world}, "
        f"{plan.gpu_memory / GIB:g} GiB each ({plan.usable / GIB:.1f} GiB usable: {1 - plan.usable / plan.gpu_memory:.0%} "
        "kept for the CUDA context, fragmentation and NCCL)",
        f"parameters: encoder {_count(inv.encoder_params)}, predictor {_count(inv.predictor_params)}"
        + (f", text {_count(inv.text_params)} ({'trained' if inv.text.trained else 'frozen'})" if inv.text else "")
        + f"; {_count(inv.trainable)} trained; teacher {_count(inv.teacher_params)} (fp32, outside the engine)",
        f"batch: global {plan.global_batch}, micro {plan.micro_batch} per GPU"
        + (f" x {plan.grad_accum_steps} accumulation steps" if plan.grad_accum_steps > 1 else "")
        + f"; precision {plan.precision} "
        f"(fp32 weights and AdamW states, {'bf16 autocast' if plan.precision == 'bf16' else 'fp32'} activations)",
        f"tokens per image: {tok.full} patches, context {tok.context_real / tok.batch:.1f} (padded to "
        f"{tok.context_pad}), {tok.targets} target blocks of {tok.target_real / tok.batch / tok.targets:.1f} "
        f"(padded to {tok.target_pad})",
        "",
        "memory per GPU (GiB)      ZeRO-0   ZeRO-1   ZeRO-2   ZeRO-3",
    ]

    def row(name: str, get: Callable[[StagePlan], float]) -> None:
        lines.append(f"  {name:<22}" + " ".join(f"{_gib(get(s)):>8}" for s in plan.stages))

    row("parameters", lambda s: s.states.params)
    row("gradients", lambda s: s.states.grads)
    row("optimiser states", lambda s: s.states.optimizer)
    row("teacher (fp32)", lambda s: s.states.teacher)
    row("reduce buckets", lambda s: s.states.buffers)
    row("activations", lambda s: s.activations.peak)
    row("  with checkpointing", lambda s: s.activations_ckpt.peak)
    row("total", lambda s: s.total)
    row("  with checkpointing", lambda s: s.total_ckpt)
    lines.append("  fits micro-batch " + f"{plan.micro_batch:<5}" + "".join(
        f"{('yes' if s.total <= plan.usable else 'no'):>9}" for s in plan.stages))
    def most(m: int) -> str:
        return f"{('>=' if m >= MICRO_LIMIT else '') + str(m):>8}"

    lines.append("  largest micro-batch   " + " ".join(most(s.max_micro) for s in plan.stages))
    lines.append("    with checkpointing  " + " ".join(most(s.max_micro_ckpt) for s in plan.stages))
    a = plan.stages[0].activations
    lines += [
        f"  activations at micro-batch {plan.micro_batch}: encoder {a.encoder / GIB:.2f}, predictor "
        f"{a.predictor / GIB:.2f}, text {a.text / GIB:.2f}, conditioner {a.conditioner / GIB:.2f}, targets "
        f"{a.targets / GIB:.2f}, bf16 weight copies {a.weight_copies / GIB:.2f} GiB",
        "",
        f"compute per image: {f.train / 1e9:.1f} GFLOP per training step (encoder {f.encoder / 1e9:.1f}, predictor "
        f"{f.predictor / 1e9:.1f}, text {f.text / 1e9:.1f}, conditioner {f.conditioner / 1e9:.1f} forward x3; "
        f"teacher {f.teacher / 1e9:.1f} forward x1)",
        f"time at {plan.mfu:.0%} MFU of {plan.gpu_tflops:g} TFLOP/s per GPU: {_duration(plan.step_seconds)} per step, "
        + (f"{_duration(plan.epoch_seconds)} per epoch of {plan.samples:,} images, "
           if plan.epoch_seconds is not None else "pass --samples N for the time per epoch, ")
        + f"{_duration(plan.run_seconds)} for the recipe's {plan.steps:,} steps "
          f"({plan.steps * plan.global_batch * f.train / 1e21:.2f} ZFLOP)",
        "",
        _verdict(plan),
    ]
    if plan.precision == "fp32":
        lines.append("note: an fp32 recipe; pass --gpu-tflops with your card's fp32/TF32 peak (the default is bf16)")
    return "\n".join(lines)


def _verdict(plan: Plan) -> str:
    """Whether the recipe fits as configured (its activation checkpointing included), and what to
    change if not."""
    ckpt = plan.checkpointing
    fits, fits_ckpt = plan.fitting(ckpt), plan.fitting(True)
    c, m = plan.configured_stage, plan.micro_batch
    if c in fits:
        total = (plan.stages[c].total_ckpt if ckpt else plan.stages[c].total) / GIB
        return (f"fits: the recipe's ZeRO-{c} with micro-batch {m} ({total:.1f} of {plan.usable / GIB:.1f} GiB); "
                f"stages that fit: {', '.join(map(str, fits))}")
    if fits:
        best = fits[0]  # stages 0-2 move the bytes of plain data parallelism; ZeRO-3 adds parameter all-gathers
        return (f"the recipe's ZeRO-{c} does not fit micro-batch {m}; use --set deepspeed.zero_stage={best} "
                f"(stages that fit: {', '.join(map(str, fits))})")
    text = f"does not fit: micro-batch {m} needs more than {plan.usable / GIB:.1f} GiB at every ZeRO stage"
    if fits_ckpt and not ckpt:
        text += (f"; with activation checkpointing ZeRO-{fits_ckpt[0]} would fit "
                 "(--set model.activation_checkpointing=true)")
    if plan.accumulation is not None and plan.accumulation[0] > plan.grad_accum_steps:
        steps, stage = plan.accumulation
        text += (f"; on these GPUs, at the same global batch: --set train.grad_accum_steps={steps} (micro-batch "
                 f"{plan.global_batch // (plan.world * steps)}) fits ZeRO-{stage}"
                 + ("" if stage == c else f" (--set deepspeed.zero_stage={stage})"))
    if plan.min_gpus is not None:
        text += (f"; {'with' if ckpt else 'without'} checkpointing it fits from {plan.min_gpus} GPUs (micro-batch "
                 f"{plan.global_batch // (plan.min_gpus * plan.grad_accum_steps)})")
    else:
        text += "; no GPU count fits even one image per GPU: use a larger card"
    return text
