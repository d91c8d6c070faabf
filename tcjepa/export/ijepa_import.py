"""Official facebookresearch/ijepa training checkpoints as tcjepa run directories.

The official ``src/train.py`` saves ``{"encoder", "predictor", "target_encoder"}``: state dicts of
``DistributedDataParallel``-wrapped modules (keys start with ``module.``), beside ``opt``,
``scaler``, ``epoch``, ``loss``, ``batch_size``, ``world_size`` and ``lr``. Our parameter names
follow the official ones (``tcjepa.models.vit``, ``tcjepa.models.predictor``), so converting is:

1. read the file without unpickling arbitrary objects (``torch.load(weights_only=True)``);
2. strip ``module.``; check the stored position embeddings (``pos_embed``,
   ``predictor_pos_embed``: parameters there, recomputed buffers here) are the fixed 2-D sin-cos
   ones we compute, then drop them;
3. read the architecture off the shapes (width -> vit_tiny ... vit_giant, patch size, image size
   from the number of positions, depths, predictor width and MLP ratio) or check ``--arch``;
4. load strictly into our encoder, predictor and teacher and write ``final/`` with
   ``tcjepa.checkpoint.save_final`` plus ``config.yaml`` and ``import.json`` (provenance).

The result is a finished run: ``tcjepa eval`` and ``tcjepa export`` read it, and ``tcjepa train
RUN_DIR/config.yaml --out RUN_DIR --resume`` continues training from its weights (with a fresh
optimiser: the official AdamW state and epoch-based schedules are not carried over).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from tcjepa.checkpoint import FINAL, IMPORT_RECORD, load_state_exactly, save_final
from tcjepa.config import Config, ConfigError, ModelConfig, save_config, validate
from tcjepa.export import make_out_dir
from tcjepa.models.vit import ARCHS, ViTArch, parse_encoder_name, sincos_pos_embed_2d
from tcjepa.resume import CHECKPOINTS

STATE_DICTS = ("encoder", "predictor", "target_encoder")
OFFICIAL_ARCHS = ("tiny", "small", "base", "large", "huge", "giant")  # the vit_* of the official vision_transformer.py
POS_EMBED_TOLERANCE = 1e-5


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The official checkpoint dict, loaded with ``weights_only=True`` (tensors, numbers, strings
    and containers only: a file that needs more is refused, never executed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: refused to unpickle it: it holds objects other than tensors and plain "
                          f"containers ({str(e).splitlines()[0]}). Re-save only the state dicts") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ConfigError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from e
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path}: expected a dict with {', '.join(STATE_DICTS)}, got {type(ckpt).__name__}")
    missing = [k for k in STATE_DICTS if not isinstance(ckpt.get(k), dict)]
    if missing:
        raise ConfigError(f"{path}: not a facebookresearch/ijepa training checkpoint: no {', '.join(missing)} "
                          f"state dict (keys: {sorted(map(str, ckpt))[:10]})")
    return ckpt


def strip_module_prefix(state: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Keys without DistributedDataParallel's ``module.`` (a checkpoint saved unwrapped is accepted)."""
    out = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    bad = [k for k, v in out.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"{where}: entries that are not tensors: {bad[:5]}")
    if len(out) != len(state):
        raise ConfigError(f"{where}: keys with and without the module. prefix collide")
    return out


def _need(state: dict[str, torch.Tensor], key: str, ndim: int, where: str) -> torch.Tensor:
    t = state.get(key)
    if t is None:
        raise ConfigError(f"{where}: missing {key} (keys: {sorted(state)[:8]} ...)")
    if t.ndim != ndim:
        raise ConfigError(f"{where}: {key} has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return t


def _depth(state: dict[str, torch.Tensor], blocks: str, where: str) -> int:
    """Number of ``blocks.N`` modules, which must be numbered 0 .. N-1."""
    found = {int(m.group(1)) for k in state if (m := re.match(rf"{blocks}\.(\d+)\.", k))}
    if not found or found != set(range(len(found))):
        raise ConfigError(f"{where}: {blocks}.N must be numbered 0..N-1, found {sorted(found)[:10]}")
    return len(found)


def _grid(positions: int, where: str, key: str) -> int:
    side = math.isqrt(positions)
    if side * side != positions:
        raise ConfigError(f"{where}: {key} has {positions} positions, not a square grid")
    return side


def resolve_arch(arch: str | None, width: int, patch: int, where: str) -> ViTArch:
    """``--arch`` (``vit_huge`` or ``vit_huge_14``) checked against the weights, or the one
    architecture with this width."""
    if arch is None:
        names = [n for n, spec in ARCHS.items() if spec[0] == width]
        if not names:
            known = ", ".join(f"vit_{n} ({s[0]})" for n, s in ARCHS.items())
            raise ConfigError(f"{where}: width {width} matches no architecture ({known}); pass --arch")
        return parse_encoder_name(f"vit_{names[0]}_{patch}")
    name = arch if re.fullmatch(r"vit_[a-z]+_\d+", arch) else f"{arch}_{patch}"
    try:
        spec = parse_encoder_name(name)
    except ValueError as e:
        raise ConfigError(f"--arch {arch}: {e}") from e
    if spec.patch_size != patch:
        raise ConfigError(f"--arch {arch}: patch size {spec.patch_size}, but {where} has {patch} px patches")
    if spec.width != width:
        raise ConfigError(f"--arch {arch}: width {spec.width}, but {where} has width {width}")
    return spec


def check_pos_embed(t: torch.Tensor, width: int, grid: int, where: str) -> None:
    """The stored embedding must be the fixed sin-cos one we recompute (else the weights expect
    positions we would not give them)."""
    ours = sincos_pos_embed_2d(width, grid, grid)[None]
    if t.shape != ours.shape:
        raise ConfigError(f"{where}: shape {tuple(t.shape)}, expected {tuple(ours.shape)}")
    diff = (t.float() - ours).abs().max().item()
    if diff > POS_EMBED_TOLERANCE:
        raise ConfigError(f"{where}: not the fixed 2-D sin-cos position embedding (max difference {diff:.3g}); "
                          "tcjepa recomputes it and cannot import learned or interpolated positions")


def infer_model_config(encoder: dict[str, torch.Tensor], predictor: dict[str, torch.Tensor], arch: str | None,
                       where: str) -> ModelConfig:
    """``model.*`` of the run that rebuilds these weights (see the module docstring, step 3)."""
    proj = _need(encoder, "patch_embed.proj.weight", 4, f"{where} encoder")
    width, patch = proj.shape[0], proj.shape[-1]
    spec = resolve_arch(arch, width, patch, f"{where} encoder")
    grid = _grid(_need(encoder, "pos_embed", 3, f"{where} encoder").shape[1], f"{where} encoder", "pos_embed")
    depth = _depth(encoder, "blocks", f"{where} encoder")
    hidden = _need(encoder, "blocks.0.mlp.fc1.weight", 2, f"{where} encoder").shape[0]
    if hidden != int(width * spec.mlp_ratio):
        raise ConfigError(f"{where} encoder: MLP width {hidden}, but {spec.name} has {int(width * spec.mlp_ratio)}")
    embed = _need(predictor, "predictor_embed.weight", 2, f"{where} predictor")
    pred_width = embed.shape[0]
    if embed.shape[1] != width:
        raise ConfigError(f"{where} predictor: predictor_embed reads width {embed.shape[1]}, the encoder has {width}")
    pred_hidden = _need(predictor, "predictor_blocks.0.mlp.fc1.weight", 2, f"{where} predictor").shape[0]
    ratio = pred_hidden / pred_width
    if int(pred_width * ratio) != pred_hidden:
        raise ConfigError(f"{where} predictor: MLP width {pred_hidden} is no whole ratio of its width {pred_width}")
    return ModelConfig(
        encoder=spec.name, image_size=grid * patch, depth=None if depth == spec.depth else depth,
        predictor_depth=_depth(predictor, "predictor_blocks", f"{where} predictor"), predictor_width=pred_width,
        predictor_heads=None,  # the official predictor uses the encoder's head count, as our default does
        predictor_mlp_ratio=None if int(pred_width * spec.mlp_ratio) == pred_hidden else ratio,
    )


def imported_config(model: ModelConfig, ckpt: dict[str, Any], where: str) -> Config:
    """Our defaults (the I-JEPA recipe's optimiser, masks and EMA) with the checkpoint's model, its
    global batch (per-GPU batch x world size) and reference learning rate where it records them."""
    cfg = Config(model=model)
    if isinstance(ckpt.get("batch_size"), int) and isinstance(ckpt.get("world_size"), int):
        cfg.train = dataclasses.replace(cfg.train, batch_size=ckpt["batch_size"] * ckpt["world_size"])
    if isinstance(ckpt.get("lr"), (int, float)) and ckpt["lr"] > 0:
        cfg.optim = dataclasses.replace(cfg.optim, lr=float(ckpt["lr"]))
    validate(cfg, where)
    return cfg


def convert(ckpt: dict[str, Any], arch: str | None, where: str) -> tuple[Config, dict[str, dict[str, torch.Tensor]]]:
    """(config, {"encoder", "predictor", "teacher": our state dicts}) of an official checkpoint."""
    states = {k: strip_module_prefix(ckpt[k], f"{where} {k}") for k in STATE_DICTS}
    model = infer_model_config(states["encoder"], states["predictor"], arch, where)
    cfg = imported_config(model, ckpt, where)
    spec = parse_encoder_name(model.encoder)
    grid, width = model.image_size // spec.patch_size, spec.width
    for name in ("encoder", "target_encoder"):
        check_pos_embed(_need(states[name], "pos_embed", 3, f"{where} {name}"), width, grid, f"{where} {name}.pos_embed")
        del states[name]["pos_embed"]
    pred = states["predictor"]
    check_pos_embed(_need(pred, "predictor_pos_embed", 3, f"{where} predictor"), model.predictor_width, grid,
                    f"{where} predictor.predictor_pos_embed")
    del pred["predictor_pos_embed"]
    return cfg, {"encoder": states["encoder"], "predictor": pred, "teacher": states["target_encoder"]}


def build_modules(cfg: Config, states: dict[str, dict[str, torch.Tensor]], where: str) -> dict[str, torch.nn.Module]:
    """Our encoder, predictor and teacher holding ``states``: built on the meta device (no random
    initialisation of a billion parameters that are replaced at once), then loaded strictly."""
    from tcjepa.methods.jepa import build_student
    from tcjepa.models.vit import build_encoder

    m = cfg.model
    with torch.device("meta"):
        student = build_student(cfg)
        teacher = build_encoder(m.encoder, m.image_size, m.depth, m.init_std)
    modules = {"encoder": student.encoder, "predictor": student.predictor, "teacher": teacher}
    official = {"encoder": "encoder", "predictor": "predictor", "teacher": "target_encoder"}
    for name, module in modules.items():
        load_state_exactly(module, states[name], f"{where} {official[name]}", assign=True)
    return modules


def _check_out(out_dir: Path) -> None:
    if (out_dir / FINAL).exists() or (out_dir / CHECKPOINTS).exists():
        raise ConfigError(f"--out {out_dir} already holds a run; choose another directory")


def import_ijepa(ckpt_path: str | Path, out_dir: str | Path, arch: str | None = None) -> Path:
    """Convert the official checkpoint ``ckpt_path`` into the finished run directory ``out_dir``
    (``--arch``: e.g. ``vit_huge`` or ``vit_huge_14``; inferred from the shapes when None).
    Returns ``out_dir``."""
    out = Path(out_dir)
    where = str(ckpt_path)
    _check_out(out)  # before reading gigabytes
    ckpt = read_checkpoint(ckpt_path)
    cfg, states = convert(ckpt, arch, where)
    modules = build_modules(cfg, states, where)
    make_out_dir(out)
    save_final(out, modules, cfg)
    save_config(cfg, out / "config.yaml")
    record = {
        "format": "facebookresearch/ijepa", "source": str(Path(ckpt_path).resolve()),
        "encoder": cfg.model.encoder, "image_size": cfg.model.image_size,
        **{k: ckpt[k] for k in ("epoch", "loss", "lr", "batch_size", "world_size") if isinstance(ckpt.get(k), (int, float))},
        "not_imported": sorted(str(k) for k in ckpt if k in ("opt", "scaler")),
    }
    (out / IMPORT_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    return out
