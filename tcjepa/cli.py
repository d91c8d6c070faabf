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


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show DeepSpeed's and torch's own set-up messages and full warning locations")


def format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   line: str | None = None) -> str:
    """One line per warning (no echoed source line): the program's own warnings are messages for
    the user, e.g. a skipped sample."""
    return f"warning: {message}\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tcjepa", description="Vision-language pretraining by feature prediction.")
    # the deepspeed launcher passes --local_rank=N before the subcommand (`python -m tcjepa --local_rank=0 train ...`)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quickstart", help="synthetic data -> train (tiny) -> evaluate -> results table")
    p.add_argument("--out", default="tcjepa_quickstart")
    _add_set(p)
    _add_verbose(p)

    p = sub.add_parser("train", help="train a recipe")
    p.add_argument("recipe")
    p.add_argument("--data", help="training SHARDS (sets data.train)")
    p.add_argument("--steps", type=int, help="sets train.steps")
    p.add_argument("--out", help="run directory (default: runs/RECIPE_NAME)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint; its saved settings must match "
                        "the recipe's and --set's (see --allow-change)")
    p.add_argument("--allow-change", nargs="+", action="extend", default=[], metavar="KEY",
                   help="with --resume: accept a change of these keys against the run's saved settings "
                        "(e.g. train.steps to extend a run); recorded in RUN_DIR/config_history.jsonl")
    p.add_argument("--local_rank", "--local-rank", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_set(p)
    _add_verbose(p)

    p = sub.add_parser("eval", help="evaluate a finished run",
                       description="Evaluate a finished run; the result goes to RUN_DIR/eval/TASK.json (TASK_init.json with "
                                   "--set TASK.encoder=init: the run's random initialisation, a baseline). "
                                   "probe: linear/attentive probes (train on --data, report on --val-data); "
                                   "zeroshot, retrieval: TC-JEPA runs, scored on --val-data (else --data); "
                                   "vqa: a VQA head on the frozen encoder (train on --data, test on --val-data); "
                                   "segment: linear segmentation heads on the frozen patch features, mIoU (train on "
                                   "--data, report on --val-data; shards with KEY.seg.png maps). "
                                   "grounding: TC-JEPA runs, does the conditioner read each colour/shape word on "
                                   "its object (pointing game on --val-data, else --data; KEY.inst.png maps). "
                                   "caption: a text decoder on the frozen encoder writes captions, CIDEr-D and "
                                   "BLEU-4 beside a blind decoder's (train on --data's captions, score on "
                                   "--val-data's; needs pip install 'tcjepa[caption]'); vqa.head=decoder answers with "
                                   "the same decoder. "
                                   "Task settings: --set probe.* | zeroshot.* | retrieval.* | vqa.* | segment.* | "
                                   "grounding.* | caption.*")
    p.add_argument("task", choices=["probe", "zeroshot", "retrieval", "vqa", "segment", "grounding", "caption"])
    p.add_argument("--checkpoint", required=True, help="RUN_DIR")
    p.add_argument("--data", required=True, help="train SHARDS (zeroshot/retrieval/grounding: evaluated when no --val-data)")
    p.add_argument("--val-data", default="", help="validation / test SHARDS")
    p.add_argument("--json", help="also write the result here")
    _add_set(p)

    p = sub.add_parser("report", help="compare runs across their evaluations: a markdown table and PNG plots")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="write FILE.md and its plots (FILE_loss.png, ...) here; default: print the table")

    p = sub.add_parser("plan", help="memory per GPU by ZeRO stage, FLOPs per image and time per epoch of a recipe",
                       description="Plan a recipe before renting GPUs: per ZeRO stage the memory per GPU for "
                                   "parameters, gradients, optimiser states, teacher and activations (with and "
                                   "without activation checkpointing), which micro-batch fits, the model FLOPs per "
                                   "image and the time per step / epoch / run at an assumed MFU.")
    p.add_argument("recipe")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB", help="memory per GPU in GiB (default 80)")
    p.add_argument("--samples", type=int, default=None, metavar="N", help="images per epoch, for the time per epoch")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model-FLOP utilisation (default 0.4)")
    p.add_argument("--gpu-tflops", type=float, default=989.0, metavar="T",
                   help="peak TFLOP/s per GPU (default 989: H100 SXM dense bf16)")
    _add_set(p)

    p = sub.add_parser("viz", help="visualisations of a finished run")
    vsub = p.add_subparsers(dest="viz_command", required=True)
    v = vsub.add_parser("attention", help="TC-JEPA: each caption word's attention over the image patches, as PNGs")
    v.add_argument("--checkpoint", required=True, help="RUN_DIR of a TC-JEPA run")
    v.add_argument("--data", required=True, help="SHARDS to take samples from")
    v.add_argument("--out", required=True, help="output directory")
    v.add_argument("--samples", type=int, default=4)

    p = sub.add_parser("export", help="a finished run's encoder for other libraries")
    esub = p.add_subparsers(dest="export_command", required=True)
    e = esub.add_parser("hf", help="as a Hugging Face IJepaModel directory (config, safetensors, image processor)")
    e.add_argument("--checkpoint", required=True, help="RUN_DIR")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--which", choices=["auto", "teacher", "student"], default="auto",
                   help="encoder to export (auto: the EMA teacher of JEPA runs, else the student)")
    e = esub.add_parser("llava", help="as the vision tower of a LlavaForConditionalGeneration (fresh projector)")
    e.add_argument("--checkpoint", required=True, help="RUN_DIR")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--language-model", required=True, metavar="PATH",
                   help="local Hugging Face causal language model directory (with its tokenizer)")
    e.add_argument("--which", choices=["auto", "teacher", "student"], default="auto")
    e.add_argument("--feature-layer", type=int, default=-1,
                   help="the encoder hidden state LLaVA feeds its projector: -1 the final, layer-normed output (what "
                        "tcjepa's evaluations read), -2 the block before it (LLaVA-1.5's choice for CLIP)")
    e.add_argument("--feature-select", choices=["full"], default="full",
                   help="every patch token (the encoder has no class token for LLaVA's 'default' to drop)")

    e = esub.add_parser("open_clip", help="a contrastive run as an open_clip model (config + safetensors)")
    e.add_argument("--checkpoint", required=True, help="RUN_DIR of a finished contrastive (CLIP/SigLIP) run")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--name", default="", help="open_clip model name (default: tcjepa-<run directory name>)")

    p = sub.add_parser("import", help="checkpoints from other code bases as run directories")
    isub = p.add_subparsers(dest="import_command", required=True)
    i = isub.add_parser("ijepa", help="an official facebookresearch/ijepa training checkpoint (.pth.tar)")
    i.add_argument("checkpoint", metavar="CKPT")
    i.add_argument("--out", required=True, help="RUN_DIR to create")
    i.add_argument("--arch", help="e.g. vit_huge or vit_huge_14 (default: read off the weights' shapes)")

    p = sub.add_parser("data", help="data tools")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("synthetic", help="write synthetic captioned scenes as shards")
    d.add_argument("--out", required=True)
    d.add_argument("--samples", type=int, default=2000)
    d.add_argument("--shard-size", type=int, default=500)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--image-size", type=int, default=64)
    d.add_argument("--captions-per-image", type=int, default=1,
                   help="N > 1 also writes N different captions per scene to KEY.json 'captions' (KEY.txt first)")
    d = dsub.add_parser("write", help="image-caption folder or CSV/TSV/JSONL/parquet manifest -> shards",
                        description="Convert local images + captions into WebDataset shards (img2dataset layout). "
                                    "Rows that cannot be used are skipped, counted in OUT/stats.json and listed "
                                    "in OUT/skipped.jsonl.")
    d.add_argument("--input", required=True, help="a folder (NAME.jpg + NAME.txt [+ NAME.json]) or FILE.csv|tsv|jsonl|parquet")
    d.add_argument("--out", required=True, help="output directory for the shards")
    d.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    d.add_argument("--shard-bytes", default="0", help="also cap shards by size, e.g. 500MB (default: no cap)")
    d.add_argument("--resize", type=int, default=0, metavar="PX", help="shrink so the longer side is <= PX (default: keep)")
    d.add_argument("--workers", type=int, default=1, help="processes decoding/re-encoding images")
    d.add_argument("--image-column", default="", help="manifest column of image paths (default: image|filepath|path|file)")
    d.add_argument("--caption-column", default="",
                   help="manifest column of captions (default: caption|text|txt); several columns, comma-separated, "
                        "give several captions per image (so does a JSONL list)")
    d.add_argument("--mask-column", default="",
                   help="manifest column of segmentation label maps (single-channel 8-bit PNGs, each pixel a class id, "
                        "the image's size; relative paths like the images'), stored as KEY.seg.png; an empty cell "
                        "writes the sample without a mask")
    d.add_argument("--image-root", default="", help="relative image paths start here (default: the manifest's folder)")
    d.add_argument("--allow-empty-captions", action="store_true", help="keep rows without a caption")
    d.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    d = dsub.add_parser("inspect", help="counts, caption lengths, image sizes, broken samples, contact sheet")
    d.add_argument("shards", metavar="SHARDS")
    d.add_argument("--out", default="", help="write contact_sheet.png and inspect.json here")
    d.add_argument("--limit", type=int, default=0, help="read only the first N good samples")
    d.add_argument("--sheet-samples", type=int, default=16)
    d = dsub.add_parser("easy-vqa", help="convert the easy-vqa package's data set into train/test shards")
    d.add_argument("--out", required=True)
    d.add_argument("--shard-size", type=int, default=1000)
    d.add_argument("--workers", type=int, default=1)
    d.add_argument("--overwrite", action="store_true")
    d = dsub.add_parser("idx", help="an IDX image set (Fashion-MNIST, MNIST) -> PNGs + a JSONL manifest for data write",
                        description="Write OUT/images/*.png and OUT/manifest.jsonl (image, caption naming the class, "
                                    "label, label_name) from IDX image and label files (.gz as shipped); then "
                                    "`tcjepa data write --input OUT/manifest.jsonl --out SHARDS`.")
    d.add_argument("--images", required=True, help="IDX images, e.g. train-images-idx3-ubyte.gz")
    d.add_argument("--labels", required=True, help="IDX labels, e.g. train-labels-idx1-ubyte.gz")
    d.add_argument("--out", required=True)
    d.add_argument("--classes", default="fashion-mnist",
                   help="class names: a preset (fashion-mnist, mnist) or a comma-separated list, index = label")
    d.add_argument("--caption", default="a photo of a {}.", help="caption template; {} is the class name")
    d.add_argument("--limit", type=int, default=0, help="only the first N images (default: all)")
    d = dsub.add_parser("train-tokenizer", help="train a SentencePiece tokenizer on the captions of SHARDS")
    d.add_argument("--data", required=True, help="SHARDS")
    d.add_argument("--vocab-size", type=int, default=1000)
    d.add_argument("--out", required=True, help="FILE.model")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "quickstart":
        from tcjepa.quickstart import quickstart

        quickstart(args.out, args.set)
    elif args.command == "train":
        from tcjepa.config import ConfigError, load_config
        from tcjepa.train import run_training

        overrides = list(args.set)
        if args.data:
            overrides.append(f"data.train={args.data}")
        if args.steps is not None:
            overrides.append(f"train.steps={args.steps}")
        if args.allow_change and not args.resume:
            raise ConfigError("--allow-change only applies with --resume")
        cfg = load_config(args.recipe, overrides)
        out = args.out or str(Path("runs") / Path(args.recipe).stem)
        outcome = run_training(cfg, out, resume=args.resume, allow_change=tuple(args.allow_change))
        if os.environ.get("RANK", "0") == "0" and outcome.finished:  # not after a stop by signal
            print(f"finished: {out}")
    elif args.command == "eval":
        from tcjepa.eval.common import result_stem
        from tcjepa.eval.tasks import format_result, run_eval

        result = run_eval(args.task, args.checkpoint, args.data, args.val_data, args.set, args.json)
        print(format_result(result))
        written = Path(args.checkpoint) / "eval" / f"{result_stem(result)}.json"
        print(f"wrote {written}" + (f" and {args.json}" if args.json else ""))
    elif args.command == "report":
        from tcjepa.eval.report import write_report

        text = write_report(args.runs, args.out)
        print(f"wrote {args.out} and its plots" if args.out else text.rstrip("\n"))
    elif args.command == "plan":
        from tcjepa.config import load_config
        from tcjepa.plan import format_plan, plan_run

        cfg = load_config(args.recipe, args.set)
        print(format_plan(plan_run(cfg, gpus=args.gpus, nodes=args.nodes, gpu_memory_gb=args.gpu_memory,
                                   samples=args.samples, mfu=args.mfu, gpu_tflops=args.gpu_tflops, recipe=args.recipe)))
    elif args.command == "viz":
        from tcjepa.viz import visualize_attention

        written = visualize_attention(args.checkpoint, args.data, args.out, samples=args.samples)
        print(f"wrote {len(written)} attention maps to {args.out}")
    elif args.command == "export" and args.export_command == "hf":
        from tcjepa.export.hf import export_hf

        print(f"wrote {export_hf(args.checkpoint, args.out, args.which)} (transformers.IJepaModel.from_pretrained)")
    elif args.command == "export" and args.export_command == "llava":
        from tcjepa.export.hf import export_llava

        out = export_llava(args.checkpoint, args.out, args.language_model, args.which, args.feature_layer,
                           args.feature_select)
        print(f"wrote {out} (transformers.LlavaForConditionalGeneration + LlavaProcessor; the projector is untrained)")
    elif args.command == "export" and args.export_command == "open_clip":
        from tcjepa.export.open_clip import export_open_clip, how_to_load

        out, name = export_open_clip(args.checkpoint, args.out, args.name)
        print(f"wrote {out}\n{how_to_load(out, name)}")
    elif args.command == "import" and args.import_command == "ijepa":
        from tcjepa.export.ijepa_import import import_ijepa

        out = import_ijepa(args.checkpoint, args.out, args.arch)
        print(f"wrote {out}; evaluate with `tcjepa eval probe --checkpoint {out} ...`, continue training with "
              f"`tcjepa train {Path(out) / 'config.yaml'} --out {out} --resume --data SHARDS`")
    elif args.command == "data" and args.data_command == "write":
        from data_pipelines.write import WriteOptions, parse_size, summary_line, write_dataset

        opts = WriteOptions(
            shard_size=args.shard_size, shard_bytes=parse_size(args.shard_bytes), resize=args.resize,
            workers=args.workers, image_column=args.image_column, caption_column=args.caption_column,
            mask_column=args.mask_column, image_root=args.image_root, allow_empty_captions=args.allow_empty_captions,
            overwrite=args.overwrite,
        )
        print(summary_line(write_dataset(args.input, args.out, opts)))
    elif args.command == "data" and args.data_command == "inspect":
        from data_pipelines.inspection import format_report, inspect_shards

        report = inspect_shards(args.shards, args.out or None, sheet_samples=args.sheet_samples, limit=args.limit)
        print(format_report(report))
    elif args.command == "data" and args.data_command == "easy-vqa":
        from data_pipelines.easy_vqa import convert_easy_vqa, summary

        for line in summary(convert_easy_vqa(args.out, args.shard_size, args.workers, args.overwrite)):
            print(line)
    elif args.command == "data" and args.data_command == "idx":
        from data_pipelines.idx import CLASS_NAMES, write_idx_manifest

        names = CLASS_NAMES.get(args.classes) or tuple(c.strip() for c in args.classes.split(",") if c.strip())
        done = write_idx_manifest(args.images, args.labels, args.out, names, args.caption, args.limit)
        print(f"wrote {done['images']} images of {done['classes']} classes and {done['manifest']}; next: "
              f"tcjepa data write --input {done['manifest']} --out SHARDS_DIR")
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
                                             seed=args.seed, image_size=args.image_size, progress=True,
                                             captions_per_image=args.captions_per_image)
        except ValueError as e:
            raise DataError(f"data synthetic: {e}") from e
        print(f"wrote {summary['samples']} samples in {len(summary['shards'])} shards to {args.out}")
    return 0


def share_cpus() -> None:
    """Idle OpenMP threads sleep instead of spinning, unless the user chose a wait policy.

    libgomp's default keeps a thread spinning ~300k iterations after each parallel region: alone
    that is harmless, but beside another job the spinning threads take the cores the other job
    needs. Measured on 2 cores (benchmarks/RESULTS.md, "Sharing a machine"): two trainings started
    together each ran at 0.27x the solo images/s with the default and 0.64x with a passive wait,
    alone no slower within the noise. It must be set before torch loads its OpenMP runtime, hence here,
    first thing in the command line's process (launched ranks and loader workers inherit it).
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    share_cpus()
    from data_pipelines.loader import DataError
    from tcjepa.config import ConfigError

    from tcjepa.train import DivergenceError

    import warnings

    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ["TCJEPA_VERBOSE"] = "1"  # read by tcjepa.distributed; inherited by launched ranks
    saved_format = warnings.formatwarning
    if not os.environ.get("TCJEPA_VERBOSE"):
        warnings.formatwarning = format_warning
    try:
        return run(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DivergenceError as e:  # not bad input: the run itself failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = saved_format
        if argv is None:  # the process ends here (console script, python -m tcjepa); callers keep theirs
            from tcjepa.distributed import shutdown

            shutdown()


if __name__ == "__main__":
    sys.exit(main())
