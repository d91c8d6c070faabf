"""Gradient accumulation's cost: a step of K accumulated micro-batches of m images against a step
of one batch of m, per image, through the real training path (DeepSpeed engine, ZeRO 0, fp32,
``tcjepa.train.guarded_step`` with its non-finite guard), and the activation memory of each.

The two engines train the same model from the same seed. Steps alternate (one of each per round,
the order swapping every round) so that machine load hits both alike; reported are the median seconds
per image of each and their ratio (> 1: accumulation is slower per image). Activation memory is
the bytes autograd saves for backward in one forward pass (``saved_tensors_hooks``), averaged over
the forward passes (the masks differ from pass to pass): with accumulation each micro-batch's
graph is freed by its backward before the next forward, so it should equal the plain step's at
the same micro-batch.

    python benchmarks/bench_accumulation.py                       # ViT-S/16, 224 px, m=8, K=4
    python benchmarks/bench_accumulation.py --encoder vit_tiny_16 --micro 4 --rounds 3   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class SavedBytes:
    """Bytes saved for backward by each forward pass (:meth:`mark` closes one)."""

    def __init__(self) -> None:
        self.current, self.passes = 0, []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.current += t.numel() * t.element_size()
        return t

    def mark(self) -> None:
        if self.current:
            self.passes.append(self.current)
        self.current = 0


def build(args: argparse.Namespace, accum: int):
    import deepspeed

    from tcjepa.config import load_config
    from tcjepa.methods import build_method
    from tcjepa.train import deepspeed_config, param_groups

    cfg = load_config(ROOT / "recipes/ijepa_quickstart.yaml", [
        f"model.encoder={args.encoder}", f"model.image_size={args.image_size}", "model.depth=null",
        f"model.predictor_depth={args.pred_depth}", f"model.predictor_width={args.pred_width}",
        f"train.batch_size={args.micro * accum}", f"train.grad_accum_steps={accum}", "deepspeed.zero_stage=0"])
    torch.manual_seed(0)
    method = build_method(cfg, 0, 1)
    optimizer = torch.optim.AdamW(param_groups(method.model), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=method.model, optimizer=optimizer, config=deepspeed_config(cfg, 1))
    return cfg, method, engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--encoder", default="vit_small_16")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--pred-depth", type=int, default=6)
    p.add_argument("--pred-width", type=int, default=384)
    p.add_argument("--micro", type=int, default=8, help="images per micro-batch")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per accumulated step")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import dataclasses

    from tcjepa.distributed import init_distributed
    from tcjepa.masks import sample_masks
    from tcjepa.train import StopRequest, guarded_step

    info = init_distributed()
    runs = {"plain": build(args, 1), "accumulated": build(args, args.accum)}
    saved = SavedBytes()
    per_image: dict[str, list[float]] = {k: [] for k in runs}
    memory: dict[str, list[int]] = {k: [] for k in runs}
    gen = torch.Generator().manual_seed(0)
    with StopRequest() as stop, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        for r in range(args.rounds + 1):
            for name in (list(runs) if r % 2 else list(runs)[::-1]):  # the order alternates
                cfg, method, engine = runs[name]
                n = cfg.train.batch_size
                images = torch.randn(n, 3, args.image_size, args.image_size, generator=gen)
                masks = sample_masks(n, method.model.encoder.grid, gen, **dataclasses.asdict(cfg.mask))
                real = method.micro_losses

                def marked(*a, **kw):  # a fresh count before every micro-batch's forward
                    for item in real(*a, **kw):
                        yield item
                        saved.mark()

                method.micro_losses = marked
                saved.mark()
                saved.passes = []
                t0 = time.perf_counter()
                _, _, ok, _ = guarded_step(engine, method, (images, masks, None), cfg, info, stop)
                elapsed = time.perf_counter() - t0
                method.micro_losses = real
                assert ok
                saved.mark()
                memory[name] += saved.passes
                if r:  # the first round warms up
                    per_image[name].append(elapsed / n)
    med = {k: statistics.median(v) for k, v in per_image.items()}
    out = {
        "config": f"{args.encoder}, {args.image_size} px, predictor {args.pred_depth} x {args.pred_width}, fp32, ZeRO 0, "
                  f"micro-batch {args.micro}, {args.accum} accumulated, {args.threads} threads",
        "seconds_per_image": med,
        "accumulated_over_plain": med["accumulated"] / med["plain"],
        "activation_bytes_per_forward": {k: statistics.mean(v) for k, v in memory.items()},
        "activation_accumulated_over_plain": statistics.mean(memory["accumulated"]) / statistics.mean(memory["plain"]),
        "rounds": args.rounds,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
