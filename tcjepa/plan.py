"""Run planner: what a recipe needs per GPU (memory by ZeRO stage), how much compute an image
costs, and how long an epoch takes, before any GPU is rented.

Three parts, each a pure function of the config:

* **Model states** (parameters, gradients, optimiser states) by ZeRO stage, decomposed as
  DeepSpeed's own estimators decompose them (``estimate_zero2_model_states_mem_needs`` and
  ``estimate_zero3_model_states_mem_needs``): with 16-bit weights the planner gives their
  numbers (ZeRO-3: plus the weight partition their formula leaves out; see :func:`model_states`
  and tests/test_plan.py). Our runs keep fp32 weights in the engine and use
  autocast for bf16 (``tcjepa.train.deepspeed_config``), so the planner uses 4-byte weights and
  gradients; the EMA teacher is one more fp32 copy of the encoder on every rank, outside the
  engine, which DeepSpeed's estimators cannot see.
* **Activations**: the bytes autograd saves for backward, counted tensor by tensor for
  ``tcjepa.models`` (encoder over the context tokens, predictor over context + target tokens per
  target block, text tower and conditioner), with token counts from the real mask sampler, with
  and without per-block activation checkpointing. ``measure_activations`` counts the same bytes
  on a real model through saved-tensor hooks; benchmarks/bench_plan_memory.py compares the two.
* **Compute**: matmul FLOPs per image (forward x3 for trained parts, x1 for the teacher and
  frozen towers), and time per step / epoch / run at an assumed model-FLOP utilisation.

The model is built on the ``meta`` device: parameters are counted without allocating them.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tcjepa.config import Config, ConfigError, captions_per_image

GIB = 2**30
H100_BF16_TFLOPS = 989.0  # dense bf16 peak of an H100 SXM
RESERVE = 0.10  # share of GPU memory kept for the CUDA context, allocator fragmentation and NCCL
ADAM_STATE_BYTES = 8  # AdamW's two fp32 moments


# ----------------------------------------------------------------------------- the model, on meta


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
        cond_hidden=int(m.predictor_width * mlp_ratio) if c.variant == "paper" else 0, embedding_params=tables,
    )


# ----------------------------------------------------------------------------- tokens per micro-batch


@dataclass(frozen=True)
class TokenStats:
    """Token counts of one micro-batch of masks (``tcjepa.masks.sample_masks``)."""

    batch: int
    targets: int  # target blocks per image
    full: int  # patches per image (the teacher sees all)
    context: tuple[int, ...]  # real context patches per image
    context_pad: int  # padded context length (the batch maximum)
    target: tuple[tuple[int, ...], ...]  # real patches per target block, per image
    target_pad: int
    padded: bool  # rows differ in length: models run packed with key-padding masks

    @property
    def context_real(self) -> int:
        return sum(self.context)

    @property
    def target_real(self) -> int:
        return sum(map(sum, self.target))

    def attention_layout(self, attention: str = "groups") -> tuple[int, int]:
        """Positions attention runs on in the encoder and in the predictor when rows differ (see
        :func:`attention_mode`): "groups", per length group padded to its longest
        (``tcjepa.models.attention.Packing``); "varlen", the real tokens; "rows", the whole padded rows.
        Unpadded batches run on their rows, whatever the mode."""
        from tcjepa.models.attention import grouped_layout

        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention: {attention!r}, expected one of {ATTENTION_MODES}")
        if not self.padded or attention == "rows":
            return self.batch * self.context_pad, self.batch * self.targets * (self.context_pad + self.target_pad)
        if attention == "varlen":
            return self.context_real, self.targets * self.context_real + self.target_real
        seqs = [c + t for c, row in zip(self.context, self.target) for t in row]
        return grouped_layout(list(self.context))[0], grouped_layout(seqs)[0]


@dataclass(frozen=True)
class MaskCounts:
    """Per-image token counts of one large draw of the run's masks; any micro-batch's
    :class:`TokenStats` are read off a slice of it (:meth:`batch`)."""

    context: tuple[int, ...]  # context patches per image, before any truncation
    target: tuple[tuple[int, ...], ...]
    full: int
    policy: str

    def batch(self, size: int, start: int = 0) -> TokenStats:
        """Counts of the micro-batch of images ``start .. start + size``: padded to its maximum
        ("pad"), or every context truncated to its minimum ("official"), as ``sample_masks`` does."""
        if size < 1 or start < 0 or start + size > len(self.context):
            raise ValueError(f"micro-batch {start}..{start + size} is outside the {len(self.context)} drawn images")
        ctx, tgt = self.context[start:start + size], self.target[start:start + size]
        if self.policy == "official":
            ctx = (min(ctx),) * size
        ctx_pad, tgt_pad = max(ctx), max(map(max, tgt))
        padded = any(n != ctx_pad for n in ctx) or any(n != tgt_pad for row in tgt for n in row)
        return TokenStats(size, len(tgt[0]), self.full, ctx, ctx_pad, tgt, tgt_pad, padded)


def draw_mask_counts(cfg: Config, size: int, seed: int = 0) -> MaskCounts:
    """Draw ``size`` images' masks with the run's mask settings. Padding to the batch maximum
    (or truncation to the minimum) depends on the micro-batch, so the planner reads counts from
    the sampler itself rather than from mean block sizes."""
    import dataclasses

    from tcjepa.masks import sample_block_masks
    from tcjepa.models.vit import parse_encoder_name

    grid = cfg.model.image_size // parse_encoder_name(cfg.model.encoder).patch_size
    targets, context = sample_block_masks(size, (grid, grid), torch.Generator().manual_seed(seed),
                                          **dataclasses.asdict(cfg.mask))
    return MaskCounts(tuple(context.sum(dim=(1, 2)).tolist()), tuple(map(tuple, targets.sum(dim=(2, 3)).tolist())),
                      grid * grid, cfg.mask.policy)


def stats_of_masks(masks: Any, full: int) -> TokenStats:
    """:class:`TokenStats` of a ``MaskBatch``."""
    return TokenStats(
        batch=masks.batch_size, targets=masks.num_targets, full=full,
        context=tuple(masks.num_context().tolist()), context_pad=masks.context_idx.shape[1],
        target=tuple(tuple(r) for r in masks.num_target().tolist()), target_pad=masks.target_idx.shape[2],
        padded=masks.padded,
    )


# ----------------------------------------------------------------------------- activations


ATTENTION_MODES = ("groups", "varlen", "rows")


def attention_mode(cfg: Config, device: str = "cuda") -> str:
    """How a run's padded batches attend (``tcjepa.models.attention.Packing``): whole padded rows when
    compiled, varlen flash attention on the packed tokens where its kernel runs (CUDA, bf16, a
    torch that has it), else length groups."""
    from tcjepa.models.attention import _varlen_kernel

    if cfg.train.compile:
        return "rows"
    if device == "cuda" and cfg.train.precision == "bf16" and _varlen_kernel() is not None:
        return "varlen"
    return "groups"


@dataclass(frozen=True)
class ActBytes:
    """Bytes per element of saved activations. ``low``: matmul inputs and outputs (bf16 under
    autocast). ``wide``: what autocast keeps in fp32 (LayerNorm, softmax) on CUDA; CPU autocast
    runs those in bf16, hence the device."""

    low: int
    wide: int


def act_bytes(precision: str, device: str = "cuda") -> ActBytes:
    """``train.precision`` fp32 or bf16 (autocast) on ``device`` cuda or cpu."""
    if precision == "fp32":
        return ActBytes(4, 4)
    return ActBytes(2, 4 if device == "cuda" else 2)


@dataclass(frozen=True)
class Seqs:
    """Sequences through a tower: ``real`` tokens; ``layout`` positions in the padded layout
    attention runs on (per length group for a tower's blocks, [B, N] for the conditioners);
    ``packed``: per-token layers run on the real tokens only (``tcjepa.models.attention.Packing``);
    ``varlen``: packed, with attention on the packed tokens themselves (varlen flash attention)."""

    real: int
    layout: int
    packed: bool
    varlen: bool = False


def block_bytes(s: Seqs, t: Tower, dt: ActBytes, norm_in: int) -> float:
    """Bytes one ``Block`` saves for backward. Per real token: both LayerNorm inputs (``norm_in``
    bytes: the residual, or its fp32 cast under CUDA autocast) and their statistics, the qkv and
    fc1 inputs, fc1's output (GELU's input) and GELU's output (fc2's input). Per layout position:
    q/k/v, the attention output and its log-sum-exp (flash / memory-efficient SDPA keep no
    attention matrix; unpacked, the output is also the proj input, a view). Packed runs also
    keep the packed qkv output (``index_copy`` saves its source) and the packed proj input."""
    C, H = t.width, t.hidden
    per_real = 2 * C * norm_in + 2 * 2 * 4 + dt.low * (2 * C + 2 * H)
    if s.varlen:  # q/k/v (views of the packed qkv output), the output (the proj input) and the lse
        return s.real * (per_real + dt.low * 4 * C + 4 * t.heads)
    per_layout = dt.low * 4 * C + 4 * t.heads
    if s.packed:
        per_real += dt.low * 4 * C
        per_layout += 4  # the key-padding mask, as a float bias
    return s.real * per_real + s.layout * per_layout


def tower_bytes(s: Seqs, t: Tower, dt: ActBytes, norm_in: int, residual: int, checkpointing: bool) -> float:
    """What a tower's blocks keep until backward. With per-block checkpointing only each block's
    input (the residual stream, ``residual`` bytes) stays; the re-run of one block at a time in
    backward is :func:`block_bytes` on top (``Activations.recompute``)."""
    if checkpointing:
        return t.depth * s.real * t.width * residual
    return t.depth * block_bytes(s, t, dt, norm_in)


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch's training step, by part.

    The parts sum to ``saved``, what autograd holds at the end of the student's forward (what
    :func:`measure_activations` counts). ``recompute``: under checkpointing, the most that
    re-running one block adds at its turn in backward, less what backward freed before it (the
    predictor's last block re-runs after its conditioner and its head are freed, the head being
    about what the block's own backward allocates in gradients; the text tower's and encoder's
    after the whole predictor). ``teacher_peak``: the no-grad teacher forward, which ends before
    the student's begins. ``peak`` was within 4% of torch.profiler's measured peak on CPU
    (benchmarks/bench_plan_memory.py)."""

    encoder: float
    predictor: float
    text: float
    conditioner: float
    targets: float  # the teacher's layer-normed features at the target positions (fp32)
    weight_copies: float  # autocast's bf16 copies of the trained weights, kept for backward
    recompute: float
    teacher_peak: float

    @property
    def saved(self) -> float:
        return self.encoder + self.predictor + self.text + self.conditioner + self.targets + self.weight_copies

    @property
    def peak(self) -> float:
        return max(self.saved + self.recompute, self.teacher_peak)


def _conditioner_bytes(inv: ModelInventory, s: Seqs, batch: int, dt: ActBytes) -> float:
    """One ``TextConditioner`` (top-k sparsity). Per real token: the norm input, the q input and
    (packed) output, out_proj's input and output (the gate multiplies it). Per layout position:
    q before and after its per-head norm. Per query and head: the dense [Q, L] weights (a matmul
    input), the top-k probabilities and their indices. Per text token: the kv input and output,
    k after its norm, and the contiguous copy of v the batched matmul makes."""
    W, L = inv.predictor.width, inv.text.length if inv.text else 0
    per_real = W * (dt.wide + 4 * dt.low) + 2 * 4 * 2
    per_layout = W * (dt.low + dt.wide) + 2 * 4 * inv.cond_heads
    queries = s.layout * inv.cond_heads
    k = min(inv.top_k, L)
    if inv.sparsity == "topk":
        per_query = L * dt.low + k * (dt.wide + 8)
    else:  # softmax / sparsemax keep dense [Q, L] tensors (an estimate: not measured)
        per_query = L * (dt.low + 2 * dt.wide)
    text = batch * L * (W * (4 * dt.low + dt.wide) + 2 * 4 * inv.cond_heads)
    return s.real * per_real + s.layout * per_layout + queries * per_query + text


def _caption_conditioner_bytes(inv: ModelInventory, s: Seqs, batch: int, dt: ActBytes) -> float:
    """One ``CaptionCrossAttention`` (the paper variant) over N captions, counted tensor by tensor
    from what autograd saves (``low``: matmul inputs and outputs; ``wide``: the residual stream).
    Per layout position (it works on the unpacked [B * T, N] rows): the norm's input, output and
    statistics, the pooled maximum, the pooled state with its norm statistics, fc1's input and
    output, fc2's input, and for the overlaps q in fp32 with its norm and the normalised copy.
    Per (caption, position): fused attention's query copy, output and log-sum-exp, the pooling's
    input, the rectified cosines and the regularisers' deviation from the layer mean (fp32). Per caption word: the additive mask, k and v for the attention, k's norm and
    normalised copy, and under bf16 the fp32 copy of k and the cast of the text features that
    W_K and W_V share. Packed: the packed input too. (Equal, to the byte but for a few boolean
    masks, to what one layer saves in fp32 and in CPU bf16.)"""
    W, L, N, H = inv.predictor.width, inv.text.length if inv.text else 0, inv.captions, inv.cond_heads
    hidden = inv.cond_hidden or 4 * W
    low, wide = dt.low, dt.wide
    per_position = 2 * W * wide + 2 * 8 + 3 * W * low + 2 * hidden * low + 2 * W * 4 + 2 * H * 4
    per_caption_position = 3 * W * low + H * 4 + 2 * L * 4
    if N == 1 and low == 4:  # one caption: attention reads q itself, the same storage the overlaps keep
        per_caption_position -= W * low
    per_word = low + 2 * W * low + 2 * H * 4 + W * 4 + 1 + (W * 4 + W * low if low < 4 else 0)
    packed = s.real * W * wide if s.packed else 0  # the packed input, kept by the unpack
    return s.layout * (per_position + N * per_caption_position) + batch * N * L * per_word + packed


def activation_memory(inv: ModelInventory, tok: TokenStats, precision: str, checkpointing: bool = False,
                      device: str = "cuda", attention: str = "groups") -> Activations:
    """Analytic activation bytes of one training step on a micro-batch with token counts ``tok``.

    The terms follow the code in ``tcjepa.models`` and ``tcjepa.methods.jepa`` (see
    :func:`block_bytes`). Under bf16 autocast on CUDA the encoder's residual stream is bf16 (the
    patch embedding's output) and its blocks' norms keep it bf16 (``tcjepa.models.vit.LayerNorm``);
    the predictor's is fp32 (it starts from the encoder's fp32 final LayerNorm output), so its
    blocks' norms run in fp32 as autocast's do; the text tower's is fp32 (embeddings).
    Checkpointing is per transformer block; conditioners and each tower's ends are not.
    ``attention``: how padded batches attend (:func:`attention_mode`)."""
    dt = act_bytes(precision, device)
    B, T = tok.batch, tok.targets
    e, p = inv.encoder, inv.predictor
    D, Dout, W = e.width, inv.out_dim, p.width
    # encoder over the context: conv input, the gathered patch tokens, gather/pack indices, blocks,
    # final norm input and (packed) output, the unpacked features (predictor_embed's input)
    ctx_layout, pred_layout = tok.attention_layout(attention)
    varlen = tok.padded and attention == "varlen"
    ctx = Seqs(tok.context_real, ctx_layout, tok.padded, varlen)
    enc = B * 3 * inv.image_size**2 * dt.low + B * tok.full * D * dt.low + B * tok.context_pad * 8
    enc += tower_bytes(ctx, e, dt, dt.low, dt.low, checkpointing)
    enc += ctx.real * D * dt.wide * (2 if ctx.packed else 1) + ctx.real * 8 * ctx.packed
    enc += B * tok.context_pad * D * dt.low
    # predictor: one sequence per target block, context + that block's mask tokens
    layout = B * T * (tok.context_pad + tok.target_pad)  # the [B * T, N] layout (conditioners, head)
    seq = Seqs(T * tok.context_real + tok.target_real, pred_layout, tok.padded, varlen)
    pred = B * T * tok.target_pad * 8 + seq.real * 8 * seq.packed
    pred += tower_bytes(seq, p, dt, dt.wide, dt.wide, checkpointing)
    head = seq.real * W * dt.wide * seq.packed  # packed output, before the unpack
    head += (layout if seq.packed else seq.real) * W * dt.wide  # the norm's input is a slice of whole rows
    n_pred = B * T * tok.target_pad
    head += n_pred * (W * dt.low + 2 * 4 + Dout * 4 + 4)  # proj input, norm statistics, fp32 prediction, loss mask
    pred += head
    text = cond = one_cond = 0.0
    text_block = None
    if inv.text is not None:
        tt, L = inv.text.tower, inv.text.length
        BN = B * inv.captions  # every caption of every image through the text tower
        tseq = Seqs(BN * L, BN * L, False)  # full-length captions: nothing to pack
        if inv.text.trained:
            text += BN * L * 8 + tower_bytes(tseq, tt, dt, 4, 4, checkpointing) + BN * L * tt.width * 4
            text_block = block_bytes(tseq, tt, dt, 4)
        text += BN * L * tt.width * dt.low + BN * L * W * 4  # TextTower proj input, norm input
        if inv.variant == "paper" and dt.low == 4:  # fp32: every layer's W_K and W_V keep the same features
            text += BN * L * W * 4
        conditioner_bytes = _caption_conditioner_bytes if inv.variant == "paper" else _conditioner_bytes
        one_cond = conditioner_bytes(inv, Seqs(seq.real, layout, seq.packed), B, dt)
        cond = inv.cond_layers * one_cond
    targets = B * T * tok.target_pad * Dout * 4
    recompute = 0.0
    if checkpointing:  # what each tower's first re-run block adds, less what backward freed before it
        turns = [block_bytes(seq, p, dt, dt.wide) - one_cond,
                 block_bytes(ctx, e, dt, dt.low) - pred - cond - text - targets]
        if text_block is not None:
            turns.append(text_block - pred - cond)
        recompute = max(0.0, *turns)
    # checkpointed blocks run their forward without keeping anything, autocast's weight casts included
    # embedding tables are looked up, not cast: autocast keeps no bf16 copy of them
    copies = 2.0 * (inv.trainable - inv.embedding_params) if precision == "bf16" and not checkpointing else 0.0
    te = inv.teacher  # an upper bound: the MLP's live tensors plus the fp32 output and its LayerNorm
    teacher_peak = B * tok.full * (te.width * (dt.low + 2 * 4) + 2 * te.hidden * dt.low) + targets
    return Activations(enc, pred, text, cond, targets, copies, recompute, teacher_peak)


# ----------------------------------------------------------------------------- compute


def tower_flops(lengths: list[int] | tuple[int, ...], t: Tower) -> float:
    """Forward matmul FLOPs of a tower over sequences of these lengths: 2 x (qkv, proj, fc1, fc2)
    per token plus QK^T and AV over each sequence (2 x 2 x n^2 x width)."""
    per_token = 2 * (4 * t.width * t.width + 2 * t.width * t.hidden)
    return t.depth * sum(n * per_token + 4 * n * n * t.width for n in lengths)


@dataclass(frozen=True)
class Flops:
    """Model FLOPs per image: forward of each part, and a training step's total (x3 for the
    trained parts' forward and backward, x1 for the teacher and frozen towers)."""

    encoder: float
    predictor: float
    text: float  # the text encoder (frozen or trained)
    conditioner: float  # the text projection and the cross-attention layers (always trained)
    teacher: float
    text_trained: bool

    @property
    def train(self) -> float:
        text = self.text * (3 if self.text_trained else 1)
        return 3 * (self.encoder + self.predictor + self.conditioner) + text + self.teacher


def model_flops(inv: ModelInventory, tok: TokenStats) -> Flops:
    """Analytic matmul FLOPs per image (real tokens only: padding is overhead, not model work)."""
    e, p, B = inv.encoder, inv.predictor, tok.batch
    embed = 2 * tok.full * 3 * inv.patch**2 * e.width  # patch embedding runs on the whole image
    enc = embed + tower_flops(tok.context, e) / B
    seqs = [nc + nt for nc, row in zip(tok.context, tok.target) for nt in row]
    pred = (2 * tok.context_real * e.width * p.width + tower_flops(seqs, p)
            + 2 * tok.target_real * p.width * inv.out_dim) / B
    teacher = embed * inv.teacher.width / e.width + tower_flops([tok.full], inv.teacher)
    text = cond = 0.0
    if inv.text is not None:
        tt, L, W, N = inv.text.tower, inv.text.length, p.width, inv.captions
        text = N * tower_flops([L], tt)
        q = sum(seqs) / B  # predictor tokens per image: the conditioners' queries
        if inv.variant == "paper":  # q and the MLP once; k, v, scores, AV and cosines per caption;
            hidden = inv.cond_hidden or 4 * W  # the logged attention entropy re-scores the first caption
            per_layer = (2 * q * W * W + 2 * q * 2 * W * hidden + 2 * q * L * W
                         + N * (2 * L * W * 2 * W + 3 * 2 * q * L * W))
        else:
            per_layer = 2 * q * W * W * 2 + 2 * L * W * 2 * W + 4 * q * L * W
        cond = N * 2 * L * tt.width * W + inv.cond_layers * per_layer
    trained = inv.text.trained if inv.text else False
    return Flops(enc, pred, text, cond, teacher, trained)


def mean_flops(inv: ModelInventory, draws: list[MaskCounts], micro: int) -> Flops:
    """:func:`model_flops` averaged over every micro-batch of the draws: per-image FLOPs should not
    depend on which few images the recipe's micro-batch happens to hold."""
    parts = [model_flops(inv, d.batch(micro, i)) for d in draws for i in range(0, len(d.context) - micro + 1, micro)]
    keys = ("encoder", "predictor", "text", "conditioner", "teacher")
    return Flops(*(sum(getattr(f, k) for f in parts) / len(parts) for k in keys), text_trained=parts[0].text_trained)


# ----------------------------------------------------------------------------- model states


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of each model state, as DeepSpeed's estimators decompose them:
    the working weights and gradients (16-bit in their formula, fp32 in our runs), an fp32
    gradient partition, the fp32 master partition (cloned even from fp32 weights) and Adam's moments."""

    weight: int
    grad: int
    grad32: int = 4
    master: int = 4
    optim: int = ADAM_STATE_BYTES


DEEPSPEED_ASSUMED = StateBytes(weight=2, grad=2)  # the mixed-precision setup their estimators assume
FP32_MASTER = StateBytes(weight=4, grad=4)  # ours: fp32 weights in the engine, autocast for bf16


@dataclass(frozen=True)
class ModelStates:
    """Per-GPU bytes. ``params``: working weights (incl. a frozen text encoder; at ZeRO-3 the
    gathered largest layer); ``grads``: gradients and their fp32 partition; ``optimizer``: fp32
    master partition and Adam moments; ``teacher``: the fp32 EMA/frozen target encoder (outside
    the engine, on every rank); ``buffers``: DeepSpeed's gradient reduction buckets."""

    params: float
    grads: float
    optimizer: float
    teacher: float
    buffers: float

    @property
    def engine(self) -> float:
        """What DeepSpeed's estimators count."""
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.engine + self.teacher + self.buffers


# DeepSpeed's defaults for the ZeRO keys the planner reads (``DeepSpeedZeroConfig``; a test keeps
# them in step). Kept here so that planning does not import DeepSpeed, which prints an accelerator
# warning on stdout on machines without a GPU.
ZERO_DEFAULTS: dict[str, Any] = {"reduce_bucket_size": 500_000_000, "contiguous_gradients": True, "overlap_comm": None}


def zero_settings(cfg: Config) -> dict[str, Any]:
    """The run's ``zero_optimization`` keys the planner needs, DeepSpeed's defaults filled in
    (``overlap_comm`` defaults to on at stage 3 only, as in DeepSpeed)."""
    section = {**ZERO_DEFAULTS, **cfg.deepspeed.config.get("zero_optimization", {})}
    out: dict[str, Any] = {}
    for key, kind in (("reduce_bucket_size", int), ("contiguous_gradients", bool), ("overlap_comm", bool)):
        value = section[key]
        if key == "overlap_comm" and value is None:
            value = cfg.deepspeed.zero_stage == 3
        if key == "reduce_bucket_size" and isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON's 5e7
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
            raise ConfigError(f"deepspeed.config.zero_optimization.{key}: expected "
                              f"{'a positive integer' if kind is int else 'true or false'}, got {value!r}")
        out[key] = value
    return out


def model_states(inv: ModelInventory, stage: int, world: int, sb: StateBytes = FP32_MASTER,
                 zero: dict[str, Any] | None = None) -> ModelStates:
    """Model-state bytes per GPU at ZeRO ``stage`` over ``world`` ranks.

    Stage 0 is plain data parallelism: the optimiser steps the working weights (no master copy,
    no gradient copy). Stage 1 partitions the optimiser states (master + moments) and the fp32
    gradient copy, stage 2 also the working gradients, stage 3 also the weights, plus the largest
    layer gathered (weights and gradient) at a time.

    With ``DEEPSPEED_ASSUMED`` bytes, stage 2 equals DeepSpeed's
    ``estimate_zero2_model_states_mem_needs`` without offload (2 P + 18 P / N) exactly. Stage 3
    equals ``estimate_zero3_model_states_mem_needs`` (4 L + 18 P / N) plus the partition of the
    16-bit weights, 2 P / N: their formula reuses the ZeRO-2 18 bytes, which leave the weights out
    (ZeRO-2 counts them replicated), yet stage 3 keeps each rank's weight partition
    (``param.ds_tensor``) next to the gradient partitions and fp32 copies they do count."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    P, F, N = inv.trainable, inv.frozen, world
    teacher = 4.0 * inv.teacher_params
    if stage == 0:
        params, grads, optim = (P + F) * sb.weight, P * sb.grad, P * sb.optim
    else:
        shard = P / N
        optim = shard * (sb.master + sb.optim)
        params = (P + F) * sb.weight if stage < 3 else (P + F) / N * sb.weight + inv.largest_layer * sb.weight
        grads = (P * sb.grad if stage == 1 else shard * sb.grad) + shard * sb.grad32
        if stage == 3:
            grads += inv.largest_layer * sb.grad
    buffers = 0.0  # stage 0 flattens its all-reduce buckets after backward, when the activations are gone
    if zero is not None:  # allocated at full size whatever the model and world size
        if stage in (1, 2) and zero["contiguous_gradients"]:
            buffers = zero["reduce_bucket_size"] * sb.grad * (2 if zero["overlap_comm"] else 1)
        elif stage == 3:
            buffers = zero["reduce_bucket_size"] * sb.grad
    return ModelStates(params, grads, optim, teacher, buffers)


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class StagePlan:
    stage: int
    states: ModelStates
    activations: Activations  # at the recipe's micro-batch, no checkpointing
    activations_ckpt: Activations  # ... with per-block activation checkpointing
    max_micro: int  # largest micro-batch that fits (0: none)
    max_micro_ckpt: int

    @property
    def total(self) -> float:
        return self.states.total + self.activations.peak

    @property
    def total_ckpt(self) -> float:
        return self.states.total + self.activations_ckpt.peak


@dataclass(frozen=True)
class Plan:
    recipe: str
    gpus: int  # per node
    nodes: int
    gpu_memory: float  # bytes
    usable: float  # bytes available for the run after RESERVE
    global_batch: int
    micro_batch: int
    precision: str
    inventory: ModelInventory
    tokens: TokenStats
    flops: Flops
    stages: tuple[StagePlan, ...]
    samples: int | None
    steps: int
    mfu: float
    gpu_tflops: float
    configured_stage: int
    checkpointing: bool  # the recipe's model.activation_checkpointing
    min_gpus: int | None  # fewest GPUs (dividing the global batch) at which some stage fits; None: none does

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    @property
    def step_seconds(self) -> float:
        return self.global_batch * self.flops.train / (self.world * self.gpu_tflops * 1e12 * self.mfu)

    @property
    def epoch_seconds(self) -> float | None:
        return None if self.samples is None else self.samples / self.global_batch * self.step_seconds

    @property
    def run_seconds(self) -> float:
        return self.steps * self.step_seconds

    def fitting(self, checkpointing: bool = False) -> list[int]:
        """Stages whose recipe micro-batch fits."""
        return [s.stage for s in self.stages if (s.total_ckpt if checkpointing else s.total) <= self.usable]


def _largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """Largest m in [1, limit] with ``fits(m)`` (assumed monotone), 0 if none."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


MICRO_LIMIT = 4096  # the micro-batch search stops here
# Independent mask draws the plan takes the worst micro-batch of: a run's peak memory is its
# largest step's, and under mask.policy=official the sizes are drawn once per batch, so one
# draw's activations can be 13 % under the largest of 20 steps' (ViT-B/16, batch 256). The worst
# of 8 is a high percentile of the steps, not a bound (at ViT-H/14, batch 256, 2-9 % of draws
# exceed it, by up to 6 %); the 10 % of the GPU the plan keeps back covers that.
MASK_DRAWS = 8


def plan_run(cfg: Config, gpus: int = 1, nodes: int = 1, gpu_memory_gb: float = 80.0, samples: int | None = None,
             mfu: float = 0.4, gpu_tflops: float = H100_BF16_TFLOPS, recipe: str = "", reserve: float = RESERVE) -> Plan:
    """Plan ``cfg`` on ``nodes`` x ``gpus`` GPUs of ``gpu_memory_gb`` GiB each. Raises
    ConfigError for impossible inputs (the CLI turns it into ``error: ...``)."""
    for name, value, ok, want in (("--gpus", gpus, gpus >= 1, ">= 1"), ("--nodes", nodes, nodes >= 1, ">= 1"),
                                  ("--gpu-memory", gpu_memory_gb, gpu_memory_gb > 0, "> 0 (GiB)"),
                                  ("--mfu", mfu, 0 < mfu <= 1, "in (0, 1], e.g. 0.4"),
                                  ("--gpu-tflops", gpu_tflops, gpu_tflops > 0, "> 0"),
                                  ("--samples", samples, samples is None or samples >= 1, ">= 1")):
        if not ok:
            raise ConfigError(f"{name} must be {want}, got {value}")
    world = gpus * nodes
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size {cfg.train.batch_size} is not divisible by {world} GPUs "
                          f"({nodes} nodes x {gpus}); tcjepa train splits the global batch evenly over ranks")
    inv = inventory(cfg)
    zero = zero_settings(cfg)
    usable = gpu_memory_gb * GIB * (1 - reserve)
    micro = cfg.train.batch_size // world
    draws = [draw_mask_counts(cfg, max(MICRO_LIMIT, cfg.train.batch_size), seed) for seed in range(MASK_DRAWS)]

    @functools.lru_cache(maxsize=None)  # every stage's search asks for the same micro-batches
    def worst(m: int, ckpt: bool) -> tuple[Activations, TokenStats]:
        return worst_activations(cfg, inv, draws, m, ckpt)

    def acts(m: int, ckpt: bool) -> Activations:
        return worst(m, ckpt)[0]

    stages = []
    for stage in (0, 1, 2, 3):
        st = model_states(inv, stage, world, FP32_MASTER, zero)
        best = [_largest_fitting(lambda m, c=c: st.total + acts(m, c).peak <= usable, MICRO_LIMIT) for c in (False, True)]
        stages.append(StagePlan(stage, st, acts(micro, False), acts(micro, True), best[0], best[1]))
    tok = worst(micro, False)[1]
    flops = mean_flops(inv, draws, micro)
    return Plan(
        recipe=recipe, gpus=gpus, nodes=nodes, gpu_memory=gpu_memory_gb * GIB, usable=usable,
        global_batch=cfg.train.batch_size, micro_batch=micro, precision=cfg.train.precision, inventory=inv,
        tokens=tok, flops=flops, stages=tuple(stages), samples=samples,
        steps=cfg.train.steps, mfu=mfu, gpu_tflops=gpu_tflops, configured_stage=cfg.deepspeed.zero_stage,
        checkpointing=cfg.model.activation_checkpointing, min_gpus=_min_gpus(cfg, inv, zero, usable, acts),
    )


def worst_activations(cfg: Config, inv: ModelInventory, draws: list[MaskCounts], micro: int,
                      checkpointing: bool) -> tuple[Activations, TokenStats]:
    """The activations (and token counts) of the micro-batch, among the first ``micro`` images of
    each draw, with the highest peak."""
    plans = [(activation_memory(inv, tok, cfg.train.precision, checkpointing, attention=attention_mode(cfg)), tok)
             for tok in (d.batch(micro) for d in draws)]
    return max(plans, key=lambda p: p[0].peak)


def _min_gpus(cfg: Config, inv: ModelInventory, zero: dict[str, Any], usable: float,
              acts: Callable[[int, bool], Activations]) -> int | None:
    """Fewest GPUs, among divisors of the global batch, at which some stage fits the recipe as it
    is (with or without its activation checkpointing; more GPUs: smaller micro-batches and partitions)."""
    batch, ckpt = cfg.train.batch_size, cfg.model.activation_checkpointing
    for world in (w for w in range(1, batch + 1) if batch % w == 0):
        act = acts(batch // world, ckpt).peak
        if any(model_states(inv, s, world, FP32_MASTER, zero).total + act <= usable for s in (0, 1, 2, 3)):
            return world
    return None


# ----------------------------------------------------------------------------- text


def _gib(x: float) -> str:
    return f"{x / GIB:7.2f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def format_plan(plan: Plan) -> str:
    """The plan as the text ``tcjepa plan`` prints."""
    inv, tok, f = plan.inventory, plan.tokens, plan.flops
    lines = [
        f"plan: {plan.recipe or 'config'} on {plan.nodes} node(s) x {plan.gpus} GPU(s) = {plan.world}, "
        f"{plan.gpu_memory / GIB:g} GiB each ({plan.usable / GIB:.1f} GiB usable: {1 - plan.usable / plan.gpu_memory:.0%} "
        "kept for the CUDA context, fragmentation and NCCL)",
        f"parameters: encoder {_count(inv.encoder_params)}, predictor {_count(inv.predictor_params)}"
        + (f", text {_count(inv.text_params)} ({'trained' if inv.text.trained else 'frozen'})" if inv.text else "")
        + f"; {_count(inv.trainable)} trained; teacher {_count(inv.teacher_params)} (fp32, outside the engine)",
        f"batch: global {plan.global_batch}, micro {plan.micro_batch} per GPU; precision {plan.precision} "
        f"(fp32 weights and AdamW states, {'bf16 autocast' if plan.precision == 'bf16' else 'fp32'} activations)",
        f"tokens per image: {tok.full} patches, context {tok.context_real / tok.batch:.1f} (padded to "
        f"{tok.context_pad}), {tok.targets} target blocks of {tok.target_real / tok.batch / tok.targets:.1f} "
        f"(padded to {tok.target_pad})",
        "",
        "memory per GPU (GiB)      ZeRO-0   ZeRO-1   ZeRO-2   ZeRO-3",
    ]

    def row(name: str, get: Callable[[StagePlan], float]) -> None:
        lines.append(f"  {name:<22}" + " ".join(f"{_gib(get(s)):>8}" for s in plan.stages))

    row("parameters", lambda s: s.states.params)
    row("gradients", lambda s: s.states.grads)
    row("optimiser states", lambda s: s.states.optimizer)
    row("teacher (fp32)", lambda s: s.states.teacher)
    row("reduce buckets", lambda s: s.states.buffers)
    row("activations", lambda s: s.activations.peak)
    row("  with checkpointing", lambda s: s.activations_ckpt.peak)
    row("total", lambda s: s.total)
    row("  with checkpointing", lambda s: s.total_ckpt)
    lines.append("  fits micro-batch " + f"{plan.micro_batch:<5}" + "".join(
        f"{('yes' if s.total <= plan.usable else 'no'):>9}" for s in plan.stages))
    def most(m: int) -> str:
        return f"{('>=' if m >= MICRO_LIMIT else '') + str(m):>8}"

    lines.append("  largest micro-batch   " + " ".join(most(s.max_micro) for s in plan.stages))
    lines.append("    with checkpointing  " + " ".join(most(s.max_micro_ckpt) for s in plan.stages))
    a = plan.stages[0].activations
    lines += [
        f"  activations at micro-batch {plan.micro_batch}: encoder {a.encoder / GIB:.2f}, predictor "
        f"{a.predictor / GIB:.2f}, text {a.text / GIB:.2f}, conditioner {a.conditioner / GIB:.2f}, targets "
        f"{a.targets / GIB:.2f}, bf16 weight copies {a.weight_copies / GIB:.2f} GiB",
        "",
        f"compute per image: {f.train / 1e9:.1f} GFLOP per training step (encoder {f.encoder / 1e9:.1f}, predictor "
        f"{f.predictor / 1e9:.1f}, text {f.text / 1e9:.1f}, conditioner {f.conditioner / 1e9:.1f} forward x3; "
        f"teacher {f.teacher / 1e9:.1f} forward x1)",
        f"time at {plan.mfu:.0%} MFU of {plan.gpu_tflops:g} TFLOP/s per GPU: {_duration(plan.step_seconds)} per step, "
        + (f"{_duration(plan.epoch_seconds)} per epoch of {plan.samples:,} images, "
           if plan.epoch_seconds is not None else "pass --samples N for the time per epoch, ")
        + f"{_duration(plan.run_seconds)} for the recipe's {plan.steps:,} steps "
          f"({plan.steps * plan.global_batch * f.train / 1e21:.2f} ZFLOP)",
        "",
        _verdict(plan),
    ]
    if plan.precision == "fp32":
        lines.append("note: an fp32 recipe; pass --gpu-tflops with your card's fp32/TF32 peak (the default is bf16)")
    return "\n".join(lines)


def _verdict(plan: Plan) -> str:
    """Whether the recipe fits as configured (its activation checkpointing included), and what to
    change if not."""
    ckpt = plan.checkpointing
    fits, fits_ckpt = plan.fitting(ckpt), plan.fitting(True)
    c, m = plan.configured_stage, plan.micro_batch
    if c in fits:
        total = (plan.stages[c].total_ckpt if ckpt else plan.stages[c].total) / GIB
        return (f"fits: the recipe's ZeRO-{c} with micro-batch {m} ({total:.1f} of {plan.usable / GIB:.1f} GiB); "
                f"stages that fit: {', '.join(map(str, fits))}")
    if fits:
        best = fits[0]  # stages 0-2 move the bytes of plain data parallelism; ZeRO-3 adds parameter all-gathers
        return (f"the recipe's ZeRO-{c} does not fit micro-batch {m}; use --set deepspeed.zero_stage={best} "
                f"(stages that fit: {', '.join(map(str, fits))})")
    text = f"does not fit: micro-batch {m} needs more than {plan.usable / GIB:.1f} GiB at every ZeRO stage"
    if fits_ckpt and not ckpt:
        text += (f"; with activation checkpointing ZeRO-{fits_ckpt[0]} would fit "
                 "(--set model.activation_checkpointing=true)")
    if plan.min_gpus is not None:
        text += (f"; {'with' if ckpt else 'without'} checkpointing it fits from {plan.min_gpus} GPUs (micro-batch "
                 f"{plan.global_batch // plan.min_gpus})")
    else:
        text += "; no GPU count fits even one image per GPU: use a larger card"
    return text


# ----------------------------------------------------------------------------- measurement


def saved_tensor_bytes(fn: Callable[[], Any], exclude: list[torch.Tensor] | tuple[()] = ()) -> tuple[Any, int]:
    """Run ``fn`` and count the bytes autograd saves for backward: the unique storages of every
    saved tensor (views of one storage count once, as in memory), minus those of ``exclude``
    (parameters and buffers: model states, not activations). Returns ``(fn(), bytes)``. Storages
    are told apart by their C++ object, not their address: fake tensors have none."""
    skip = {t.untyped_storage()._cdata for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in skip:
            storages[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Wrap every transformer ``Block`` of ``model`` in (reentrant) activation checkpointing, in
    place: what the planner's "with checkpointing" column assumes. Reentrant checkpointing
    saves each block's input through ``save_for_backward``, so saved-tensor hooks see it."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    from tcjepa.models.vit import Block

    for m in model.modules():
        if isinstance(m, Block):
            m.forward = partial(checkpoint, m.forward, use_reentrant=True)
    return model


@dataclass
class StepProbe:
    """A real student (CPU) and one micro-batch of random images, masks and full-length captions,
    for measuring what a training step keeps in memory."""

    method: Any  # tcjepa.methods.jepa.JEPA
    images: torch.Tensor
    masks: Any  # MaskBatch
    tokens: Any  # Tokens or None

    def run(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher targets and the student's forward and loss, as the training loop runs them
        (``JEPA.loss`` with the plain module as the engine); returns the loss."""
        loss, _ = self.method.loss(self.method.model, self.images if images is None else images, self.masks, self.tokens)
        return loss

    def model_tensors(self) -> list[torch.Tensor]:
        """Parameters and buffers of student and teacher: model states, not activations."""
        mods = (self.method.model, self.method.teacher)
        return [t for m in mods for t in (*m.parameters(), *m.buffers())]

    @property
    def token_stats(self) -> TokenStats:
        return stats_of_masks(self.masks, self.method.model.encoder.num_patches)


def probe_step(cfg: Config, batch: int, seed: int = 0, checkpointing: bool = False) -> StepProbe:
    """A :class:`StepProbe` for ``cfg`` (``train.precision`` picks fp32 or bf16 autocast); masks,
    images and caption ids are drawn from ``seed``; ``checkpointing`` wraps every block first."""
    import dataclasses

    from data_pipelines.tokenizers import Tokens
    from tcjepa.masks import sample_masks
    from tcjepa.methods.jepa import JEPA

    torch.manual_seed(seed)
    method = JEPA(cfg)
    method.model.train()
    if checkpointing:
        checkpoint_blocks(method.model)
    gen = torch.Generator().manual_seed(seed)
    masks = sample_masks(batch, method.model.encoder.grid, gen, **dataclasses.asdict(cfg.mask))
    images = torch.randn(batch, 3, cfg.model.image_size, cfg.model.image_size, generator=gen)
    tokens = None
    if method.tokenizer is not None:  # full-length captions, as the estimate assumes
        L = cfg.conditioner.context_length
        shape = (batch, L) if captions_per_image(cfg.conditioner) <= 1 else (batch, cfg.conditioner.max_captions, L)
        ids = torch.randint(1, method.tokenizer.vocab_size, shape, generator=gen)
        tokens = Tokens(ids, torch.ones(shape, dtype=torch.bool), torch.ones(shape[:-1], dtype=torch.bool))
    return StepProbe(method, images, masks, tokens)


def measure_activations(cfg: Config, batch: int, seed: int = 0, checkpointing: bool = False) -> tuple[int, TokenStats]:
    """Saved-tensor bytes of one real training step's forward on CPU (see :func:`probe_step`),
    and the token counts of its masks, for :func:`estimate_for_masks`."""
    probe = probe_step(cfg, batch, seed, checkpointing)
    _, nbytes = saved_tensor_bytes(probe.run, probe.model_tensors())
    return nbytes, probe.token_stats


def estimate_for_masks(cfg: Config, tok: TokenStats, checkpointing: bool = False, device: str = "cpu",
                       attention: str = "groups") -> Activations:
    """The analytic estimate for exactly these token counts (what :func:`measure_activations` saw;
    compare its ``saved``)."""
    return activation_memory(inventory(cfg), tok, cfg.train.precision, checkpointing, device, attention)


class _FlashSaves(torch.autograd.Function):
    """Keeps for backward what flash attention keeps (q, k, v, the output and the fp32 log-sum-exp)
    and returns an output of the right shape; forward-only, for measuring on fake tensors."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> None:
        raise RuntimeError("_FlashSaves only measures what a forward keeps")


def measure_activations_cuda_bf16(probe: StepProbe) -> int:
    """:func:`measure_activations` as on a GPU under bf16 autocast, without one: the probe's step
    runs on fake CUDA tensors (shapes and dtypes, no data) with CUDA autocast switched on by hand,
    so its dtype rules (fp32 LayerNorm and softmax, bf16 matmuls) decide what is saved. Attention
    keeps what flash attention keeps (fake tensors cannot pick a fused kernel). Unpadded masks only
    (``mask.policy: official``; packing reads the lengths) and no captions (their key masks).
    Consumes the probe: its modules are left on fake CUDA storage."""
    from unittest import mock

    from torch._subclasses.fake_tensor import FakeTensorMode

    from tcjepa.models import vit

    if probe.masks.padded or probe.tokens is not None:
        raise ConfigError("measure_activations_cuda_bf16 needs unpadded masks (mask.policy=official) and no captions")

    def flash_saves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        return _FlashSaves.apply(q, k, v)

    masks = probe.masks
    with FakeTensorMode(allow_non_fake_inputs=True), mock.patch.object(vit, "attention", flash_saves), \
            mock.patch.object(probe.method, "_autocast", lambda _device: simulated_cuda_autocast()), warnings_off():
        probe.method.model.to_empty(device="cuda")
        probe.method.teacher.to_empty(device="cuda")
        try:
            probe.masks = masks.to("cuda")
            _, nbytes = saved_tensor_bytes(lambda: probe.run(probe.images.to("cuda")), probe.model_tensors())
        finally:
            probe.masks = masks
    return nbytes


@contextlib.contextmanager
def simulated_cuda_autocast(dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """CUDA autocast switched on by hand, for fake CUDA tensors on a machine without a GPU
    (``torch.autocast("cuda")`` turns itself off there)."""
    before = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_dtype("cuda", dtype)
    torch.set_autocast_enabled("cuda", True)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", before[0])
        torch.set_autocast_dtype("cuda", before[1])
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()


@contextlib.contextmanager
def warnings_off() -> Iterator[None]:
    """Silence torch's "CUDA is not available ... Disabling autocast" while on fake CUDA tensors."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*", category=UserWarning)
        yield
