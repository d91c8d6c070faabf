"""Check the run planner's activation estimate (``tcjepa plan``) against measured memory on CPU.

For small I-JEPA / TC-JEPA students (vit_micro / vit_tiny, I-JEPA multi-block masks, batch 8-32)
one training step runs for real (``tcjepa.plan.probe_step``: teacher targets, student forward
and loss as ``JEPA.loss`` runs them), with and without per-block activation checkpointing, and
two measurements are set beside the planner's analytic figures for the *same* masks:

* **saved**: the bytes autograd keeps for backward at the end of the forward, counted through
  ``torch.autograd.graph.saved_tensors_hooks`` (unique storages; parameters and buffers left
  out): ``tcjepa.plan.measure_activations``. Compared with ``Activations.saved``.
* **peak**: the highest memory, over the whole step (teacher forward, student forward, backward),
  held by tensors that are not model states: torch.profiler's memory timeline
  (``profile_memory=True``; its categories tell parameters and parameter gradients apart from
  activations, temporaries and autograd buffers). Compared with ``Activations.peak``, which adds
  the one block re-run at a time under checkpointing. The timeline is a private torch API
  (``torch.profiler._memory_profiler``), hence a benchmark and not a test.

fp32 is what the planner's figures are for on any device; ``bf16 (CPU)`` runs CPU autocast,
which keeps LayerNorm and softmax in bf16, where CUDA autocast keeps them in fp32 (the planner's
``act_bytes(precision, device)``): it checks the bf16 structure of the estimate, not CUDA's dtypes.

``--gpu-json`` checks CUDA instead, without a GPU: it reads the JSON of a ``bench_gpu.py`` run
(plain PyTorch, bf16 autocast, AdamW, one GPU; peak = ``torch.cuda.max_memory_allocated`` over
steady steps) and sets the planner's ZeRO-0, one-GPU total (weights, gradients, AdamW, teacher,
activations) for the same encoder, predictor, batch and mask policy beside each measured peak,
over several mask draws (the measured peak is the largest of its timed steps). For
``mask.policy=official`` rows it also traces one step on fake CUDA tensors under CUDA autocast
(``tcjepa.plan.measure_activations_cuda_bf16``: CUDA's dtype rules, flash attention's saves, no
GPU) and sets the bytes it saves beside the planner's saved estimate for the same masks.

    python benchmarks/bench_plan_memory.py                 # all cases (~1 min on 2 CPU cores)
    python benchmarks/bench_plan_memory.py --quick         # one case
    python benchmarks/bench_plan_memory.py --json out.json --no-peak
    python benchmarks/bench_plan_memory.py --gpu-json benchmarks/results/gpu_h200_2026-11-26_flash.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_train_step: the configs bench_gpu.py ran

from tcjepa.config import load_config  # noqa: E402
from tcjepa.plan import StepProbe, estimate_for_masks, probe_step, saved_tensor_bytes  # noqa: E402

MIB = 2**20
QUICK = str(ROOT / "recipes" / "ijepa_quickstart.yaml")
TCJEPA = str(ROOT / "recipes" / "tcjepa_quickstart.yaml")
AT_224 = ["model.image_size=224", "model.depth=null"]


@dataclass(frozen=True)
class Case:
    name: str
    recipe: str
    overrides: tuple[str, ...]
    batch: int


CASES = [
    Case("I-JEPA vit_micro_16 @224, pred 6x192", QUICK,
         ("model.encoder=vit_micro_16", *AT_224, "model.predictor_depth=6", "model.predictor_width=192"), 16),
    Case("I-JEPA vit_tiny_16 @224, pred 6x192", QUICK,
         ("model.encoder=vit_tiny_16", *AT_224, "model.predictor_depth=6", "model.predictor_width=192"), 8),
    Case("I-JEPA quickstart (vit_tiny_8 @64, depth 6)", QUICK, (), 32),
    Case("I-JEPA quickstart, mask.policy=official", QUICK, ("mask.policy=official",), 32),
    Case("I-JEPA quickstart, bf16 (CPU autocast)", QUICK, ("train.precision=bf16",), 32),
    Case("TC-JEPA quickstart (paper conditioner, 4 captions, scratch text)", TCJEPA, (), 16),
]


def profiler_peak(probe: StepProbe) -> int:
    """Peak bytes of non-model-state tensors over one step of ``probe`` (targets, forward,
    backward)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, Category

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        images = probe.images.clone()  # allocated inside the profile, like every activation
        probe.run(images).backward()
    mp = prof._memory_profile()
    states = {Category.PARAMETER, Category.GRADIENT, Category.OPTIMIZER_STATE}
    live: dict[object, tuple[int, object]] = {}
    current = peak = 0
    for _, action, (key, version), size in mp.timeline:
        if key.device.type != "cpu" or action == Action.PREEXISTING:
            continue
        if action == Action.CREATE:
            live[key] = (size, mp._categories.get(key, version))
        elif action == Action.INCREMENT_VERSION and key in live:
            live[key] = (live[key][0], mp._categories.get(key, version))
        elif action == Action.DESTROY:
            live.pop(key, None)
        current = sum(s for s, cat in live.values() if cat not in states)
        peak = max(peak, current)
    return peak


def run_case(case: Case, checkpointing: bool, seed: int, peak: bool) -> dict:
    cfg = load_config(case.recipe, list(case.overrides))
    t0 = time.perf_counter()
    probe = probe_step(cfg, case.batch, seed, checkpointing)
    _, saved = saved_tensor_bytes(probe.run, probe.model_tensors())
    est = estimate_for_masks(cfg, probe.token_stats, checkpointing=checkpointing)
    row = {
        "case": case.name, "recipe": Path(case.recipe).name, "overrides": list(case.overrides), "batch": case.batch,
        "precision": cfg.train.precision, "checkpointing": checkpointing, "seed": seed,
        "padded": probe.token_stats.padded, "measured_saved_bytes": saved, "estimated_saved_bytes": est.saved,
        "saved_ratio": est.saved / saved,
    }
    if peak:
        measured_peak = profiler_peak(probe)  # the same model and micro-batch: the forward above changed nothing
        row.update(measured_peak_bytes=measured_peak, estimated_peak_bytes=est.peak,
                   peak_ratio=est.peak / measured_peak)
    row["seconds"] = time.perf_counter() - t0
    return row


def table(rows: list[dict]) -> str:
    peak = "measured_peak_bytes" in rows[0]
    head = "| case | batch | ckpt | saved, measured MiB | saved, estimated MiB | est/meas |"
    rule = "|---|---:|:---:|---:|---:|---:|"
    if peak:
        head += " peak, measured MiB | peak, estimated MiB | est/meas |"
        rule += "---:|---:|---:|"
    lines = [head, rule]
    for r in rows:
        line = (f"| {r['case']} | {r['batch']} | {'yes' if r['checkpointing'] else 'no'} | "
                f"{r['measured_saved_bytes'] / MIB:.2f} | {r['estimated_saved_bytes'] / MIB:.2f} | {r['saved_ratio']:.3f} |")
        if peak:
            line += (f" {r['measured_peak_bytes'] / MIB:.2f} | {r['estimated_peak_bytes'] / MIB:.2f} |"
                     f" {r['peak_ratio']:.3f} |")
        lines.append(line)
    return "\n".join(lines)


def gpu_rows(path: str) -> list[dict]:
    """Planned vs measured peak memory for each eager tcjepa variant of a bench_gpu.py JSON, on
    the very mask batches its timed steps ran (bench_gpu draws them from ``--seed`` after the
    warm-up's): the measured peak is the largest over those steps, so the plan's is too."""
    import dataclasses

    from bench_train_step import make_config, stock_layer_norms
    from tcjepa.masks import sample_masks
    from tcjepa.models.vit import parse_encoder_name
    from tcjepa.plan import (GIB, activation_memory, inventory, measure_activations_cuda_bf16, model_states,
                             stats_of_masks)

    run = json.loads(Path(path).read_text())
    st, env = run["settings"], run["environment"]
    rows = []
    for r in run["results"]:
        if r["variant"] not in ("ours/official", "ours/pad", "ours/pad+varlen", "ours/pad+groups") \
                or r.get("peak_mem_gib") is None:
            continue
        policy = r["variant"].split("/")[1].split("+")[0]
        # what ran: varlen where the step's attention kernels include it (the default since 2026-11-26)
        attention = "varlen" if any("varlen" in op for op in r.get("attention_ops", [])) else "groups"
        cfg = make_config(r["encoder"], st["image_size"], st["pred_depth"], st["pred_width"], st["batch_size"], policy)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=st["precision"]))
        inv = inventory(cfg)
        states = model_states(inv, 0, 1).total
        patch = parse_encoder_name(r["encoder"]).patch_size
        gen, grid = torch.Generator().manual_seed(st["seed"]), (cfg.model.image_size // patch,) * 2
        draws = [sample_masks(st["batch_size"], grid, gen, **dataclasses.asdict(cfg.mask))
                 for _ in range(st["warmup"] + st["steps"])][st["warmup"]:]
        acts = [activation_memory(inv, stats_of_masks(m, grid[0] * grid[1]), st["precision"], attention=attention)
                for m in draws]
        planned = [(states + a.peak) / GIB for a in acts]
        row = {"device": env.get("device_name"), "torch": env.get("torch"), "encoder": r["encoder"],
               "variant": r["variant"], "batch": st["batch_size"], "measured_gib": r["peak_mem_gib"],
               "planned_gib_max": max(planned), "planned_gib_mean": sum(planned) / len(planned),
               "ratio": max(planned) / r["peak_mem_gib"], "states_gib": states / GIB}
        if policy == "official" and st["precision"] == "bf16":
            worst = max(range(len(acts)), key=lambda i: acts[i].saved)
            traced = {}
            for code in ("now", "as run"):  # as run: the blocks' norms were nn.LayerNorm before 2026-11-26
                probe = probe_step(cfg, st["batch_size"], seed=0)
                probe.masks = draws[worst]
                if code == "as run":
                    stock_layer_norms(probe.method.model, probe.method.teacher)
                traced[code] = measure_activations_cuda_bf16(probe) / GIB
            row.update(saved_planned_gib=acts[worst].saved / GIB, saved_traced_gib=traced["now"],
                       saved_traced_as_run_gib=traced["as run"])
        rows.append(row)
    return rows


def gpu_table(rows: list[dict]) -> str:
    lines = ["| device | encoder | variant | batch | measured peak GiB | planned GiB: max (mean) over the timed steps' masks "
             "| planned max/measured | model states GiB | worst step's saved GiB: planned / traced now / traced as run |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        saved = "n/a"
        if "saved_traced_gib" in r:
            saved = f"{r['saved_planned_gib']:.2f} / {r['saved_traced_gib']:.2f} / {r['saved_traced_as_run_gib']:.2f}"
        lines.append(f"| {r['device']} | {r['encoder']} | {r['variant']} | {r['batch']} | {r['measured_gib']:.1f} | "
                     f"{r['planned_gib_max']:.1f} ({r['planned_gib_mean']:.1f}) | {r['ratio']:.3f} "
                     f"| {r['states_gib']:.2f} | {saved} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only the first case")
    ap.add_argument("--no-peak", action="store_true", help="skip the profiler peak (the slow half)")
    ap.add_argument("--seed", type=int, default=1, help="masks, images and captions")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (memory does not depend on it)")
    ap.add_argument("--tolerance", type=float, default=0.25, help="exit 1 if any ratio is further from 1")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--gpu-json", nargs="+", metavar="FILE", help="instead: planner vs bench_gpu.py's measured peaks")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gpu_json:
        rows = [r for path in args.gpu_json for r in gpu_rows(path)]
        print(gpu_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
        return 0 if all(abs(r["ratio"] - 1) <= args.tolerance for r in rows) else 1
    rows = []
    for case in CASES[:1] if args.quick else CASES:
        for ckpt in (False, True):
            rows.append(run_case(case, ckpt, args.seed, not args.no_peak))
            r = rows[-1]
            print(f"{r['case']}, checkpointing {ckpt}: saved {r['saved_ratio']:.3f}"
                  + (f", peak {r['peak_ratio']:.3f}" if "peak_ratio" in r else "") + f" ({r['seconds']:.1f} s)",
                  file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s), "
          f"{datetime.date.today().isoformat()}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    ratios = [r[k] for r in rows for k in ("saved_ratio", "peak_ratio") if k in r]
    return 0 if all(abs(x - 1) <= args.tolerance for x in ratios) else 1


if __name__ == "__main__":
    sys.exit(main())
