"""Vision Transformer encoder, read top to bottom: config, position embedding, attention,
MLP, block, encoder.

Parameter names follow facebookresearch/ijepa (``patch_embed.proj``, ``blocks.N.attn.qkv``,
``blocks.N.mlp.fc1``, ``norm``) so that official checkpoints and Hugging Face ``IJepaModel``
map onto ours by renaming only. Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` to get fused kernels. Sequences may be
padded (per-sample context sizes differ): ``tcjepa.models.attention.Packing`` runs the per-token
layers on the real tokens only and attends without the padding.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tcjepa.models.attention import Packing, attention

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
        self, images: torch.Tensor, idx: torch.Tensor | None = None, valid: torch.Tensor | None = None,
        last_blocks: int = 1,
    ) -> torch.Tensor:
        """images [B, 3, H, W] -> patch features [B, N, D]; with ``idx`` [B, K] only those patches
        are encoded (the context), with ``valid`` [B, K] marking padded entries (returned as zeros).
        ``last_blocks`` n > 1: the last n blocks' outputs, each through the final norm, stacked
        [n, B, N, D] (multi-block read-outs and targets; no hooks, so it compiles)."""
        x = self.patch_embed(images)
        if x.size(1) != self.pos_embed.size(1):
            raise ValueError(f"image gives {x.size(1)} patches, the encoder was built for {self.pos_embed.size(1)}")
        x = x + self.pos_embed.to(x.dtype)
        if idx is not None:
            x = gather_tokens(x, idx)
        return run_blocks(x, self.blocks, self.norm, valid, last_blocks)


def run_blocks(x: torch.Tensor, blocks: nn.ModuleList, norm: nn.Module, valid: torch.Tensor | None = None,
               last_blocks: int = 1) -> torch.Tensor:
    """``norm(blocks(x))`` over [B, N, C]; with ``valid`` [B, N], per-token layers run on the real
    tokens only and padded positions come back as zeros. ``last_blocks`` n > 1: ``norm`` of each of
    the last n blocks' outputs, stacked [n, B, N, C]."""
    if last_blocks != 1 and not 1 <= last_blocks <= len(blocks):
        raise ValueError(f"last_blocks {last_blocks} is not in [1, {len(blocks)} blocks]")
    packing = Packing(valid) if valid is not None else None
    if packing is not None:
        x = packing.pack(x)
    kept: list[torch.Tensor] = []
    for i, block in enumerate(blocks):
        x = block(x, packing)
        if last_blocks > 1 and i >= len(blocks) - last_blocks:
            kept.append(norm(x))
    if last_blocks == 1:  # also with no blocks at all (a text tower of depth 0)
        kept.append(norm(x))
    if packing is not None:
        kept = [packing.unpack(k) for k in kept]
    return kept[0] if last_blocks == 1 else torch.stack(kept)


def build_encoder(name: str, image_size: int, depth: int | None = None, init_std: float = 0.02) -> VisionTransformer:
    return VisionTransformer(parse_encoder_name(name, depth), image_size, init_std)
