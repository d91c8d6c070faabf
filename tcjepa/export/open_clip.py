"""A contrastive (CLIP / SigLIP) run as an open_clip model.

open_clip's own ``VisionTransformer`` always prepends a class token that every patch attends to,
so it cannot compute what our class-token-free ViT computes. Its timm adapter can: timm's
``VisionTransformer`` with ``class_token=False``, ``global_pool='avg'`` and ``fc_norm=False`` is
our encoder layer for layer (same fused ``qkv`` layout, LayerNorm eps 1e-6, exact GELU, final
norm before the mean over patches), with our fixed sin-cos positions written into its position
parameter. timm reads those model arguments from a ``config.json`` through its ``local-dir:``
model source, so the open_clip config names the vision tower ``local-dir:<OUT>/timm``. Such paths
(and a Hugging Face text tower's) are absolute: move the directory and export again.

Text towers, by ``conditioner.text_encoder``:

- ``open_clip``: open_clip's own ``TextTransformer`` (ours is one), pooled at the EOT token
  (``pool_type: argmax``), with our projection as its ``text_projection``; open_clip's BPE
  tokenizer is ours;
- ``hf``: open_clip's Hugging Face adapter (``hf_model_name``) with mean pooling and a linear
  projection, the model config copied into ``<OUT>/text`` and the tokenizer into ``<OUT>``;
- ``scratch``: not expressible: open_clip has no bidirectional, mean-pooled text transformer of
  its own and none of the Hugging Face architectures it adapts is pre-norm. Such runs get an error
  naming the towers that export.

The directory holds ``open_clip_config.json`` (model and preprocessing config, for
``open_clip.create_model_and_transforms('local-dir:OUT')``), ``<name>.json`` (the model config
alone, for ``open_clip.add_model_config``) and ``open_clip_model.safetensors``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from data_pipelines.loader import MEAN, STD
from tcjepa.checkpoint import follow_umask, load_dual_encoder
from tcjepa.config import Config, ConfigError, resolved_tokenizer
from tcjepa.export import make_out_dir
from tcjepa.methods.contrastive import DualEncoder
from tcjepa.models.text import HFTextEncoder, OpenCLIPTextEncoder
from tcjepa.models.vit import VisionTransformer

WEIGHTS = "open_clip_model.safetensors"
CONFIG = "open_clip_config.json"


def mlp_ratio(hidden: int, width: int) -> float:
    """The ratio from which timm and open_clip rebuild ``hidden`` (they take ``int(width * ratio)``)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else math.nextafter(ratio, math.inf)


def timm_config(encoder: VisionTransformer) -> dict[str, Any]:
    """timm's ``config.json`` (``local-dir:`` source) for a ViT that computes what ``encoder`` does."""
    size = encoder.image_size
    model_args = {
        "img_size": size, "patch_size": encoder.patch_size, "embed_dim": encoder.embed_dim,
        "depth": len(encoder.blocks), "num_heads": encoder.num_heads,
        "mlp_ratio": mlp_ratio(encoder.blocks[0].mlp.fc1.out_features, encoder.embed_dim),
        "qkv_bias": True, "class_token": False, "global_pool": "avg", "fc_norm": False, "num_classes": 0,
    }
    pretrained_cfg = {
        "input_size": [3, size, size], "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 1.0,
        "crop_mode": "center", "mean": list(MEAN), "std": list(STD), "num_classes": 0,
    }
    return {"architecture": "vit_base_patch16_224", "num_features": encoder.embed_dim, "model_args": model_args,
            "pretrained_cfg": pretrained_cfg}


def timm_state_dict(encoder: VisionTransformer) -> dict[str, torch.Tensor]:
    """Our encoder's weights under timm's names: identical but for the position embedding, a
    buffer here and a parameter there."""
    state = {k: v.detach().float() for k, v in encoder.state_dict().items()}
    state["pos_embed"] = encoder.pos_embed.detach().float()
    return state


def _open_clip_text(model: DualEncoder) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """open_clip's native text tower: our ``OpenCLIPTextEncoder`` is one."""
    tower = model.text.model
    blocks = tower.transformer.resblocks
    text_cfg = {
        "context_length": tower.context_length, "vocab_size": tower.vocab_size, "width": tower.width,
        "heads": tower.heads, "layers": len(blocks),
        "mlp_ratio": mlp_ratio(blocks[0].mlp.c_fc.out_features, tower.width),
        "pool_type": "argmax",  # the EOT token (the largest id in every row): our last real token
    }
    state = {k: v.detach().float() for k, v in tower.state_dict().items() if k != "text_projection"}
    state["text_projection"] = model.head.text_proj.weight.detach().float().T.contiguous()
    return text_cfg, state


def _hf_text(model: DualEncoder, cfg: Config, out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """open_clip's Hugging Face adapter: mean pooling over ``input_ids != pad_token_id``, a linear
    projection without bias. The model config goes to ``out/text``, the tokenizer to ``out``
    (where open_clip's ``local-dir:`` looks for it)."""
    text_cfg = {
        "hf_model_name": str(out / "text"), "hf_tokenizer_name": str(out), "hf_model_pretrained": False,
        "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": cfg.conditioner.context_length,
    }
    # open_clip builds the model without BERT's pooler (its mean pooler replaces it)
    hf = model.text.model
    state = {f"transformer.{k}": v.detach().float() for k, v in hf.state_dict().items() if not k.startswith("pooler.")}
    state["proj.weight"] = model.head.text_proj.weight.detach().float()
    return text_cfg, state


def _hf_tokenizer(model: DualEncoder, cfg: Config) -> Any:
    """The run's Hugging Face tokenizer, checked against what open_clip's adapter assumes."""
    from transformers import AutoTokenizer

    kind, path = resolved_tokenizer(cfg.conditioner)
    if kind != "hf":
        raise ConfigError(f"export open_clip: a Hugging Face text tower tokenized with {kind!r}; open_clip pairs "
                          "its Hugging Face text towers with their Hugging Face tokenizer (conditioner.tokenizer: hf)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)  # loaded once already by load_dual_encoder
    pad = model.text.model.config.pad_token_id
    if tokenizer.pad_token_id != pad:
        raise ConfigError(f"export open_clip: the tokenizer pads with id {tokenizer.pad_token_id} but the model's "
                          f"pad_token_id is {pad}; open_clip masks padding by the model's id")
    return tokenizer


def check_exportable(model: DualEncoder, cfg: Config, name: str) -> Any:
    """Every check, before anything is written: open_clip must be able to express the text tower
    (module docstring) and tokenize as the run did. Returns the Hugging Face tokenizer to copy, if any."""
    if isinstance(model.text, HFTextEncoder):
        return _hf_tokenizer(model, cfg)
    if not isinstance(model.text, OpenCLIPTextEncoder):
        raise ConfigError(
            f"export open_clip: conditioner.text_encoder={cfg.conditioner.text_encoder!r} has no open_clip "
            "counterpart (open_clip has no bidirectional mean-pooled text transformer); train the contrastive run "
            "with conditioner.text_encoder: open_clip (CLIP's causal text tower; open_clip_model: '' sizes it by "
            "conditioner.text_width/depth/heads) or hf")
    kind, _ = resolved_tokenizer(cfg.conditioner)
    if kind != "open_clip":
        raise ConfigError(f"export open_clip: this run tokenizes captions with {kind!r}; an open_clip text tower "
                          "exports only with open_clip's own BPE tokenizer (conditioner.tokenizer: open_clip)")
    if "siglip" in name.lower():  # open_clip.get_tokenizer(name) would pick its SigLIP tokenizer by the name
        raise ConfigError(f"--name {name!r}: open_clip gives every model whose name contains 'siglip' its SigLIP "
                          "tokenizer, not this run's BPE; choose a name without it")
    return None


def open_clip_config(model: DualEncoder, cfg: Config, out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The open_clip model config and state dict for ``model``, exported to ``out`` (the config
    names files there by absolute path)."""
    vision_cfg = {
        "image_size": model.encoder.image_size,
        "timm_model_name": f"local-dir:{out / 'timm'}", "timm_model_pretrained": False,
        "timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False,
    }
    state = {f"visual.trunk.{k}": v for k, v in timm_state_dict(model.encoder).items()}
    state["visual.head.proj.weight"] = model.head.image_proj.weight.detach().float()
    if isinstance(model.text, OpenCLIPTextEncoder):
        text_cfg, text_state = _open_clip_text(model)
        state.update(text_state)  # the CLIP class keeps its text tower's modules at the top level
    else:
        text_cfg, text_state = _hf_text(model, cfg, out)
        state.update({f"text.{k}": v for k, v in text_state.items()})

    model_cfg: dict[str, Any] = {"embed_dim": cfg.contrastive.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    state["logit_scale"] = model.head.logit_scale.detach().float().reshape(())
    if model.head.logit_bias is not None:
        model_cfg["init_logit_bias"] = float(model.head.logit_bias.item())
        state["logit_bias"] = model.head.logit_bias.detach().float().reshape(())
    return model_cfg, {k: v.contiguous() for k, v in state.items()}


def preprocess_cfg(image_size: int) -> dict[str, Any]:
    """Our evaluation preprocessing in open_clip's terms: bicubic resize, centre crop, ImageNet
    statistics. open_clip resizes the shorter side and then crops, ours crops the central square
    and then resizes it: the same on square images, a sub-pixel shift apart on others."""
    return {"size": image_size, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
            "resize_mode": "shortest"}


def default_name(run_dir: str | Path) -> str:
    """``tcjepa-<run directory>``, with 'siglip' spelled 'sig-lip' (see :func:`check_exportable`)."""
    return "tcjepa-" + re.sub("siglip", "sig-lip", Path(run_dir).resolve().name, flags=re.IGNORECASE)


def export_open_clip(run_dir: str | Path, out_dir: str | Path, name: str = "") -> tuple[Path, str]:
    """Write ``run_dir`` (a finished contrastive run) as an open_clip model directory (module
    docstring). Every check runs before the first file is written. Returns the directory
    (absolute) and the model name of its ``<name>.json``."""
    from safetensors.torch import save_file

    model, cfg = load_dual_encoder(run_dir)
    name = name or default_name(run_dir)
    tokenizer = check_exportable(model, cfg, name)
    out = Path(out_dir).resolve()
    model_cfg, state = open_clip_config(model, cfg, out)
    make_out_dir(out / "timm")
    (out / "timm" / "config.json").write_text(json.dumps(timm_config(model.encoder), indent=2))
    if tokenizer is not None:
        model.text.model.config.save_pretrained(out / "text")
        tokenizer.save_pretrained(out)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "producer": "tcjepa"})
    follow_umask(out / WEIGHTS)
    (out / f"{name}.json").write_text(json.dumps(model_cfg, indent=2))
    pp = preprocess_cfg(model_cfg["vision_cfg"]["image_size"])
    (out / CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp}, indent=2))
    return out, name


def how_to_load(out: Path, name: str) -> str:
    """The open_clip calls that load an export (printed by ``tcjepa export open_clip``)."""
    return (f"open_clip.create_model_and_transforms('local-dir:{out}'), open_clip.get_tokenizer('local-dir:{out}')\n"
            f"or: open_clip.add_model_config('{out / (name + '.json')}')\n"
            f"    open_clip.create_model_and_transforms('{name}', pretrained='{out / WEIGHTS}', "
            f"image_mean={tuple(MEAN)}, image_std={tuple(STD)}), open_clip.get_tokenizer('{name}')")
