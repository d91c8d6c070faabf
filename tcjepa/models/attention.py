"""Packing and attention dispatch, shared by the encoder, the predictor and the conditioners.

Sequences in a batch may be padded (per-sample context sizes differ, a third of the tokens can be
padding). :class:`Packing` runs the per-token layers on the real tokens only and attention on
groups of similar-length sequences with padded keys masked, or through varlen flash attention on
the packed tokens where its kernel runs. :func:`attention` is the one call to
``scaled_dot_product_attention``, with the CUDA backend choice. Two context managers switch
layouts for the benchmarks and tests that compare them.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Padded attention sorts a batch's sequences by length and pads each group of similar lengths
# to its own longest, at least MIN_GROUP sequences a group and at most MAX_GROUPS groups. Under
# `mask.policy: pad` at batch 256 this cuts the attention work from 2.3x (encoder) and 2.1x
# (predictor) the real tokens' to 1.1x; the ViT-B/16 step on 2 CPU cores got 1.11x faster
# (benchmarks/RESULTS.md, "length-grouped attention").
MAX_GROUPS = 8
MIN_GROUP = 8
_WHOLE_ROWS: ContextVar[bool] = ContextVar("whole_row_attention", default=False)
_VARLEN: ContextVar[bool] = ContextVar("varlen_attention", default=True)


@contextlib.contextmanager
def whole_row_attention() -> Iterator[None]:
    """Attention over whole padded rows (one [B, N] batch, the layout before length groups and
    the one compiled code runs), for benchmarks and tests that compare the two."""
    token = _WHOLE_ROWS.set(True)
    try:
        yield
    finally:
        _WHOLE_ROWS.reset(token)


@contextlib.contextmanager
def varlen_attention(enabled: bool = True) -> Iterator[None]:
    """Switch varlen attention on (the default) or off (``False``: the length groups), for the
    benchmarks and tests that compare the two. Varlen runs each layer's attention through
    ``torch.nn.attention.varlen.varlen_attn`` on the packed real tokens: no padding, no
    unpack/pack copies. It runs where its kernel can (:func:`varlen_can_run`: CUDA, bf16 or fp16,
    sm80+, torch >= 2.10, eager); elsewhere the length groups do. On an H100 (torch 2.11, flash
    kernel) the ViT-B/16 ``pad`` step ran 1.39x faster than with the groups (benchmarks/RESULTS.md).
    Newer torch may pick cuDNN for sequences over 128 tokens on sm90+; not measured."""
    token = _VARLEN.set(enabled)
    try:
        yield
    finally:
        _VARLEN.reset(token)


@functools.lru_cache(maxsize=None)
def _varlen_kernel() -> Callable[..., torch.Tensor] | None:
    """torch's varlen flash attention, or None where this torch has none (< 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _sm80_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 8


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether varlen flash attention runs on ``device`` for activations of ``dtype``."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and _varlen_kernel() is not None
            and _sm80_or_newer(device.index if device.index is not None else torch.cuda.current_device()))


def varlen_can_run(qkv: torch.Tensor, head_dim: int) -> bool:
    """Whether the varlen kernel takes these activations (also: head size a multiple of 8, <= 256)."""
    return head_dim % 8 == 0 and head_dim <= 256 and varlen_available(qkv.device, qkv.dtype)


def length_groups(n: int, max_groups: int = MAX_GROUPS, min_group: int = MIN_GROUP) -> list[tuple[int, int]]:
    """Split ``n`` sequences, sorted by length, into contiguous groups of near-equal count:
    ``[(first, end), ...]`` over the sorted order."""
    k = max(1, min(max_groups, n // max(1, min_group)))
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def grouped_layout(lengths: list[int]) -> tuple[int, int]:
    """(positions, positions x keys) of the padded layout grouped attention (:class:`Packing`)
    runs on for sequences of these lengths. Pure, so the run planner and the benchmarks count
    what the model computes. (Whole padded rows are rows x the padded length.)"""
    s = sorted(lengths)
    positions = squares = 0
    for first, end in length_groups(len(s)):
        positions += (end - first) * s[end - 1]
        squares += (end - first) * s[end - 1] ** 2
    return positions, squares


@dataclass(frozen=True)
class _Group:
    start: int  # packed tokens [start, end) are this group's, sample after sample
    end: int
    index: torch.Tensor  # their positions in the group's padded [batch * length] layout
    batch: int
    length: int
    attn_mask: torch.Tensor | None  # SDPA boolean key mask [batch, 1, 1, length]; None: no padding


class Packing:
    """The real tokens of a padded batch, packed into one [T, C] tensor.

    Per-sample context sizes differ, so sequences are padded to the batch maximum; a third of
    the tokens can be padding. Per-token layers (LayerNorm, qkv, proj, MLP: most of the FLOPs at
    these lengths) run on the T real tokens only. Attention (:meth:`padded`) runs on groups of
    sequences of similar length, each padded to its own longest with padded keys masked, so it
    does little work on padding. The packed order is samples by ascending length (each group a
    contiguous slice); :meth:`pack` and :meth:`unpack` convert from and to the [B, N] layout.
    Where the varlen kernel runs (:func:`varlen_attention`), :meth:`varlen` attends over the packed tokens directly.

    Under ``torch.compile`` attention runs on the whole padded rows: grouping needs the lengths
    on the host, which would split the graph and specialise it on every batch's sizes.
    """

    def __init__(self, valid: torch.Tensor):
        self.batch, self.length = valid.shape
        self.attn_mask = valid[:, None, None, :]  # [B, 1, 1, N], in the [B, N] layout
        self.cu_seqlens: torch.Tensor | None = None  # sequence offsets in the packed tokens, for varlen attention
        self.max_length = 0
        if torch.compiler.is_compiling() or _WHOLE_ROWS.get() or valid.numel() == 0:
            self.index = valid.reshape(-1).nonzero().squeeze(1)  # flat positions of the real tokens
            self.groups = None  # attention on the whole rows
            return
        dev = valid.device
        lengths = valid.sum(1)
        host = sorted(lengths.tolist())  # the one host sync, as the whole-rows path's nonzero()
        starts = [0, *itertools.accumulate(host)]  # packed offset of each sorted sequence
        order = torch.argsort(lengths, stable=True)
        sorted_lengths = lengths[order]
        # packed token t is real token `rank` of sorted sequence `row`; a stable sort of the
        # padding flags lists each row's real columns first, in order
        row = torch.repeat_interleave(torch.arange(self.batch, device=dev), sorted_lengths, output_size=starts[-1])
        first_token = torch.repeat_interleave(torch.cumsum(sorted_lengths, 0) - sorted_lengths, sorted_lengths,
                                              output_size=starts[-1])
        rank = torch.arange(starts[-1], device=dev) - first_token
        cols = torch.argsort((~valid[order]).to(torch.uint8), dim=1, stable=True)
        self.index = order[row] * self.length + cols[row, rank]
        if _VARLEN.get() and host[-1] > 0:
            # packed sequences are contiguous; empty ones (sorted first) are left out of the offsets
            nonempty = sorted_lengths[host.count(0):]
            self.cu_seqlens = F.pad(torch.cumsum(nonempty, 0, dtype=torch.int32), (1, 0))
            self.max_length = host[-1]
        self._sorted = host, starts, sorted_lengths, row, rank  # for the groups, built on first use

    @functools.cached_property
    def groups(self) -> list[_Group]:
        """The length groups :meth:`padded` attends over, built on first use: where varlen runs they
        are never needed (None on the whole-rows path, set in ``__init__``)."""
        host, starts, sorted_lengths, row, rank = self._sorted
        spans: list[list[int]] = []
        for first, end in length_groups(len(host)):
            if spans and host[end - 1] == host[spans[-1][1] - 1]:
                spans[-1][1] = end  # the same longest row: one group
            else:
                spans.append([first, end])
        groups = []
        for first, end in spans:
            longest, a, b = host[end - 1], starts[first], starts[end]
            if longest == 0:
                continue  # sequences without tokens: nothing to attend
            mask = None
            if host[first] < longest:
                mask = (torch.arange(longest, device=row.device)[None] < sorted_lengths[first:end, None])[:, None, None, :]
            groups.append(_Group(a, b, (row[a:b] - first) * longest + rank[a:b], end - first, longest, mask))
        return groups

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [T, C]"""
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[T, C] -> [B, N, C], zeros at padded positions."""
        out = x.new_zeros(self.batch * self.length, x.size(-1))
        return out.index_copy(0, self.index, x).view(self.batch, self.length, -1)

    def varlen(self, qkv: torch.Tensor, num_heads: int) -> torch.Tensor | None:
        """Packed [T, 3C] -> [T, C] by varlen flash attention, or None (switched off by
        :func:`varlen_attention`, or :func:`varlen_can_run` says no): then use :meth:`padded`."""
        T, C3 = qkv.shape
        head_dim = C3 // 3 // num_heads
        if self.cu_seqlens is None or not varlen_can_run(qkv, head_dim):
            return None
        q, k, v = qkv.view(T, 3, num_heads, head_dim).unbind(1)  # [T, H, d] each, no copy
        out = _varlen_kernel()(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_length, self.max_length)
        return out.reshape(T, C3 // 3)

    def padded(self, x: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        """Packed [T, C] -> ``fn(padded [b, L, C], key mask [b, 1, 1, L] or None)`` -> [b, L, C'] per
        group of similar-length sequences (real keys first in each row) -> packed [T, C']."""
        if not self.groups:  # whole rows (or every sequence empty)
            return self.pack(fn(self.unpack(x), self.attn_mask))
        outs = []
        # split, not slices: a slice's backward zero-fills a gradient of all of x, once per group
        for g, part in zip(self.groups, x.split([g.end - g.start for g in self.groups])):
            rows = x.new_zeros(g.batch * g.length, x.size(-1)).index_copy(0, g.index, part)
            out = fn(rows.view(g.batch, g.length, -1), g.attn_mask)
            outs.append(out.reshape(g.batch * g.length, -1).index_select(0, g.index))
        return torch.cat(outs)


# SDPA backends tried on CUDA, in order. cuDNN attention is left out: torch 2.11 picked it for
# our shapes on an H200 and the whole ViT-B/16 I-JEPA step ran 1.74x slower than with flash
# (benchmarks/RESULTS.md, "GPU training step"). The CPU keeps PyTorch's own choice.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` with the backend choice above; bf16 and fp16 on the CPU
    take :func:`cpu_half_attention`. ``scale``: the logits' factor (default 1 / sqrt(head dim))."""
    if q.is_cuda:
        with sdpa_kernel(CUDA_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return cpu_half_attention(q, k, v, attn_mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def cpu_half_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention as two batched matmuls and a softmax, for bf16 / fp16 on the CPU.

    PyTorch's CPU flash kernel is slow in bf16 at our lengths (forward + backward at 16 x 6 heads
    x 196 tokens x 64: 36 ms against 13 ms for this; at 60 tokens 9 against 3), and the bmm's
    take the CPU's bf16 matmul units (benchmarks/RESULTS.md, "bf16 on the CPU"). The softmax
    accumulates in fp32 inside the kernel; the probabilities are rounded to the inputs' dtype
    before the product with ``v``, as flash kernels on the GPU do. A boolean mask gets the dtype's
    lowest value rather than -inf, so that a row with every key masked (an empty sequence beside
    longer ones in a length group) stays finite, where its output is discarded anyway.
    """
    scale = q.size(-1) ** -0.5 if scale is None else scale
    scores = (q * scale if scale != 1.0 else q) @ k.transpose(-2, -1)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
        else:  # an additive bias, in the scores' dtype so that the product with v stays in it
            scores = scores + attn_mask.to(scores.dtype)
    return scores.softmax(-1) @ v
