"""Vision Transformer encoder, read top to bottom: config, position embedding, attention,
MLP, block, encoder.

Parameter names follow facebookresearch/ijepa (``patch_embed.proj``, ``blocks.N.attn.qkv``,
``blocks.N.mlp.fc1``, ``norm``) so that official checkpoints and Hugging Face ``IJepaModel``
map onto ours by renaming only. Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` to get fused kernels. Sequences may be
padded (per-sample context sizes differ): :class:`Packing` runs the per-token layers on the real
tokens only, and attention on groups of similar-length sequences with padded keys masked.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# width, depth, heads, mlp_ratio (as in facebookresearch/ijepa's vision_transformer.py)
ARCHS: dict[str, tuple[int, int, int, float]] = {
    "micro": (96, 4, 3, 4.0),
    "tiny": (192, 12, 3, 4.0),
    "small": (384, 12, 6, 4.0),
    "base": (768, 12, 12, 4.0),
    "large": (1024, 24, 16, 4.0),
    "huge": (1280, 32, 16, 4.0),
    "giant": (1408, 40, 16, 48 / 11),
}


@dataclass(frozen=True)
class ViTArch:
    name: str
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int


def parse_encoder_name(name: str, depth: int | None = None) -> ViTArch:
    """``vit_small_16`` -> ViTArch(width=384, depth=12, heads=6, patch=16)."""
    match = re.fullmatch(r"vit_([a-z]+)_(\d+)", name)
    if not match or match.group(1) not in ARCHS:
        sizes = "|".join(ARCHS)
        raise ValueError(f"{name!r} is not an encoder name; expected vit_{{{sizes}}}_{{patch}}, e.g. vit_tiny_16")
    width, arch_depth, heads, mlp_ratio = ARCHS[match.group(1)]
    patch = int(match.group(2))
    if patch < 1:
        raise ValueError(f"{name!r}: patch size must be >= 1")
    return ViTArch(name, width, depth or arch_depth, heads, mlp_ratio, patch)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid_h * grid_w, dim], row-major (MAE/I-JEPA layout:
    the first half of the channels encodes the column (x), the second half the row (y))."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(xs), embed(ys)], dim=1).float()


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``scaled_dot_product_attention`` with the backend choice above."""
    if q.is_cuda:
        with sdpa_kernel(CUDA_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """x: [B, N, C], or [T, C] packed real tokens when ``packing`` is given."""
        qkv = self.qkv(x)
        if packing is None:
            return self.proj(self._attend(qkv))
        out = packing.varlen(qkv, self.num_heads)
        return self.proj(out if out is not None else packing.padded(qkv, self._attend))

    def _attend(self, qkv: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, 3C] -> [B, N, C]"""
        B, N, C3 = qkv.shape
        C = C3 // 3
        q, k, v = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, attn_mask)  # unbind: no zero-fill in backward
        return out.transpose(1, 2).reshape(B, N, C)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def layer_norm_in_dtype(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm(x)`` computed and returned in ``x``'s (half) dtype, outside autocast: the kernel keeps
    its statistics in fp32, the affine parameters are rounded to ``x``'s dtype, and their
    gradients are made in that dtype and summed into the fp32 ones (as autocast does for every
    Linear's weight)."""
    weight = None if norm.weight is None else norm.weight.to(x.dtype)
    bias = None if norm.bias is None else norm.bias.to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that keeps a bf16 input in bf16 under CUDA autocast.

    CUDA autocast runs layer norm in fp32: a bf16 input is cast up, and the fp32 output is cast
    back down by the Linear after it, two copies of the activations per norm. Keeping bf16
    (:func:`layer_norm_in_dtype`) made the ViT-B/16 I-JEPA step 1.08x faster on an H100
    (benchmarks/RESULTS.md). For the norms whose output feeds a Linear (the blocks'), not the final
    ones whose output is the features. CPU autocast already keeps bf16; elsewhere this is nn.LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == torch.bfloat16 and torch.is_autocast_enabled("cuda"):
            return layer_norm_in_dtype(x, self)
        return super().forward(x)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.checkpointing = False  # see set_activation_checkpointing

    def forward(self, x: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, x, packing, use_reentrant=False)
        return self._forward(x, packing)

    def _forward(self, x: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), packing)
        return x + self.mlp(self.norm2(x))


def set_activation_checkpointing(module: nn.Module, enabled: bool = True) -> int:
    """Per-block activation checkpointing for every transformer :class:`Block` in ``module``
    (``model.activation_checkpointing``): a block keeps only its input for backward and runs its
    forward again there, trading about one more forward for most of the activation memory.
    Returns the number of blocks switched."""
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for b in blocks:
        b.checkpointing = enabled
    return len(blocks)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], row-major patches


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], idx [B, K] -> [B, K, D], ``out[b, k] = x[b, idx[b, k]]``: the index is
    ``expand``ed over D (a view), where the official ``apply_masks`` ``repeat``s it (a copy)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))


def init_weights(module: nn.Module, std: float) -> None:
    """I-JEPA initialisation: truncated normal for Linear/Conv, unit LayerNorm, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def rescale_residual_branches(blocks: nn.ModuleList) -> None:
    """Divide each block's residual output projections by sqrt(2 * layer) (I-JEPA's fix_init_weight),
    so the residual stream's variance does not grow with depth at initialisation."""
    with torch.no_grad():
        for layer_id, block in enumerate(blocks, start=1):
            block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


class VisionTransformer(nn.Module):
    """Patch embedding + fixed sin-cos positions + pre-norm blocks + final LayerNorm."""

    def __init__(self, arch: ViTArch, image_size: int, init_std: float = 0.02):
        super().__init__()
        self.arch = arch
        self.patch_size = arch.patch_size
        self.embed_dim = arch.width
        self.num_heads = arch.num_heads
        self.grid = (image_size // arch.patch_size, image_size // arch.patch_size)
        self.patch_embed = PatchEmbed(arch.patch_size, arch.width)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(arch.width, *self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(arch.width, arch.num_heads, arch.mlp_ratio) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(arch.width, eps=1e-6)
        init_weights(self, init_std)
        rescale_residual_branches(self.blocks)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def image_size(self) -> int:
        """The (square) input size the encoder was built for."""
        return self.grid[0] * self.patch_size

    def forward(
        self, images: torch.Tensor, idx: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """images [B, 3, H, W] -> patch features [B, N, D]; with ``idx`` [B, K] only those patches
        are encoded (the context), with ``valid`` [B, K] marking padded entries (returned as zeros)."""
        x = self.patch_embed(images)
        if x.size(1) != self.pos_embed.size(1):
            raise ValueError(f"image gives {x.size(1)} patches, the encoder was built for {self.pos_embed.size(1)}")
        x = x + self.pos_embed.to(x.dtype)
        if idx is not None:
            x = gather_tokens(x, idx)
        return run_blocks(x, self.blocks, self.norm, valid)


def run_blocks(x: torch.Tensor, blocks: nn.ModuleList, norm: nn.Module, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(blocks(x))`` over [B, N, C]; with ``valid`` [B, N], per-token layers run on the real
    tokens only and padded positions come back as zeros."""
    packing = Packing(valid) if valid is not None else None
    if packing is not None:
        x = packing.pack(x)
    for block in blocks:
        x = block(x, packing)
    x = norm(x)
    return packing.unpack(x) if packing is not None else x


def build_encoder(name: str, image_size: int, depth: int | None = None, init_std: float = 0.02) -> VisionTransformer:
    return VisionTransformer(parse_encoder_name(name, depth), image_size, init_std)
