"""Training objectives, one file each; the loop in ``tcjepa.train`` runs any of them.

A method object offers the loop:

- ``model``: the trainable module DeepSpeed wraps; ``teacher``: a target encoder outside the
  engine (fp32, never trained by SGD) or None; ``tokenizer`` (None for image-only methods);
- ``uses_masks``: whether ``loss`` reads the multi-block masks;
- ``text_inputs(captions, gen, tokens)`` -> the step's text input (or None);
- ``loss(engine, images, masks, tokens, health)`` -> ``(loss, metrics)``, and ``last_health``;
- ``after_step(engine, step, total)`` -> logged schedule values (EMA momentum, ...);
- ``eval_encoder(model)``: the encoder a finished run is evaluated with;
- ``final_modules(model)``: what ``final/model.safetensors`` holds, by key prefix.

``train.method`` picks the file: ``jepa`` (I-JEPA, TC-JEPA, SALT stage 2), ``mae`` (SALT stage 1),
``contrastive`` (CLIP, SigLIP).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tcjepa.config import Config, ConfigError


def load_frozen_teacher(cfg: Config) -> Any:
    """The trained encoder of ``teacher.checkpoint``, checked against this run's patch grid
    before anything trains (a wrong or unfinished run directory is a ``ConfigError``)."""
    from tcjepa.checkpoint import FINAL, WEIGHTS, load_encoder, load_run_config
    from tcjepa.models.vit import parse_encoder_name

    run = Path(cfg.teacher.checkpoint)
    if not (run / FINAL / WEIGHTS).is_file():
        raise ConfigError(f"teacher.checkpoint: {run} is not a finished run directory (no {FINAL}/{WEIGHTS}); "
                          "train the teacher first (e.g. recipes/salt_stage1_quickstart.yaml)")
    t = load_run_config(run).model
    mine = (cfg.model.image_size, parse_encoder_name(cfg.model.encoder).patch_size)
    theirs = (t.image_size, parse_encoder_name(t.encoder).patch_size)
    if mine != theirs:
        raise ConfigError(f"teacher.checkpoint: {run} was trained at {theirs[0]} px with {theirs[1]} px patches, this "
                          f"student uses {mine[0]} px and {mine[1]} px patches: its targets would not line up")
    return load_encoder(run, which="auto")


def file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def pin_teacher(cfg: Config, saved: Config | None = None) -> Config:
    """A frozen-teacher run pinned to its teacher's weights: ``teacher.sha256`` is the digest of
    ``teacher.checkpoint``'s ``final/model.safetensors`` (taken from the run's saved config on a
    resume, else computed now). Weights that no longer match it are an error naming both digests:
    a teacher retrained or replaced in place would silently change the targets."""
    import dataclasses

    from tcjepa.checkpoint import FINAL, WEIGHTS

    t = cfg.teacher
    if t.update != "frozen":
        return cfg
    path = Path(t.checkpoint) / FINAL / WEIGHTS
    if not path.is_file():
        return cfg  # load_frozen_teacher says what is missing
    pinned = t.sha256 or (saved.teacher.sha256 if saved is not None and saved.teacher.checkpoint == t.checkpoint
                          else "")
    digest = file_sha256(path)
    if pinned and pinned != digest:
        raise ConfigError(f"teacher.checkpoint: the weights in {path} changed since this run pinned them "
                          f"(sha256 {pinned}, now {digest}); restore that teacher or start a new run")
    return dataclasses.replace(cfg, teacher=dataclasses.replace(t, sha256=digest))


def build_method(cfg: Config, rank: int = 0, world_size: int = 1) -> Any:
    if cfg.train.method == "mae":
        from tcjepa.methods.mae import MAE

        return MAE(cfg)
    if cfg.train.method == "contrastive":
        from tcjepa.methods.contrastive import Contrastive

        return Contrastive(cfg, rank, world_size)
    from tcjepa.methods.jepa import JEPA

    teacher = load_frozen_teacher(cfg) if cfg.teacher.update == "frozen" else None
    return JEPA(cfg, teacher=teacher)
