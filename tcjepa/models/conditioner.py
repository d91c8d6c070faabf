"""The TC-JEPA text conditioners: cross-attention from predictor tokens to caption word tokens.

Two variants (``conditioner.variant``):

``paper`` (the default; Text-Conditional JEPA, arXiv 2605.03245): :class:`CaptionCrossAttention`
at every predictor layer, several captions per image max-pooled, and two regularisers on the
query-word cosine overlaps (:func:`overlap_regularisers`). Each reading the paper's summary
leaves open, and the choice made:

- *Norm placement.* "q <- q + sum_s softmax(q_l^T K_l)_s V_l[s], followed by an MLP and a
  LayerNorm" is read as one pre-norm transformer sub-block, as the predictor's own blocks are:
  ``h = x + attn(W_Q LN(x), W_K t, W_V t); out = h + MLP(LN(h))``. A LayerNorm *on* the
  residual stream after every layer would renormalise the predictor's state twelve times per
  pass, which none of the JEPA predictors does.
- *No output projection.* The formula adds the attended values ``V_l = W_V t`` to q directly;
  with several heads their outputs are concatenated, with no W_O after them. (A W_O would run
  once per caption and query: at ViT-S/16 with 8 captions it was the largest single cost of the
  step, and a linear map before the MLP adds nothing W_V cannot learn for one head.)
- *Heads and scaling.* Multi-head attention with the predictor's head count
  (``conditioner.heads``) and the usual 1/sqrt(head_dim) logit scale; no QK-norm (the formula
  has none, and the overlaps below are cosines anyway).
- *Overlaps.* O_i^l = max(cos(q_l, K_l), 0) per word; with several heads the cosine is taken per
  head and averaged over heads, so O stays in [0, 1] and every head's keys are regularised.
  Padding words are never counted (exact zeros), nor are padded predictor tokens.
- *Several captions.* "Conditioned on each caption independently, then max-pooled" is read as:
  each real caption n gives the cross-attended state ``h_n = x + attn_n``; the states are
  max-pooled elementwise over the real captions, ``h = x + max_n attn_n`` (x is shared),
  and the MLP (with its LayerNorm) then runs once on the pooled state. Running the MLP per
  caption before the max is the other reading; it costs N MLPs per layer (8x the predictor's
  own MLP work at N = 8, over 10x the whole I-JEPA step on the quickstart model) for a
  difference the summary does not settle. An image with no caption (none given, or all
  dropped) keeps ``x``: identity conditioning, the MLP included.
- *What is shared across captions.* The queries ``W_Q LN(x)`` are computed once, and so is
  everything after the max (the MLP and its norm). Keys, values and attention run per caption,
  as one batched axis (no loop over captions). A missing caption slot (an image with fewer than
  N, or one dropped) holds a copy of one of the image's real captions: the maximum is unchanged
  by a repeated element, so the pooling needs no mask over the per-caption updates, and it runs
  before the heads are merged (the merge then copies N times less); the regularisers and
  statistics still count real captions only. Attention is torch's
  fused SDPA with the padding words masked, so the [Q, S] weights of every caption and head are
  never stored; the overlaps are one product of per-head-normalised q and k over the full width
  (the head mean of the cosines), in fp32 even in a bf16 run; the logged attention entropy
  re-scores the first caption only.
- *Logits* (``conditioner.logits``). ``dot`` (the default): the summary's softmax(q_l^T K_l),
  scaled by 1/sqrt(head_dim). Under it the regularisers and the attention are decoupled: every
  cosine <= 0 satisfies both regularisers exactly while the softmax still ranks the words by
  their dot products, and in the quickstart the overlaps reach that state within ~60 steps
  (benchmarks/RESULTS.md). ``cosine`` is the reading that couples them: the logits are the
  per-head cosines themselves times a learned scale (CLIP's logit scale: initialised at
  ``conditioner.logit_scale``, at most 100), meant to make the words the sparsity loss pushes
  below zero the words the attention leaves out. Measured, it does not stop the collapse: the
  softmax is shift-invariant, so all cosines below zero still rank the words while zeroing both
  regularisers, and the overlaps reach zero as fast as with ``dot`` (benchmarks/RESULTS.md, "Dense
  evaluation and grounding"). Kept for ablations. ``overlap`` reads the overlaps as the attention
  weights themselves: each head adds sum_s max(cos(q_h, k_s), 0) v_s, not normalised (ReLU
  attention), and the regularisers act on those weights (their mean over heads). Nothing is then
  shift-invariant: a word whose cosine is pushed below zero is a word the update leaves out, the
  sparsity loss is a price on the text update itself, and an all-negative caption contributes
  nothing, so the prediction loss has to hold some overlaps above zero to use the text at all.
  Not normalised by the caption's length, so a long caption can add more than a short one;
  the max over captions sees that. Not the summary's softmax; an ablation of the collapse.
- *Where the regularisers' gradient goes* (``conditioner.regularise_encoder``). The overlaps are
  cosines of W_Q LN(x) with the keys, and x, the predictor's state, is computed from the
  encoder's features, so the regularisers' gradient could reach the predictor's blocks and the
  encoder through the queries (the summary says nothing; ``regularise_encoder: true``).
  Measured, that pull contracts the encoder's features (the teacher's target spread and RankMe
  fall while I-JEPA's rise; with lambda = beta = 0 they do not: benchmarks/RESULTS.md): the
  cheapest way to hold every cosine at or below zero is to make the queries alike. The default,
  ``false``, reads the overlaps from queries recomputed on the state with its gradient stopped
  (the same values), so the regularisers train W_Q, its norm, W_K and the text side only.
- *The MLP* (``conditioner.mlp``, on as the summary has it) runs on the pooled state of every
  image with a caption, whatever the attention picked: predictor capacity that I-JEPA lacks,
  text or no text. ``mlp: false`` adds the attended words only (``h = x + max_n attn_n``), the
  ablation that tells the text's effect from the extra capacity's.
- *Init.* The predictor's truncated-normal init (``model.init_std``) with the residual
  projections rescaled by depth, as the ViT blocks are; no zero gate. A fresh ``paper`` TC-JEPA
  therefore differs from I-JEPA from step 0 (``gated_topk`` starts equal to it), and a gradient
  reaches W_Q, W_K and W_V of every layer from the first step.

``gated_topk`` (this toolkit's first reading of the abstract, kept for ablations):
:class:`TextConditioner` below, one caption, described next.


Each predictor token (context tokens and mask tokens alike) attends over its caption's tokens;
only a few caption tokens keep weight per query (each patch reads a few relevant words). The
result enters the predictor through a gated residual, ``x + tanh(s * gate) * out``, with the
per-channel gate initialised at zero (as Flamingo's gated cross-attention): a fresh TC-JEPA
computes exactly what I-JEPA computes, bit for bit, and text influence grows only as far as
the loss asks for it. ``out_proj`` is *not* zero-initialised, so the gate gets a gradient at
step 0.

Two choices make the path learn in short runs (measured on the quickstart scenes, see
benchmarks/RESULTS.md): queries and keys are LayerNorm-ed per head (QK-norm), so the logits
are O(1) from step 0 and the top-k choice follows content instead of init noise (with the
0.02-scale init, logits are ~1e-3 and the q/k gradients, ~1e-12, vanish under Adam's eps);
and the gate is scaled by ``gate_scale`` (default 10), which under Adam is a 10x learning rate
for the gate alone, so it opens within a few hundred steps rather than a few thousand.

Sparsity rules (``sparsity``):

- ``topk`` (default): softmax over the ``top_k`` highest-scoring real tokens, zero elsewhere.
  Exact: ``topk`` breaks ties by index, so every query keeps exactly ``min(k, n_real)`` weights.
  Fast: captions are short (L <= 77), so the dense [Q, L] scores are cheap; the selected
  probabilities are scattered back into that dense matrix and multiplied with V in one matmul,
  instead of gathering a [Q, k, head_dim] copy of the values.
- ``sparsemax`` (Martins & Astudillo, 2016): Euclidean projection onto the simplex; the number
  of kept tokens adapts per query (no k to choose), at the cost of a sort.
- ``softmax``: dense attention, for ablations.

Why top-k by default: the issue's design reads "each patch attends only to a few words"; top-k
states that literally, costs one ``topk`` over <= 77 scores per query and has the same forward
and backward cost whatever k is. sparsemax lets the data choose how many words; 1.5-entmax
(between the two) needs a bisection or sort per query and is not implemented; the step-time
price of sparsemax's sort is in benchmarks/RESULTS.md.

Samples without text (empty caption, or dropped by caption dropout) get a zero update, i.e.
identity conditioning, rather than attention over nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tcjepa.models.attention import Packing, attention

SPARSITY = ("topk", "sparsemax", "softmax")


def topk_softmax(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Softmax over the ``k`` largest real entries of the last dim, exact zeros elsewhere.

    ``valid`` broadcasts against ``scores`` (False = padding, never selected unless a row has
    fewer than ``k`` real entries, and then it gets weight exactly 0).
    """
    scores = scores.masked_fill(~valid, float("-inf"))
    k = min(k, scores.size(-1))
    top, idx = scores.topk(k, dim=-1)
    probs = torch.softmax(top, dim=-1)
    return torch.zeros_like(scores).scatter(-1, idx, probs)


def sparsemax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sparsemax over the last dim restricted to ``valid`` entries (computed in fp32)."""
    z = scores.float().masked_fill(~valid, -1e6)
    z_sorted, _ = z.sort(dim=-1, descending=True)
    ks = torch.arange(1, z.size(-1) + 1, device=z.device, dtype=z.dtype)
    cumsum = z_sorted.cumsum(-1)
    support = (1 + ks * z_sorted) > cumsum
    k_z = support.sum(-1, keepdim=True).clamp_min(1)
    tau = (cumsum.gather(-1, k_z - 1) - 1) / k_z.to(z.dtype)
    return (z - tau).clamp_min(0).masked_fill(~valid, 0).to(scores.dtype)


def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each attention row; 0 * log 0 = 0."""
    return -(weights * weights.clamp_min(1e-12).log()).sum(-1)


class TextConditioner(nn.Module):
    """One gated sparse cross-attention layer: predictor tokens (queries) over text tokens."""

    def __init__(self, width: int, num_heads: int, sparsity: str = "topk", top_k: int = 4,
                 qk_norm: bool = True, gate_scale: float = 10.0):
        super().__init__()
        if sparsity not in SPARSITY:
            raise ValueError(f"unknown sparsity {sparsity!r}; expected one of {', '.join(SPARSITY)}")
        if width % num_heads:
            raise ValueError(f"conditioner width {width} is not divisible by {num_heads} heads")
        self.num_heads, self.sparsity, self.top_k, self.gate_scale = num_heads, sparsity, top_k, gate_scale
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.q_norm = nn.LayerNorm(width // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(width // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width, bias=False)  # no bias: zero update stays zero
        self.gate = nn.Parameter(torch.zeros(width))
        self.keep_weights = False  # set by visualisation: stores the last attention weights
        self.last_weights: torch.Tensor | None = None
        self.last_entropy: torch.Tensor | None = None

    def weights(self, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if self.sparsity == "topk":
            return topk_softmax(scores, valid, self.top_k)
        if self.sparsity == "sparsemax":
            return sparsemax(scores, valid)
        return torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, has_text: torch.Tensor,
                packing: Packing | None = None) -> torch.Tensor:
        """x: predictor tokens [B*S, N, C] (S sequences per sample, sample-major) or packed [T, C];
        text: [B, L, C] projected text features; text_valid [B, L]; has_text [B]."""
        B, L, C = text.shape
        H, dh = self.num_heads, C // self.num_heads
        text_valid = text_valid | ~text_valid.any(-1, keepdim=True)  # a row with no real token: no NaN
        q = self.q(self.norm(x))
        if packing is not None:
            q = packing.unpack(q)
        BS, N, _ = q.shape
        q = q.reshape(B, (BS // B) * N, H, dh).transpose(1, 2)  # [B, H, Q, dh]: a sample's queries share its text
        k, v = self.kv(text).view(B, L, 2, H, dh).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, dh]
        q, k = self.q_norm(q), self.k_norm(k)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dh))
        w = self.weights(scores, text_valid[:, None, None, :])
        out = (w @ v).transpose(1, 2).reshape(B, -1, C)
        out = out * has_text.to(out.dtype)[:, None, None]  # no text: identity conditioning
        self._record(w, has_text, packing, BS // B, N)
        out = out.reshape(BS, N, C)
        if packing is not None:
            out = packing.pack(out)
        out = self.out_proj(out)
        return x + self.gate_value().to(out.dtype) * out

    def gate_value(self) -> torch.Tensor:
        """The per-channel residual gate, tanh(gate_scale * gate), in [-1, 1]."""
        return torch.tanh(self.gate_scale * self.gate)

    @torch.no_grad()
    def _record(self, w: torch.Tensor, has_text: torch.Tensor, packing: Packing | None, S: int, N: int) -> None:
        """Mean attention entropy over real queries of samples with text (for metrics.jsonl)."""
        ent = attention_entropy(w.float()).mean(1)  # [B, Q]
        real = has_text[:, None].expand_as(ent)
        if packing is not None:
            real = real & packing.attn_mask.reshape(-1, S * N)
        self.last_entropy = (ent * real).sum() / real.sum().clamp_min(1)
        self.last_weights = w.detach() if self.keep_weights else None


def conditioned_blocks(depth: int, every: int) -> list[int]:
    """Predictor block indices followed by a conditioner: every ``every``-th, counted back from
    the last block, so the last block is always conditioned."""
    return sorted(range(depth - 1, -1, -every))


def build_conditioners(width: int, depth: int, every: int, num_heads: int, sparsity: str = "topk",
                       top_k: int = 4, qk_norm: bool = True, gate_scale: float = 10.0,
                       init_std: float = 0.02) -> nn.ModuleDict:
    """Conditioners keyed by predictor block index (``Predictor.conditioners``)."""
    from tcjepa.models.vit import init_weights

    layers = nn.ModuleDict({str(i): TextConditioner(width, num_heads, sparsity, top_k, qk_norm, gate_scale)
                            for i in conditioned_blocks(depth, every)})
    init_weights(layers, init_std)
    for layer in layers.values():
        nn.init.zeros_(layer.gate)
    return layers


# ----------------------------------------------------------------------------- the paper's variant

VARIANTS = ("paper", "gated_topk")
LOGITS = ("dot", "cosine", "overlap")  # the paper variant's attention weights (conditioner.logits)
MAX_LOGIT_SCALE = 100.0  # CLIP's cap on its learned logit scale


def as_captions(features: torch.Tensor, valid: torch.Tensor, has_text: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Text inputs with an explicit caption axis: ``[B, N, S, C]``, ``[B, N, S]``, ``[B, N]``
    (one caption per image, ``[B, S, C]``, becomes N = 1)."""
    if features.dim() == 3:
        return features[:, None], valid[:, None], has_text[:, None]
    return features, valid, has_text


class CaptionCrossAttention(nn.Module):
    """One predictor layer's conditioner (``variant: paper``): every predictor token
    cross-attends over each caption's words; the per-caption results are max-pooled.

    After a forward, ``last_overlap`` holds O = max(cos(q, k), 0) averaged over heads,
    ``[B, N, Q, S]`` with zeros at padding words (a tensor in the graph: the regularisers
    backpropagate through it), and ``last_weights`` the attention weights averaged over heads
    when ``keep_weights`` is set (visualisation)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0, logits: str = "dot",
                 logit_scale: float = 10.0, mlp: bool = True, regularise_encoder: bool = False):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"conditioner width {width} is not divisible by {num_heads} heads")
        if logits not in LOGITS:
            raise ValueError(f"unknown conditioner logits {logits!r}; expected one of {', '.join(LOGITS)}")
        from tcjepa.models.vit import MLP

        self.num_heads, self.logits, self.regularise_encoder = num_heads, logits, regularise_encoder
        # cosine logits: log of the learned scale of the cosines (CLIP's logit_scale); dot: none.
        # Shape [1], not a 0-d scalar: DeepSpeed's parameter broadcast views every parameter as bytes
        self.log_scale = nn.Parameter(torch.full((1,), math.log(logit_scale))) if logits == "cosine" else None
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)  # the heads' values, concatenated: the update itself (no W_O)
        # the MLP after the attention (``conditioner.mlp``): without it the layer adds only attended words
        self.mlp_norm = nn.LayerNorm(width, eps=1e-6) if mlp else None
        self.mlp = MLP(width, int(width * mlp_ratio)) if mlp else None
        self.keep_weights = False
        self.last_overlap: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.last_entropy: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_valid: torch.Tensor, has_text: torch.Tensor,
                packing: Packing | None = None) -> torch.Tensor:
        """x: predictor tokens [B*T, Ns, C] (T sequences per sample, sample-major) or packed
        [tokens, C]; text: [B, N, S, C] (or [B, S, C]); text_valid [B, N, S]; has_text [B, N]."""
        text, text_valid, has_text = as_captions(text, text_valid, has_text)
        B, N, S, C = text.shape
        H, dh = self.num_heads, C // self.num_heads
        x_rows = packing.unpack(x) if packing is not None else x  # [B*T, Ns, C], zeros at padding
        BT, Ns, _ = x_rows.shape
        Q = (BT // B) * Ns
        x_b = x_rows.reshape(B, Q, C)
        text, text_valid = fill_missing_captions(text, text_valid, has_text)
        q = self.q(self.norm(x_b)).view(B, Q, H, dh).transpose(1, 2)  # [B, H, Q, dh]: shared by the captions
        k = self.k(text).view(B, N, S, H, dh).transpose(2, 3)  # [B, N, H, S, dh]
        v = self.v(text).view(B, N, S, H, dh).transpose(2, 3)
        # the queries the regularisers read: without regularise_encoder, recomputed from the predictor state with
        # its gradient stopped (the same values), so the regularisers train W_Q, W_K and the text, not the encoder;
        # with no gradient recorded (evaluation, scoring) there is no path to tell apart
        detach = not self.regularise_encoder and torch.is_grad_enabled()
        q_reg = self.q(self.norm(x_b.detach())).view(B, Q, H, dh).transpose(1, 2) if detach else q
        if self.logits == "overlap":
            attended, self.last_overlap = self.overlap_attention(q, k, v, text_valid, has_text, q_reg)
        else:
            words = text_valid | ~text_valid.any(-1, keepdim=True)  # a caption with no real word: no NaN
            qs, ks, scale = self.logit_inputs(q, k)
            # fused attention (SDPA; bf16 on the CPU: matmuls, faster there): in fp32 and on the GPU
            # the [Q, S] weights of every caption and head are never stored
            attended = attention(  # 4-d, so that the CPU's flash kernel takes it
                qs[:, None].expand(B, N, H, Q, dh).reshape(B * N, H, Q, dh), ks.reshape(B * N, H, S, dh),
                v.reshape(B * N, H, S, dh), words.reshape(B * N, 1, 1, S), scale=scale).view(B, N, H, Q, dh)
            self.last_overlap = overlaps(q_reg, k, text_valid)
            self._record(qs, ks, scale, words, has_text)
        # each caption's update [B, N, H, Q, dh], max-pooled over the captions before the heads are merged (the
        # merge copies N times less); max, not amax: its backward scatters to the indices it keeps
        pooled = attended.max(1).values.transpose(1, 2).reshape(B, Q, C)
        some = has_text.any(1)[:, None, None]
        h = x_b + pooled
        conditioned = h + self.mlp(self.mlp_norm(h)) if self.mlp is not None else h
        out = torch.where(some, conditioned, x_b)  # no caption: identity
        out = out.reshape(BT, Ns, C)
        return packing.pack(out) if packing is not None else out

    def overlap_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_valid: torch.Tensor,
                          has_text: torch.Tensor, q_reg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits: overlap``: each head's weights are its rectified cosines max(cos(q_h, k_h), 0)
        themselves, not normalised (ReLU attention): a word adds its value in proportion to its
        overlap, so the sparsity loss on the overlaps is a cost on the text update itself and the
        prediction loss can only use a word by keeping its overlap above zero. Returns each
        caption's update [B, N, H, Q, dh] and the overlaps the regularisers read: the weights'
        mean over heads [B, N, Q, S] (in at least fp32, as :func:`overlaps`), from ``q_reg`` when it
        is not ``q`` (the same values, another gradient path: ``regularise_encoder: false``)."""
        w, read = rectified_cosines(q, k, text_valid, None if q_reg is q else q_reg)
        attended = torch.matmul(w.to(v.dtype), v)  # [B, N, H, Q, dh]
        self._record_weights(w, text_valid, has_text)
        return attended, read

    @torch.no_grad()
    def _record_weights(self, w: torch.Tensor, text_valid: torch.Tensor, has_text: torch.Tensor) -> None:
        """Entropy statistic of ``logits: overlap``, as :meth:`_record`'s: the first caption's
        weights, each row normalised to sum to 1 (a row with no overlap counts as uniform over the
        real words), averaged over heads, queries and the images that have that caption."""
        first, words = w[:, 0].float(), text_valid[:, 0, None, None, :].to(torch.float32)  # [B, H, Q, S]
        total = first.sum(-1, keepdim=True)
        p = torch.where(total > 0, first / total.clamp_min(1e-12), words / words.sum(-1, keepdim=True).clamp_min(1))
        ent = attention_entropy(p).mean((1, 2))  # [B]
        real = has_text[:, 0].to(ent.dtype)
        self.last_entropy = (ent * real).sum() / real.sum().clamp_min(1)
        self.last_weights = w.float().mean(2) if self.keep_weights else None

    def logit_inputs(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Queries, keys and the factor whose scaled products are the attention logits: q.k /
        sqrt(head_dim) (``dot``), or the per-head cosines times the learned scale (``cosine``;
        the scale rides on the queries, so the fused kernel's own factor is 1)."""
        if self.log_scale is None:
            return q, k, 1.0 / math.sqrt(q.size(-1))
        scale = self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE).to(q.dtype)
        return F.normalize(q, dim=-1) * scale, F.normalize(k, dim=-1), 1.0

    @torch.no_grad()
    def _record(self, q: torch.Tensor, k: torch.Tensor, scale: float, words: torch.Tensor, has_text: torch.Tensor
                ) -> None:
        """Attention entropy of the first caption's weights (every image with text has one: a
        cheap, steady sample for metrics.jsonl), recomputed outside the fused kernel from the
        kernel's own inputs; all captions' weights, averaged over heads, when ``keep_weights`` is
        set (visualisation)."""
        n = k.size(1) if self.keep_weights else 1
        scores = torch.einsum("bhqd,bnhsd->bnhqs", q, k[:, :n]) * scale
        w = torch.softmax(scores.float().masked_fill(~words[:, :n, None, None, :], float("-inf")), dim=-1)
        self.last_weights = w.mean(2) if self.keep_weights else None
        ent = attention_entropy(w[:, 0]).mean(1)  # [B, Q]
        real = has_text[:, :1].expand_as(ent)
        self.last_entropy = (ent * real).sum() / real.sum().clamp_min(1)


def fill_missing_captions(text: torch.Tensor, text_valid: torch.Tensor, has_text: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's missing captions (fewer than N, or dropped) replaced by a copy of one of its
    real ones: a maximum over the captions is unchanged by a repeated element, so the max-pool
    needs no mask over the per-caption updates (what the regularisers and statistics read is
    still limited to the real captions by ``has_text``). An image with no caption keeps its own
    slots (its output is the identity anyway)."""
    if bool(has_text.all()):
        return text, text_valid
    N = has_text.size(1)
    first = has_text.to(torch.uint8).argmax(1, keepdim=True)  # the first real caption (0 if none)
    idx = torch.where(has_text, torch.arange(N, device=has_text.device), first)  # [B, N]
    return (text.gather(1, idx[:, :, None, None].expand_as(text)),
            text_valid.gather(1, idx[:, :, None].expand_as(text_valid)))


def unit_keys(k: torch.Tensor, text_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-head unit keys with the padding words' keys zero, so that their cosines are exactly 0
    (no mask over the [B, N, H, Q, S] cosines): k [B, N, H, S, dh], text_valid [B, N, S]."""
    return F.normalize(k.to(dtype), dim=-1) * text_valid[:, :, None, :, None]


def caption_products(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q k^T for every caption: q [B, H, Q, dh] shared by the captions, k [B, N, H, S, dh] ->
    [B, N, H, Q, S], contiguous in that order, so that the product with the values (batched over
    image, caption and head) reads it as it is. (An einsum would run one product over the N * S
    words but return a view in [B, H, Q, N, S] order, which the value product then copies.)"""
    return torch.matmul(q[:, None], k.transpose(-1, -2))


def rectified_cosines(q: torch.Tensor, k: torch.Tensor, text_valid: torch.Tensor, q_reg: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits: overlap``'s attention weights max(cos(q_h, k_h), 0) per head, [B, N, H, Q, S],
    and their head mean [B, N, Q, S] (the overlaps the regularisers read), zeros at padding words,
    in at least fp32, from q [B, H, Q, dh] and k [B, N, H, S, dh]. With ``q_reg`` (equal in value
    to q: ``regularise_encoder: false``) the head mean's gradient goes to q_reg instead of q; the
    cosines are computed once either way."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        unit_q = F.normalize(q.to(dtype), dim=-1)
        unit_q_reg = None if q_reg is None else F.normalize(q_reg.to(dtype), dim=-1)
        return _RectifiedCosines.apply(unit_q, unit_keys(k, text_valid, dtype), unit_q_reg)


class _RectifiedCosines(torch.autograd.Function):
    """w = max(q k^T, 0) [B, N, H, Q, S] and its head mean, as one rectified tensor that the value
    product reads too (autograd alone would keep the cosines, the rectified copy and the value
    product's input), in [B, N, H, Q, S] order so that nothing is relaid out. Backward sends the
    head mean's gradient to ``q_reg`` when it is given (the same queries on a second gradient
    path), with k's two gradients summed before their product."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, q_reg: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        w = caption_products(q, k).clamp_min_(0)
        ctx.save_for_backward(q, k, w)
        ctx.separate = q_reg is not None
        return w, w.mean(2)

    @staticmethod
    def backward(ctx, g_w: torch.Tensor | None, g_read: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        q, k, w = ctx.saved_tensors
        live = w > 0  # where the rectifier passes a gradient
        g_a = torch.zeros_like(w) if g_w is None else g_w * live
        g_r = torch.zeros_like(w) if g_read is None else (g_read / w.size(2)).unsqueeze(2) * live
        g_all = g_a + g_r
        g_k = torch.matmul(g_all.transpose(-1, -2), q[:, None])  # every product batched over (image, caption, head)
        if not ctx.separate:
            return torch.matmul(g_all, k).sum(1), g_k, None
        return torch.matmul(g_a, k).sum(1), g_k, torch.matmul(g_r, k).sum(1)


def overlaps(q: torch.Tensor, k: torch.Tensor, text_valid: torch.Tensor) -> torch.Tensor:
    """O = max(cos(q, k), 0) averaged over heads, [B, N, Q, S], zeros at padding words, from q
    [B, H, Q, dh] and k [B, N, H, S, dh]. The head mean of per-head cosines is one product over
    the full width of the per-head-normalised vectors, (1/H) sum_h q^_h . k^_h, so it runs as a
    single matmul whose output has no head axis."""
    B, H, Q, dh = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)  # the regularisers in at least fp32, bf16 run or not
    with torch.autocast(q.device.type, enabled=False):
        qn = F.normalize(q.to(dtype), dim=-1).transpose(1, 2).reshape(B, Q, H * dh)
        kn = F.normalize(k.to(dtype), dim=-1).transpose(2, 3).reshape(*k.shape[:2], k.shape[3], H * dh)
        cos = torch.einsum("bqc,bnsc->bnqs", qn, kn) * (1.0 / H)
        return cos.clamp_min(0) * text_valid[:, :, None, :]


def build_caption_conditioners(width: int, depth: int, every: int, num_heads: int, mlp_ratio: float = 4.0,
                               init_std: float = 0.02, logits: str = "dot", logit_scale: float = 10.0,
                               mlp: bool = True, regularise_encoder: bool = False) -> nn.ModuleDict:
    """``variant: paper`` conditioners keyed by predictor block index (``Predictor.conditioners``);
    residual projections rescaled by their layer id, as :func:`rescale_residual_branches` does."""
    from tcjepa.models.vit import init_weights

    layers = nn.ModuleDict({str(i): CaptionCrossAttention(width, num_heads, mlp_ratio, logits, logit_scale, mlp=mlp,
                                                          regularise_encoder=regularise_encoder)
                            for i in conditioned_blocks(depth, every)})
    init_weights(layers, init_std)
    for i, layer in layers.items():
        with torch.no_grad():
            last_maps = [layer.v] + ([layer.mlp.fc2] if layer.mlp is not None else [])  # each residual branch's
            for branch in last_maps:
                branch.weight.div_(math.sqrt(2.0 * (int(i) + 1)))
    return layers


def overlap_regularisers(overlaps: list[torch.Tensor], pairs: torch.Tensor, count: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's sparsity and cross-layer consistency losses from each layer's overlaps
    ``O^l`` ([B, N, Q, S], zeros at padding words):

    L_sparse = mean over (token i, caption n) of (1/L) sum_l ||O_i^l||_1,
    L_consistency = mean over (token i, caption n) of (1/L) sum_l ||O_i^l - mean_l' O_i^l'||_1,

    the means over the real pairs ``pairs`` [B, N, Q] (a real predictor token and a real caption).
    With every caption real this is the paper's (1/N) sum_n L^n; with fewer captions for some
    images each real pair counts once. ``count`` replaces the local number of pairs (the mean
    over ranks, :func:`tcjepa.distributed.mean_count_over_ranks`)."""
    o = torch.stack(overlaps)  # [L, B, N, Q, S]
    sparse = o.sum(-1).mean(0)  # [B, N, Q]
    consistency = (o - o.mean(0, keepdim=True)).abs().sum(-1).mean(0)
    w = pairs.to(o.dtype)
    n = (w.sum() if count is None else count).clamp_min(1.0)
    return (sparse * w).sum() / n, (consistency * w).sum() / n
