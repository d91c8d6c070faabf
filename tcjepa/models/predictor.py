"""The I-JEPA predictor: a narrow ViT over the context tokens plus one mask token per target
patch, each carrying its target position; it predicts the teacher's features there.

Each target block is predicted in its own sequence (context + that block's mask tokens), as
in facebookresearch/ijepa, so blocks do not see each other. Sequences are laid out
sample-major ``[B * T]``. Padded context or target entries (see ``tcjepa.masks``) are masked
as attention keys and ignored by the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from tcjepa.models.text import TextFeatures
from tcjepa.models.attention import Packing
from tcjepa.models.vit import Block, gather_tokens, init_weights, rescale_residual_branches, sincos_pos_embed_2d


class Predictor(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        grid: tuple[int, int],
        width: int = 384,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        init_std: float = 0.02,
        out_dim: int | None = None,
    ):
        """``out_dim``: width of the predicted features (default ``embed_dim``): the teacher's width
        when it differs from the student's (SALT stage 2), patch pixels for pixel reconstruction."""
        super().__init__()
        self.width = width
        self.predictor_embed = nn.Linear(embed_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.register_buffer("predictor_pos_embed", sincos_pos_embed_2d(width, *grid)[None], persistent=False)
        self.predictor_blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(width, eps=1e-6)
        self.predictor_proj = nn.Linear(width, out_dim or embed_dim)
        init_weights(self, init_std)
        nn.init.trunc_normal_(self.mask_token, std=init_std)
        rescale_residual_branches(self.predictor_blocks)
        self.conditioners = nn.ModuleDict()  # str(block index) -> TextConditioner, attached by TC-JEPA

    def forward(
        self,
        context: torch.Tensor,
        context_idx: torch.Tensor,
        target_idx: torch.Tensor,
        context_valid: torch.Tensor | None = None,
        target_valid: torch.Tensor | None = None,
        text: TextFeatures | None = None,
    ) -> torch.Tensor:
        """context [B, Nc, D] encoder features at ``context_idx`` [B, Nc];
        target_idx [B, T, Nt] -> predictions [B, T, Nt, out_dim]; ``text`` conditions (TC-JEPA)."""
        B, Nc, _ = context.shape
        T, Nt = target_idx.shape[1], target_idx.shape[2]
        pos = self.predictor_pos_embed.to(context.dtype).expand(B, -1, -1)

        x = self.predictor_embed(context) + gather_tokens(pos, context_idx)
        x = x.unsqueeze(1).expand(B, T, Nc, self.width).reshape(B * T, Nc, self.width)
        targets = gather_tokens(pos, target_idx.reshape(B, T * Nt)).reshape(B * T, Nt, self.width)
        x = torch.cat([x, self.mask_token.to(x.dtype) + targets], dim=1)

        packing = None
        if context_valid is not None or target_valid is not None:
            cv = context_valid if context_valid is not None else torch.ones(B, Nc, dtype=torch.bool, device=x.device)
            tv = target_valid if target_valid is not None else torch.ones(B, T, Nt, dtype=torch.bool, device=x.device)
            packing = Packing(sequence_valid(cv, tv))
            x = packing.pack(x)

        for i, block in enumerate(self.predictor_blocks):
            x = block(x, packing)
            if text is not None and str(i) in self.conditioners:
                x = self.conditioners[str(i)](x, text.features, text.valid, text.has_text, packing)
        if packing is not None:
            x = packing.unpack(x)
        x = self.predictor_proj(self.predictor_norm(x[:, Nc:]))
        return x.reshape(B, T, Nt, -1)


def sequence_valid(context_valid: torch.Tensor, target_valid: torch.Tensor) -> torch.Tensor:
    """Real entries of the predictor's sequences: context [B, Nc] and target [B, T, Nt] masks ->
    [B * T, Nc + Nt], one sequence per target block (context, then that block's mask tokens)."""
    (B, Nc), (T, Nt) = context_valid.shape, target_valid.shape[1:]
    return torch.cat([context_valid.unsqueeze(1).expand(B, T, Nc).reshape(B * T, Nc), target_valid.reshape(B * T, Nt)], 1)
