"""Our encoder as a Hugging Face ``IJepaModel``, alone or as the vision tower of a LLaVA model.

The architectures agree except in naming and three details, handled here:

- attention: our fused ``qkv`` projection is split into Hugging Face's query/key/value (rows
  ``[0, D)``, ``[D, 2D)``, ``[2D, 3D)``: our heads are laid out inside each third as theirs are);
- layer-norm epsilon: ours is 1e-6 everywhere, ``IJepaConfig``'s default is 1e-12, so the config
  states ours;
- position embeddings: ours are a fixed 2-D sin-cos buffer (never saved), theirs a parameter
  ``[1, N, D]`` over the same row-major patch order with no CLS slot, so the buffer is written
  into it. The final LayerNorm maps onto ``IJepaModel.layernorm``: ``last_hidden_state`` equals
  our encoder's output.

Weights are placed into a model built by the installed ``transformers`` and written with its own
``save_pretrained``, so the directory is in whatever on-disk layout that version reads and writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_pipelines.loader import MEAN, STD
from tcjepa.checkpoint import follow_umask, load_encoder, load_state_exactly
from tcjepa.config import ConfigError
from tcjepa.export import make_out_dir
from tcjepa.models.vit import VisionTransformer

IMAGE_TOKEN = "<image>"

# Per-block parameter names of IJepaModel in transformers 5 (``layers.N``) and 4 (``encoder.layer.N``);
# ours (tcjepa.models.vit.Block) on the left, ``q``/``k``/``v`` split from our fused ``attn.qkv``.
_BLOCK_NAMES: dict[str, dict[str, str]] = {
    "layers.{i}.": {
        "q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "attn.proj": "attention.o_proj",
        "norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    },
    "encoder.layer.{i}.": {
        "q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
        "attn.proj": "attention.output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
    },
}


def ijepa_config(encoder: VisionTransformer) -> Any:
    """The ``IJepaConfig`` describing ``encoder`` exactly (widths, depth, heads, eps, image size)."""
    from transformers import IJepaConfig

    eps = {m.eps for m in encoder.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) != 1:
        raise ValueError(f"IJepaConfig has one layer_norm_eps; this encoder mixes {sorted(eps)}")
    patch = encoder.patch_size
    return IJepaConfig(
        hidden_size=encoder.embed_dim,
        num_hidden_layers=len(encoder.blocks),
        num_attention_heads=encoder.num_heads,
        intermediate_size=encoder.blocks[0].mlp.fc1.out_features,
        hidden_act="gelu",  # nn.GELU(): the exact (erf) form, as Hugging Face's "gelu"
        layer_norm_eps=eps.pop(),
        image_size=encoder.image_size,
        patch_size=patch,
        num_channels=encoder.patch_embed.proj.in_channels,
        qkv_bias=encoder.blocks[0].attn.qkv.bias is not None,
    )


def _block_layout(hf_keys: set[str]) -> tuple[str, dict[str, str]]:
    for prefix, names in _BLOCK_NAMES.items():
        if prefix.format(i=0) + names["q"] + ".weight" in hf_keys:
            return prefix, names
    raise ConfigError("this transformers version names IJepaModel's parameters in a way tcjepa does not know "
                      f"(e.g. {sorted(hf_keys)[:3]}); install transformers 4.45 to 5.x")


def hf_state_dict(encoder: VisionTransformer, hf_keys: set[str]) -> dict[str, torch.Tensor]:
    """Our encoder's weights under IJepaModel's parameter names (``hf_keys``: that model's keys)."""
    prefix, names = _block_layout(hf_keys)
    ours = {k: v.detach().float() for k, v in encoder.state_dict().items()}
    out = {
        "embeddings.patch_embeddings.projection.weight": ours.pop("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias": ours.pop("patch_embed.proj.bias"),
        "embeddings.position_embeddings": encoder.pos_embed.detach().float().clone(),
        "layernorm.weight": ours.pop("norm.weight"),
        "layernorm.bias": ours.pop("norm.bias"),
    }
    for i in range(len(encoder.blocks)):
        p, hf = f"blocks.{i}.", prefix.format(i=i)
        for kind in ("weight", "bias"):
            q, k, v = ours.pop(f"{p}attn.qkv.{kind}").chunk(3, dim=0)
            out.update({f"{hf}{names['q']}.{kind}": q, f"{hf}{names['k']}.{kind}": k, f"{hf}{names['v']}.{kind}": v})
            for mine in ("attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[f"{hf}{names[mine]}.{kind}"] = ours.pop(f"{p}{mine}.{kind}")
    if ours:
        raise ValueError(f"encoder weights with no IJepaModel counterpart: {sorted(ours)[:10]}")
    return {k: v.contiguous() for k, v in out.items()}


def to_hf_model(encoder: VisionTransformer) -> Any:
    """An ``IJepaModel`` (eval mode, fp32) computing what ``encoder`` computes."""
    from transformers import IJepaModel

    config = ijepa_config(encoder)
    with torch.device("meta"):  # no random initialisation of weights that are replaced at once
        model = IJepaModel(config)
    load_state_exactly(model, hf_state_dict(encoder, set(model.state_dict())), "IJepaModel", assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"IJepaModel tensors not set by the export: {left[:10]}")
    return model.eval()


def image_processor(image_size: int) -> Any:
    """Our evaluation preprocessing as a Hugging Face image processor: bicubic to ``image_size``,
    centre crop, scaled to [0, 1] and normalised with the ImageNet statistics our loader uses.
    ``CLIPImageProcessor`` (what LLaVA processors expect) resizes the short side and then crops,
    where our loader crops the central square and then resizes it: the same pixels on square
    images, a sub-pixel shift on others."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": image_size}, resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True, crop_size={"height": image_size, "width": image_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(MEAN), image_std=list(STD),
        do_convert_rgb=True,
    )


def weights_follow_umask(out: Path) -> None:
    """safetensors writes weight files 0600; give them the mode of every other file written."""
    for path in out.rglob("*.safetensors"):
        follow_umask(path)


def export_hf(run_dir: str | Path, out_dir: str | Path, which: str = "auto") -> Path:
    """Write ``run_dir``'s encoder (``which``: auto | teacher | student, as ``load_encoder``) as a
    directory ``transformers.IJepaModel.from_pretrained`` loads: ``config.json``,
    ``model.safetensors`` and ``preprocessor_config.json``. Returns ``out_dir``."""
    encoder = load_encoder(run_dir, which)
    out = make_out_dir(out_dir)
    to_hf_model(encoder).save_pretrained(out)
    image_processor(encoder.image_size).save_pretrained(out)
    weights_follow_umask(out)
    return out


# ----------------------------------------------------------------------------- LLaVA


def _check_language_model_dir(lm_dir: Path) -> None:
    if not (lm_dir / "config.json").is_file():
        raise ConfigError(f"--language-model {lm_dir}: not a local Hugging Face model directory (no config.json)")


def _load_tokenizer(lm_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(lm_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--language-model {lm_dir}: no usable tokenizer there ({str(e).splitlines()[0]}); "
                          "LLaVA needs the language model's tokenizer to place the image tokens") from e


def _load_language_model(lm_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(lm_dir, local_files_only=True, dtype="auto")
    except (OSError, ValueError) as e:
        raise ConfigError(f"--language-model {lm_dir}: cannot load it as a causal language model "
                          f"({str(e).splitlines()[0]})") from e


def _add_image_token(tokenizer: Any, lm: Any) -> int:
    """The id of ``<image>``, added as a special token (and an embedding row) if the tokenizer
    lacks it: LLaVA replaces each of its occurrences by one image feature."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if lm.get_input_embeddings().num_embeddings < len(tokenizer):
        lm.resize_token_embeddings(len(tokenizer))
    return int(token_id)


FEATURE_SELECT = ("full",)  # LLaVA's "default" drops the first token, a CLS our encoder does not have


def check_features(feature_layer: int, feature_select: str, depth: int) -> None:
    """LLaVA indexes the vision tower's hidden states: the patch embeddings, then each block's
    output (depth + 1 states), so -(depth + 1) .. depth are the valid layers."""
    if feature_select not in FEATURE_SELECT:
        raise ConfigError(f"--feature-select {feature_select!r}: our encoder has no class token to drop; use full")
    if not -(depth + 1) <= feature_layer <= depth:
        raise ConfigError(f"--feature-layer {feature_layer}: the encoder has {depth} blocks, so its hidden states "
                          f"are -{depth + 1} .. {depth} (-1: the final output, -2: the block before it)")


def llava_config(vision_config: Any, text_config: Any, image_token_id: int, num_patches: int,
                 feature_layer: int = -1, feature_select: str = "full") -> Any:
    """LLaVA reading every patch token of one of our encoder's hidden states.

    There is no CLS token, so the feature strategy is ``full`` (``default`` drops the first
    token). ``feature_layer=-1`` with ``tie_last_hidden_states`` makes the selected hidden
    state the post-LayerNorm ``last_hidden_state``, i.e. exactly the features our evaluations use
    (transformers < 5 ignores that flag and takes the last block's output before the final norm);
    -2 (LLaVA-1.5's choice for CLIP) is the output of the block before the last, without a norm."""
    from transformers import LlavaConfig

    vision_config.tie_last_hidden_states = True
    return LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
        image_seq_length=num_patches, vision_feature_select_strategy=feature_select, vision_feature_layer=feature_layer,
        projector_hidden_act="gelu", tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )


def build_llava(encoder: VisionTransformer, lm: Any, image_token_id: int, seed: int = 0, feature_layer: int = -1,
                feature_select: str = "full") -> Any:
    """``LlavaForConditionalGeneration`` from our encoder, the language model ``lm`` (its modules
    are moved in, not copied) and a freshly initialised two-layer projector (seeded)."""
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    vision = to_hf_model(encoder)
    config = llava_config(vision.config, lm.config, image_token_id, encoder.num_patches, feature_layer, feature_select)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    if not hasattr(model, "model") or not hasattr(model.model, "vision_tower"):
        raise ConfigError("export llava needs transformers >= 4.52 (LlavaForConditionalGeneration.model.vision_tower)")
    dtype = lm.get_input_embeddings().weight.dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = LlavaMultiModalProjector(config)
    model.model.vision_tower = vision.to(dtype)
    model.model.multi_modal_projector = projector.to(dtype)
    model.model.language_model = getattr(lm, lm.base_model_prefix)
    model.lm_head = lm.get_output_embeddings()
    model.config.text_config = lm.config
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ConfigError(f"LLaVA tensors left unset by the export (an unsupported language model?): {left[:10]}")
    return model.eval()


def export_llava(run_dir: str | Path, out_dir: str | Path, language_model_path: str | Path,
                 which: str = "auto", feature_layer: int = -1, feature_select: str = "full") -> Path:
    """Write a ``LlavaForConditionalGeneration`` (+ ``LlavaProcessor``) whose vision tower is
    ``run_dir``'s encoder and whose language model is the local ``language_model_path``, with a
    fresh projector: the starting point of LLaVA's stage 1 (projector) and stage 2 (instruction)
    training. ``feature_layer`` / ``feature_select``: which hidden state LLaVA feeds its projector
    (:func:`llava_config`). Returns ``out_dir``."""
    from transformers import LlavaProcessor

    lm_dir = Path(language_model_path)
    _check_language_model_dir(lm_dir)
    encoder = load_encoder(run_dir, which)  # the cheap checks first: the language model may take minutes to load
    check_features(feature_layer, feature_select, len(encoder.blocks))
    tokenizer = _load_tokenizer(lm_dir)
    lm = _load_language_model(lm_dir)
    image_token_id = _add_image_token(tokenizer, lm)
    model = build_llava(encoder, lm, image_token_id, feature_layer=feature_layer, feature_select=feature_select)
    processor = LlavaProcessor(
        image_processor=image_processor(encoder.image_size), tokenizer=tokenizer,
        patch_size=encoder.patch_size, vision_feature_select_strategy=feature_select, num_additional_image_tokens=0,
        image_token=IMAGE_TOKEN, chat_template=getattr(tokenizer, "chat_template", None),
    )
    out = make_out_dir(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    weights_follow_umask(out)
    return out
