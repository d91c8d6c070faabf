"""The model a recipe trains, built on the ``meta`` device (parameters are counted without
allocating them): the towers' shapes and the parameter counts of encoder, predictor, text tower,
conditioners and teacher (:func:`inventory`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tcjepa.config import Config, ConfigError


@dataclass(frozen=True)
class Tower:
    """A stack of pre-norm transformer blocks (``tcjepa.models.vit.Block``)."""

    depth: int
    width: int
    hidden: int  # MLP width
    heads: int


@dataclass(frozen=True)
class TextShape:
    """The TC-JEPA text encoder. Its activations and FLOPs are counted as for our ``Block``s
    (measured for ``scratch``; open_clip's causal ``nn.MultiheadAttention`` blocks and a Hugging
    Face encoder's are estimated alike; a frozen encoder keeps no activations)."""

    kind: str  # scratch | hf | open_clip
    tower: Tower
    length: int  # context_length: every caption is counted at full length (an upper bound)
    trained: bool


@dataclass(frozen=True)
class ModelInventory:
    """What the planner needs to know about the model: shapes and parameter counts."""

    encoder: Tower
    patch: int
    image_size: int
    predictor: Tower
    teacher: Tower
    out_dim: int  # predicted feature width (the teacher's)
    text: TextShape | None
    cond_layers: int
    cond_heads: int
    top_k: int
    sparsity: str
    trainable: int  # parameters the optimiser updates
    frozen: int  # parameters inside the engine without gradients (a frozen text encoder)
    encoder_params: int
    predictor_params: int  # with the conditioners
    text_params: int  # text tower, trained or frozen
    teacher_params: int  # the target encoder, outside the engine
    largest_layer: int  # most parameters held directly by one module (DeepSpeed's ZeRO-3 term)
    variant: str = "gated_topk"  # conditioner.variant (paper: per-layer cross-attention over N captions)
    captions: int = 1  # captions per image that the text tower and the conditioners run on
    cond_hidden: int = 0  # the paper conditioner's MLP width
    cond_logits: str = "dot"  # the paper conditioner's conditioner.logits (overlap: no fused attention)
    cond_mlp: bool = True  # the paper conditioner's conditioner.mlp (an MLP after each cross-attention)
    cond_regularise_encoder: bool = False  # conditioner.regularise_encoder (false: the regularisers' own queries)
    embedding_params: int = 0  # trained lookup tables (a scratch text tower's): autocast makes no bf16 copy

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def engine_params(self) -> int:
        return self.trainable + self.frozen


def count_params(model: nn.Module) -> tuple[int, int, int]:
    """(trainable, frozen, largest layer) of ``model``. Shared parameters count once (by
    identity: on ``meta`` every ``data_ptr`` is 0, so DeepSpeed's own ``model_to_params``, which
    deduplicates by ``data_ptr``, cannot be used there); the largest layer is the most parameters
    one module holds directly, as ``deepspeed.runtime.zero.stage3.model_to_params`` counts it."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return trainable, frozen, largest


def _vit_tower(model: Any) -> Tower:
    a = model.arch
    return Tower(a.depth, a.width, int(a.width * a.mlp_ratio), a.num_heads)


def _hf_text_on_meta(path: str) -> tuple[nn.Module, Tower]:
    """A pretrained Hugging Face encoder's architecture, without its weights: ``from_pretrained``
    refuses the meta device, ``from_config`` builds the same modules."""
    from transformers import AutoConfig, AutoModel, T5EncoderModel

    conf = AutoConfig.from_pretrained(path, local_files_only=True)
    if conf.model_type in ("t5", "mt5", "umt5"):  # the encoder stack only, as HFTextEncoder loads it
        return T5EncoderModel(conf), Tower(conf.num_layers, conf.d_model, conf.d_ff, conf.num_heads)
    model = AutoModel.from_config(conf)
    return model, Tower(conf.num_hidden_layers, conf.hidden_size, conf.intermediate_size, conf.num_attention_heads)


def _text_on_meta(cfg: Config, vocab_size: int, predictor_width: int) -> tuple[nn.Module, TextShape]:
    from tcjepa.config import resolved_text_path
    from tcjepa.models.text import TextTower, build_text_encoder

    c = cfg.conditioner
    frozen = c.text_frozen if c.text_frozen is not None else c.text_encoder in ("hf", "t5")
    if c.text_encoder in ("hf", "t5"):
        encoder, tower = _hf_text_on_meta(resolved_text_path(c))
        encoder.requires_grad_(not frozen)
        encoder.width = tower.width  # what TextTower reads off an HFTextEncoder
    else:  # the open_clip checkpoint (text_path) holds weights only: the architecture needs no file
        encoder = build_text_encoder(c.text_encoder, vocab_size=vocab_size, context_length=c.context_length,
                                     width=c.text_width, depth=c.text_depth, num_heads=c.text_heads,
                                     open_clip_model=c.open_clip_model, frozen=frozen, init_std=cfg.model.init_std)
        if c.text_encoder == "scratch":
            tower = Tower(c.text_depth, c.text_width, 4 * c.text_width, c.text_heads)
        else:
            t = encoder.model
            tower = Tower(t.transformer.layers, t.width, t.transformer.resblocks[0].mlp.c_fc.out_features, t.heads)
    return TextTower(encoder, predictor_width), TextShape(c.text_encoder, tower, c.context_length, not frozen)


def _teacher_model(cfg: Config) -> Any:
    """The target encoder's ``ModelConfig``: the student's for an EMA teacher; the trained run's
    (``teacher.checkpoint/config.yaml``) for a frozen one. Read off the meta device: loading a
    config validates it, which samples masks."""
    from pathlib import Path

    from tcjepa.config import load_config

    if cfg.teacher.update != "frozen":
        return cfg.model
    run_cfg = Path(cfg.teacher.checkpoint) / "config.yaml"
    if not run_cfg.is_file():
        raise ConfigError(f"teacher.checkpoint: {run_cfg} not found; the planner reads the frozen teacher's "
                          "architecture from its run directory: train the teacher first, or plan with "
                          "--set teacher.update=ema (a teacher the student's size)")
    return load_config(run_cfg).model


def inventory(cfg: Config) -> ModelInventory:
    """Build the student (encoder, predictor, text tower, conditioners) and teacher on the meta
    device and read off shapes and parameter counts. Mirrors ``tcjepa.methods.jepa.build_student``
    (a test checks that the counts agree)."""
    from tcjepa.config import captions_per_image
    from tcjepa.methods.jepa import build_conditioners_for
    from tcjepa.models.conditioner import conditioned_blocks
    from tcjepa.models.predictor import Predictor
    from tcjepa.models.vit import build_encoder

    if cfg.train.method != "jepa":
        raise ConfigError(f"train.method {cfg.train.method!r}: the planner covers jepa (I-JEPA, TC-JEPA, SALT stage 2) only")
    m, c, t = cfg.model, cfg.conditioner, _teacher_model(cfg)
    with torch.device("meta"):
        encoder = build_encoder(m.encoder, m.image_size, m.depth, m.init_std)
        teacher = build_encoder(t.encoder, t.image_size, t.depth, t.init_std)
        heads = m.predictor_heads or encoder.num_heads
        mlp_ratio = m.predictor_mlp_ratio or encoder.arch.mlp_ratio
        predictor = Predictor(encoder.embed_dim, encoder.grid, m.predictor_width, m.predictor_depth, heads,
                              mlp_ratio, m.init_std, out_dim=teacher.embed_dim)  # a frozen teacher's width (SALT)
        student = nn.ModuleList([encoder, predictor])
        text, cond_layers, cond_heads = None, 0, 0
        if c.enabled:
            from tcjepa.methods.jepa import build_tokenizer_for

            cond_heads = c.heads or heads
            predictor.conditioners = build_conditioners_for(cfg, cond_heads, mlp_ratio)
            text_module, text = _text_on_meta(cfg, build_tokenizer_for(cfg).vocab_size, m.predictor_width)
            student.append(text_module)
            cond_layers = len(conditioned_blocks(m.predictor_depth, c.every))
    trainable, frozen, largest = count_params(student)
    tables = sum(p.numel() for mod in student.modules() if isinstance(mod, nn.Embedding)
                 for p in mod.parameters(recurse=False) if p.requires_grad)

    def n(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return ModelInventory(
        encoder=_vit_tower(encoder), patch=encoder.patch_size, image_size=m.image_size,
        predictor=Tower(m.predictor_depth, m.predictor_width, int(m.predictor_width * mlp_ratio), heads),
        teacher=_vit_tower(teacher), out_dim=teacher.embed_dim, text=text, cond_layers=cond_layers,
        cond_heads=cond_heads, top_k=c.top_k, sparsity=c.sparsity, trainable=trainable, frozen=frozen,
        encoder_params=n(encoder), predictor_params=n(predictor),
        text_params=n(student[2]) if c.enabled else 0, teacher_params=n(teacher), largest_layer=largest,
        variant=c.variant, captions=max(captions_per_image(c), 1),
        cond_hidden=int(m.predictor_width * mlp_ratio) if c.variant == "paper" else 0, cond_logits=c.logits,
        cond_mlp=c.mlp, cond_regularise_encoder=c.regularise_encoder, embedding_params=tables,
    )
