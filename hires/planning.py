"""Installers of the memory technique and of VAE tiling: the planner decides, the mechanisms act.

hires.memory_planner estimates peaks and chooses (VAE tiling, feed-forward chunks, sequential CFG);
hires.techniques.memory and hires.techniques.tiled_vae carry those choices out. This module, above
both, connects them, so neither mechanism imports the planner.
"""

from __future__ import annotations

import dataclasses
import functools

from diffusers.hooks import ModelHook

from . import memory_planner
from .config import MemoryConfig, VAETilingConfig
from .registry import Technique
from .techniques import tiled_vae
from .techniques.memory import (
    FF_HOOK,
    SEQUENTIAL_CFG_HOOK,
    Choices,
    FeedForwardChunkHook,
    SequentialCFGHook,
    chunkable_blocks,
)

PLAN_HOOK = "hires.memory_plan"


@dataclasses.dataclass
class _MemoryCall:
    plan: object = None  # the call's memory plan, made at its first denoiser call


class MemoryPlanHook(ModelHook):
    """At a call's first denoiser step: plan for the call's size, refuse what cannot fit, set the choices."""

    def __init__(self, attachment, config, choices: Choices, sequential_allowed: bool):
        super().__init__()
        self.attachment = attachment
        self.config = config
        self.choices = choices
        self.sequential_allowed = sequential_allowed

    def pre_forward(self, module, *args, **kwargs):
        state = self.attachment.state
        if state is None or state.slot(_MemoryCall).plan is not None:
            return args, kwargs
        plan = memory_planner.plan_for_call(self.attachment, self.config, state, args, kwargs,
                                            sequential_allowed=self.sequential_allowed)
        state.slot(_MemoryCall).plan = plan
        state.log["log.memory_plan"] = plan.summary()
        self.choices.feed_forward_chunks = plan.feed_forward_chunks
        self.choices.sequential_cfg = plan.sequential_cfg
        return args, kwargs


def _tiling_decision(max_memory: int | None):
    return functools.partial(_decide, max_memory=max_memory)


def _decide(vae, kind, shape, dtype, tile_size, max_memory):
    return memory_planner.vae_tiling_decision(vae, kind, shape, dtype, max_memory=max_memory, tile_size=tile_size)


def install_memory(attachment, config: MemoryConfig) -> None:
    """Installer of `MemoryConfig`.

    Per call, at the first denoiser step (the size is known only then), the planner estimates the
    call's peak and refuses it with the numbers if it cannot fit; otherwise its choices of
    feed-forward chunks and sequential CFG (those left None in the config) apply to that call. VAE
    tiling in mode "auto" is decided per decode from the planner's VAE estimate.
    """
    denoiser = attachment.denoiser
    choices = Choices()
    blocks = chunkable_blocks(denoiser)
    if config.feed_forward_chunks is not None and config.feed_forward_chunks > 1 and not blocks:
        raise ValueError(
            f"MemoryConfig.feed_forward_chunks={config.feed_forward_chunks}: {type(denoiser).__name__} has no blocks "
            f"with diffusers' feed-forward chunking (set_chunk_feed_forward); use feed_forward_chunks=None or 1"
        )
    if config.feed_forward_chunks != 1:
        for block in blocks:
            attachment.add_hook(block, FeedForwardChunkHook(choices), FF_HOOK)
    batched = attachment.info.family.guidance_layout == "batched"
    clashing = attachment.enabled_with("whole_cfg_batch")
    if config.sequential_cfg and batched and clashing:
        raise ValueError(
            f"MemoryConfig.sequential_cfg=True cannot be combined with {', '.join(clashing)} (it needs both CFG "
            f"halves in one denoiser call); use sequential_cfg=False or None"
        )
    sequential_allowed = batched and not clashing and config.sequential_cfg is not False
    if sequential_allowed:
        attachment.add_hook(denoiser, SequentialCFGHook(choices), SEQUENTIAL_CFG_HOOK)
    # Registered after the sequential hook, so it sees the whole batch.
    attachment.add_hook(denoiser, MemoryPlanHook(attachment, config, choices, sequential_allowed), PLAN_HOOK)
    if not attachment.config.vae_tiling.enabled:
        # An enabled VAETilingConfig installs its own (after this one) with its mode and sizes.
        tiled_vae.install_tiling(attachment, "auto", None, _tiling_decision(config.max_memory))


def install_vae_tiling(attachment, config: VAETilingConfig) -> None:
    """Installer of `VAETilingConfig`: tiled decode/encode on the pipeline's VAE."""
    memory = attachment.config.memory
    max_memory = memory.max_memory if memory.enabled else None
    tiled_vae.install_tiling(attachment, config.mode, config.tile_size, _tiling_decision(max_memory), config.halo)


TECHNIQUES = [
    Technique("memory", MemoryConfig, install_memory, order=90, capabilities=frozenset({"vae"})),
    Technique("vae_tiling", VAETilingConfig, install_vae_tiling, order=100, capabilities=frozenset({"vae"})),
]
