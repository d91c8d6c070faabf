"""TC-JEPA's training step time and activation memory over I-JEPA's, same encoder, same masks,
side by side.

One step = EMA-teacher targets + context encoder (+ text tower) + predictor (+ conditioners) +
smooth-L1 (+ the paper's regularisers), backward, AdamW (foreach) on tcjepa's param groups,
foreach EMA update; captions are tokenized inside the timed step (as in training). Every image
has 8 different captions (the synthetic scenes' generator): the paper variant reads up to
``max_captions`` of them, gated_topk the first. Variants are interleaved step by step with a
rotating order, so machine load hits them alike; the ratio is the median of the ratios of
back-to-back steps. ``--memory`` adds each variant's activation bytes (what autograd saves in one
training forward, ``tcjepa.plan.measure_activations``, on the same batch size); at ViT-S/B with
batch 16 and 8 captions that measurement needs more than 24 GiB of RAM (``tcjepa plan``'s count,
within 2.5 % of it, does not).

    python benchmarks/bench_conditioner.py                      # ViT-S/16 224 px, predictor 12 x 384
    python benchmarks/bench_conditioner.py --preset vitb16      # ViT-B/16, predictor 12 x 384
    python benchmarks/bench_conditioner.py --preset quickstart  # the quickstart recipes' sizes
    python benchmarks/bench_conditioner.py --quick              # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from typing import Any

import torch

from data_pipelines.synthetic import synthetic_sample
from tcjepa.config import captions_per_image, load_config, project_root
from tcjepa.masks import sample_masks
from tcjepa.methods.jepa import JEPA, ema_update, param_groups

TEXT = ["conditioner.context_length=32", "conditioner.text_width=256", "conditioner.text_depth=4",
        "conditioner.text_heads=4"]
PRESETS = {
    # ViT-S/16 and ViT-B/16 at 224 px with the official predictor (12 x 384), 32-token captions
    "vits16": ["model.encoder=vit_small_16", "model.image_size=224", "model.predictor_depth=12",
               "model.predictor_width=384", *TEXT],
    "vitb16": ["model.encoder=vit_base_16", "model.image_size=224", "model.predictor_depth=12",
               "model.predictor_width=384", *TEXT],
    "quickstart": [],  # recipes/tcjepa_quickstart.yaml as is
}
GATED = ["conditioner.variant=gated_topk"]
VARIANTS = {
    "I-JEPA": ["conditioner.enabled=false"],
    "paper N=8": ["conditioner.max_captions=8"],
    "paper N=1": ["conditioner.max_captions=1"],
    "paper N=8 frozen text": ["conditioner.max_captions=8", "conditioner.text_frozen=true"],
    # the recipe's overlap logits against the summary's softmax, and the regularisers stopped at the
    # conditioner (the default: their cosines share one product with the attention's) against not
    "paper N=8 dot logits": ["conditioner.max_captions=8", "conditioner.logits=dot"],
    "paper N=8 regularise encoder": ["conditioner.max_captions=8", "conditioner.regularise_encoder=true"],
    "gated_topk every=1": GATED,
    "gated_topk every=2": [*GATED, "conditioner.every=2"],
    "gated_topk sparsemax": [*GATED, "conditioner.sparsity=sparsemax"],
}
DEFAULT_VARIANTS = ("I-JEPA", "paper N=8", "paper N=1", "gated_topk every=1")


class Runner:
    def __init__(self, name: str, overrides: list[str], seed: int = 0):
        self.name = name
        self.cfg = load_config(project_root() / "recipes/tcjepa_quickstart.yaml", overrides)
        torch.manual_seed(seed)
        self.method = JEPA(self.cfg)
        self.student = self.method.model.train()
        groups = param_groups(self.student)
        for g in groups:
            g["weight_decay"] = 0.04 if g["apply_wd"] else 0.0
        self.opt = torch.optim.AdamW(groups, lr=1e-4, foreach=True)
        for c in self.student.predictor.conditioners.values():
            if hasattr(c, "gate"):  # gated_topk: an open gate, so the whole text path gets gradients
                torch.nn.init.constant_(c.gate, 0.1)
        self.params = sum(p.numel() for p in self.student.parameters() if p.requires_grad)
        self.captions = captions_per_image(self.cfg.conditioner)

    def step(self, images: torch.Tensor, masks: Any, captions: list[list[str]], gen: torch.Generator) -> float:
        t0 = time.perf_counter()
        tokens = self.method.text_inputs(captions if self.captions > 1 else [c[0] for c in captions], gen)
        targets = self.method.targets(images, masks)
        loss = self.student(images, masks, targets, tokens)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        ema_update(self.method.teacher, self.student.encoder, 0.996)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="vits16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up steps)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    p.add_argument("--memory", action="store_true", help="also measure each variant's activation bytes")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (micro encoder, 2 steps)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = list(PRESETS[args.preset])
    if args.quick:
        base = ["model.encoder=vit_micro_8", "model.depth=2", "model.predictor_depth=2", "model.predictor_width=48",
                "conditioner.text_width=32", "conditioner.text_depth=1", "conditioner.context_length=16"]
        args.steps, args.batch, args.preset = 2, 4, "quick"
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"error: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    runners = [Runner(n, base + [f"train.batch_size={args.batch}"] + VARIANTS[n]) for n in names]
    cfg = runners[0].cfg
    B, size = args.batch, cfg.model.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(B, 3, size, size)
    captions = [json.loads(synthetic_sample(i, seed=0, captions_per_image=8)["json"])["captions"] for i in range(B)]
    mask_kw = dataclasses.asdict(cfg.mask)
    grid = runners[0].student.encoder.grid
    masks = [sample_masks(B, grid, gen, **mask_kw) for _ in range(args.steps + 2)]
    tok = runners[-1].method.tokenizer
    if tok is not None:
        real = tok([c for cs in captions for c in cs]).mask.sum(1).float()
        print(f"captions: {real.mean():.1f} real tokens of {tok.context_length} on average")

    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for i, m in enumerate(masks):
        order = runners[i % len(runners):] + runners[: i % len(runners)]
        for r in order:
            dt = r.step(images, m, captions, torch.Generator().manual_seed(i))
            if i >= 2:
                times[r.name].append(dt)
        print(f"round {i + 1}/{len(masks)}: " + "  ".join(f"{r.name} {times[r.name][-1] * 1e3:.0f} ms" if i >= 2 else r.name
                                                          for r in runners), flush=True)
    ref = times[runners[0].name]
    results = []
    for r in runners:
        t = times[r.name]
        ratio = statistics.median(a / b for a, b in zip(t, ref))
        results.append({"variant": r.name, "median_ms": statistics.median(t) * 1e3, "img_per_s": B / statistics.median(t),
                        "ratio_vs_first": ratio, "trainable_params": r.params})
    if args.memory:  # one variant's model at a time: four models with optimiser states and an 11 GiB
        from tcjepa.plan import measure_activations  # measurement beside them do not fit in 24 GiB

        cfgs = [r.cfg for r in runners]
        del runners[:], r
        for res, cfg_i in zip(results, cfgs):
            res["activation_bytes"], _ = measure_activations(cfg_i, batch=B, seed=0)
    print()
    mem = " activations (GiB) | memory / first |" if args.memory else ""
    print(f"| variant | step (ms) | img/s | time / {results[0]['variant']} | trainable params |{mem}")
    print("|---|---|---|---|---|" + ("---|---|" if args.memory else ""))
    for r in results:
        extra = (f" {r['activation_bytes'] / 2**30:.2f} | {r['activation_bytes'] / results[0]['activation_bytes']:.2f} |"
                 if args.memory else "")
        print(f"| {r['variant']} | {r['median_ms']:.0f} | {r['img_per_s']:.1f} | {r['ratio_vs_first']:.3f} | "
              f"{r['trainable_params'] / 1e6:.2f} M |{extra}")
    env = {"preset": args.preset, "batch": B, "steps": args.steps, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "overrides": base, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(env))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
