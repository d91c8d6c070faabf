"""Command line: argument parsing only; each subcommand calls one library function.

Exit status 0 on success; bad input or config prints one ``error: ...`` line and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.batch_size=32 optim.lr=1e-3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tcjepa", description="Vision-language pretraining by feature prediction.")
    # the deepspeed launcher passes --local_rank=N before the subcommand (`python -m tcjepa --local_rank=0 train ...`)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quickstart", help="synthetic data -> train (tiny) -> evaluate -> results table")
    p.add_argument("--out", default="tcjepa_quickstart")
    _add_set(p)

    p = sub.add_parser("train", help="train a recipe")
    p.add_argument("recipe")
    p.add_argument("--data", help="training SHARDS (sets data.train)")
    p.add_argument("--steps", type=int, help="sets train.steps")
    p.add_argument("--out", help="run directory (default: runs/RECIPE_NAME)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_set(p)

    p = sub.add_parser("eval", help="evaluate a finished run")
    p.add_argument("task", choices=["probe"])
    p.add_argument("--checkpoint", required=True, help="RUN_DIR")
    p.add_argument("--data", required=True, help="train SHARDS")
    p.add_argument("--val-data", default="", help="validation SHARDS")
    p.add_argument("--json", help="also write the result here")
    _add_set(p)

    p = sub.add_parser("viz", help="visualisations of a finished run")
    vsub = p.add_subparsers(dest="viz_command", required=True)
    v = vsub.add_parser("attention", help="TC-JEPA: each caption word's attention over the image patches, as PNGs")
    v.add_argument("--checkpoint", required=True, help="RUN_DIR of a TC-JEPA run")
    v.add_argument("--data", required=True, help="SHARDS to take samples from")
    v.add_argument("--out", required=True, help="output directory")
    v.add_argument("--samples", type=int, default=4)

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("synthetic", help="write synthetic captioned scenes as shards")
    d.add_argument("--out", required=True)
    d.add_argument("--samples", type=int, default=2000)
    d.add_argument("--shard-size", type=int, default=500)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--image-size", type=int, default=64)
    d = dsub.add_parser("train-tokenizer", help="train a SentencePiece tokenizer on the captions of SHARDS")
    d.add_argument("--data", required=True, help="SHARDS")
    d.add_argument("--vocab-size", type=int, default=1000)
    d.add_argument("--out", required=True, help="FILE.model")
    return parser


def _probe_config(run_dir: str, overrides: list[str]):
    from tcjepa.checkpoint import load_run_config
    from tcjepa.config import ConfigError, apply_overrides, parse_overrides

    bad = [k for k in parse_overrides(overrides) if k != "probe"]
    if bad:
        raise ConfigError(f"--set {bad[0]}.*: only probe.* keys can be set for eval probe")
    return apply_overrides(load_run_config(run_dir), overrides).probe


def run(args: argparse.Namespace) -> int:
    if args.command == "quickstart":
        from tcjepa.quickstart import quickstart

        quickstart(args.out, args.set)
    elif args.command == "train":
        from tcjepa.config import load_config
        from tcjepa.train import train

        overrides = list(args.set)
        if args.data:
            overrides.append(f"data.train={args.data}")
        if args.steps is not None:
            overrides.append(f"train.steps={args.steps}")
        cfg = load_config(args.recipe, overrides)
        out = args.out or str(Path("runs") / Path(args.recipe).stem)
        train(cfg, out, resume=args.resume)
        if os.environ.get("RANK", "0") == "0":
            print(f"finished: {out}")
    elif args.command == "eval":
        import json

        from tcjepa.eval.probe import run_probe

        result = run_probe(args.checkpoint, args.data, args.val_data, _probe_config(args.checkpoint, args.set), args.json)
        m = result["metrics"]
        print(json.dumps({"task": result["task"], **{k: v["top1"] for k, v in m["per_label"].items()}}))
    elif args.command == "viz":
        from tcjepa.viz import visualize_attention

        written = visualize_attention(args.checkpoint, args.data, args.out, samples=args.samples)
        print(f"wrote {len(written)} attention maps to {args.out}")
    elif args.command == "data" and args.data_command == "train-tokenizer":
        from data_pipelines.loader import DataError, resolve_shards
        from data_pipelines.tokenizers import captions_from_shards, train_sentencepiece

        captions = [c for c in captions_from_shards(resolve_shards(args.data, "--data")) if c.strip()]
        if not captions:
            raise DataError(f"--data: no non-empty caption in {args.data}")
        try:
            train_sentencepiece(captions, args.out, vocab_size=args.vocab_size)
        except RuntimeError as e:
            raise DataError(f"data train-tokenizer: {e}") from e
        print(f"trained a {args.vocab_size}-piece SentencePiece model on {len(captions)} captions: {args.out}")
        print(f"use it with --set conditioner.tokenizer=sentencepiece conditioner.tokenizer_path={args.out}")
    elif args.command == "data" and args.data_command == "synthetic":
        from data_pipelines.synthetic import write_synthetic_shards

        from data_pipelines.loader import DataError

        try:
            summary = write_synthetic_shards(args.out, samples=args.samples, shard_size=args.shard_size,
                                             seed=args.seed, image_size=args.image_size, progress=True)
        except ValueError as e:
            raise DataError(f"data synthetic: {e}") from e
        print(f"wrote {summary['samples']} samples in {len(summary['shards'])} shards to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from data_pipelines.loader import DataError
    from tcjepa.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
