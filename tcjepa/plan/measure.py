"""Measurement, to check the analytic counts: the bytes a real training step saves for backward,
through saved-tensor hooks (:func:`saved_tensor_bytes`) on a CPU step (:func:`probe_step`,
:func:`measure_activations`), or as on a GPU under bf16 autocast on fake CUDA tensors
(:func:`measure_activations_cuda_bf16`). benchmarks/bench_plan_memory.py compares them with
:func:`~tcjepa.plan.activations.activation_memory`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tcjepa.config import Config, ConfigError, captions_per_image
from tcjepa.plan.activations import Activations, activation_memory
from tcjepa.plan.model import inventory
from tcjepa.plan.tokens import TokenStats, stats_of_masks


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
