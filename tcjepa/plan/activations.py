"""Activation memory: the bytes autograd saves for backward in one training step, counted tensor
by tensor for ``tcjepa.models``, with and without per-block activation checkpointing
(:func:`activation_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tcjepa.plan.model import ModelInventory, Tower
from tcjepa.plan.tokens import TokenStats


@dataclass(frozen=True)
class ActBytes:
    """Bytes per element of saved activations. ``low``: matmul inputs and outputs (bf16 under
    autocast). ``wide``: what autocast keeps in fp32 (LayerNorm, softmax) on CUDA; CPU autocast
    runs those in bf16, hence the device."""

    low: int
    wide: int
    matrix_attention: bool = False  # attention keeps its probabilities (cpu_half_attention)


def act_bytes(precision: str, device: str = "cuda") -> ActBytes:
    """``train.precision`` fp32 or bf16 (autocast) on ``device`` cuda or cpu."""
    if precision == "fp32":
        return ActBytes(4, 4)
    return ActBytes(2, 4) if device == "cuda" else ActBytes(2, 2, matrix_attention=True)


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
    squares: int = 0  # query-key pairs of the layout (positions x their row's keys)


def block_bytes(s: Seqs, t: Tower, dt: ActBytes, norm_in: int) -> float:
    """Bytes one ``Block`` saves for backward. Per real token: both LayerNorm inputs (``norm_in``
    bytes: the residual, or its fp32 cast under CUDA autocast) and their statistics, the qkv and
    fc1 inputs, fc1's output (GELU's input) and GELU's output (fc2's input). Per layout position:
    q/k/v, the attention output and its log-sum-exp (flash / memory-efficient SDPA keep no
    attention matrix; unpacked, the output is also the proj input, a view). bf16 on the CPU
    (``cpu_half_attention``) keeps its batched matmuls' contiguous copies of q (scaled), k and v
    and the probabilities (``s.squares`` x heads) instead; unpacked, the proj input is then a
    copy. Packed runs also keep the packed qkv output (``index_copy`` saves its source) and the
    packed proj input."""
    C, H = t.width, t.hidden
    per_real = 2 * C * norm_in + 2 * 2 * 4 + dt.low * (2 * C + 2 * H)
    if s.varlen:  # q/k/v (views of the packed qkv output), the output (the proj input) and the lse
        return s.real * (per_real + dt.low * 4 * C + 4 * t.heads)
    if s.packed:
        per_real += dt.low * 4 * C
    if dt.matrix_attention:  # the bmm's copies of q (scaled), k and v; unpacked, the proj input; a bool mask
        per_layout = dt.low * 3 * C + (1 if s.packed else dt.low * C)
        return s.real * per_real + s.layout * per_layout + s.squares * t.heads * dt.low
    per_layout = dt.low * 4 * C + 4 * t.heads + (4 if s.packed else 0)  # packed: the mask as a float bias
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
    statistics, the max-pool's indices (int64), the pooled state with its norm statistics, fc1's input and
    output, fc2's input, and for the overlaps q in fp32 with its norm and the normalised copy.
    Per (caption, position): fused attention's query copy, output and log-sum-exp, the rectified
    cosines and the regularisers' deviation from the layer mean (fp32). Per caption word: the additive mask, k and v for the attention, k's norm and
    normalised copy, and under bf16 the fp32 copy of k and the cast of the text features that
    W_K and W_V share. Packed: the packed input too. In bf16 on the CPU attention keeps its
    probabilities (heads x words per caption and position) instead of the output and the
    log-sum-exp, and a boolean mask instead of the additive one. (Equal, to the byte but for a
    few boolean masks, to what one layer saves in fp32 and in CPU bf16.) ``logits: overlap`` runs
    no fused attention: per (caption, position) it keeps each head's rectified cosines over the
    words once (fp32; in bf16 also their cast) instead of the query copy, output and log-sum-exp. With
    ``regularise_encoder: false`` the regularisers' own queries add a second norm output (and
    statistics) per position; under ``logits: overlap`` also their fp32 copy (their cosines are
    the attention's, one product)."""
    W, L, N, H = inv.predictor.width, inv.text.length if inv.text else 0, inv.captions, inv.cond_heads
    hidden = inv.cond_hidden or 4 * W
    low, wide = dt.low, dt.wide
    per_position = 2 * W * wide + 2 * 8 + 3 * W * low + 2 * hidden * low + 2 * W * 4 + 2 * H * 4
    if not inv.cond_mlp:  # no MLP: its norm's input and statistics, fc1's input and output, fc2's input
        per_position -= W * wide + 8 + W * low + 2 * hidden * low
    shared_per_word = 2 * H * 4 + W * 4 + 1 + (W * 4 + W * low if low < 4 else 0)
    detached = not inv.cond_regularise_encoder
    per_position += (W * low + 8) * detached  # the regularisers' queries: their own norm output and statistics
    per_position += W * (8 - low)  # the max-pool keeps its int64 indices, not the pooled maximum
    if inv.cond_logits == "overlap":  # no attention kernel: each head's rectified cosines per word (fp32), kept
        # once (the value product reads the tensor the cosines' own backward keeps; in bf16 also its cast), and
        # the regularisers' deviation from the layer mean
        per_caption_position = H * L * 4 + (H * L * low if low < 4 else 0) + L * 4
        # k and v as matmul inputs; in bf16 k's is the fp32 normalised copy, counted already
        per_word = shared_per_word + 2 * W * low - (W * low if low < 4 else 0)
        per_position += W * 4 * detached  # the regularisers' queries' fp32 copy (their cosines are the attention's)
    else:
        per_caption_position = 2 * W * low + H * 4 + 2 * L * 4
        if N == 1 and low == 4 and not detached:  # one caption: attention reads q itself, the overlaps' q
            per_caption_position -= W * low
        mask = low
        if dt.matrix_attention:  # cpu_half_attention: the probabilities, not the output and lse; a boolean mask
            per_caption_position += H * L * low - W * low - H * 4
            mask = 1
        per_word = shared_per_word + mask + 2 * W * low
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
    (ctx_layout, ctx_squares), (pred_layout, pred_squares) = tok.attention_layouts(attention)
    varlen = tok.padded and attention == "varlen"
    ctx = Seqs(tok.context_real, ctx_layout, tok.padded, varlen, ctx_squares)
    enc = B * 3 * inv.image_size**2 * dt.low + B * tok.full * D * dt.low + B * tok.context_pad * 8
    enc += tower_bytes(ctx, e, dt, dt.low, dt.low, checkpointing)
    enc += ctx.real * D * dt.wide * (2 if ctx.packed else 1) + ctx.real * 8 * ctx.packed
    enc += B * tok.context_pad * D * dt.low
    # predictor: one sequence per target block, context + that block's mask tokens
    layout = B * T * (tok.context_pad + tok.target_pad)  # the [B * T, N] layout (conditioners, head)
    seq = Seqs(T * tok.context_real + tok.target_real, pred_layout, tok.padded, varlen, pred_squares)
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
        tseq = Seqs(BN * L, BN * L, False, squares=BN * L * L)  # full-length captions: nothing to pack
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
