"""Installers of the memory technique and of VAE tiling: the planner decides, the mechanisms act.

`estimate` estimates peaks and chooses (VAE tiling, feed-forward chunks, sequential CFG); `chunking`
and `tiled_vae` carry those choices out. This module connects them, so neither mechanism imports the
planner.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from diffusers.hooks import ModelHook

from . import estimate as memory_planner
from . import tiled_vae
from ...sampling.stages import planner_of
from .chunking import (
    FF_HOOK,
    SEQUENTIAL_CFG_HOOK,
    Choices,
    FeedForwardChunkHook,
    SequentialCFGHook,
    chunkable_blocks,
)
from .config import MemoryConfig, VAETilingConfig

PLAN_HOOK = "hires.memory_plan"
PLANNER_NAME = "memory"


# -- the VAE passes of a call ---------------------------------------------------------------------
def call_passes(info, stages, batch: int, latent_channels: int, decodes: bool = True,
                uses_cfg=None) -> tuple[list[memory_planner.DenoiserPass], list[memory_planner.VAEPass]]:
    """The denoiser sizes and every VAE pass of a staged call: each stage's steps and what its start runs
    through the VAE (`Stage.vae_passes`, as its planner planned them), then the call's own decode at the
    last stage's size where `decodes`. `uses_cfg(stage)`: whether that stage's calls run CFG (None: the call's)."""
    factor = info.latent_factor

    def shape(kind, height, width):
        return (batch, latent_channels, height // factor,
                width // factor) if kind == "decode" else (batch, 3, height, width)

    denoiser = [memory_planner.DenoiserPass(s.height, s.width, f"stage {i + 1} steps",
                                            uses_cfg(s) if uses_cfg is not None else None)
                for i, s in enumerate(stages)]
    vae = [memory_planner.VAEPass(p.kind, shape(p.kind, p.height, p.width), f"stage {i + 1} {p.what}")
           for i, s in enumerate(stages) for p in s.vae_passes]
    if decodes:
        vae.append(memory_planner.VAEPass("decode", shape("decode", stages[-1].height, stages[-1].width),
                                          "the call's decode"))
    return denoiser, vae


def _call_batch(arguments: dict) -> int:
    embeds = arguments.get("prompt_embeds")
    prompt = arguments.get("prompt")
    prompts = embeds.shape[0] if embeds is not None else (len(prompt) if isinstance(prompt, (list, tuple)) else 1)
    return prompts * (arguments.get("num_images_per_prompt") or 1)


def _uses_cfg(family, arguments: dict, stage) -> bool:
    if not family.runs_cfg:  # Flux.2 [dev]: guidance_scale feeds the guidance embedding
        return False
    name = family.guidance_scale_name
    scale = stage.call_arguments.get(name, arguments.get(name))
    if scale is None or scale <= 1:
        return False
    if family.cfg_separate and family.cfg_switch:  # true CFG runs only with a negative prompt
        return arguments.get("negative_prompt") is not None or arguments.get("negative_prompt_embeds") is not None
    return True


class CallMemoryPlanner:
    """A planner of the stage engine that changes no stage: it plans the whole staged call (every
    stage's denoiser and every VAE pass) once the other planners have made the plan, and refuses it
    with the numbers before anything runs."""

    def __init__(self, attachment, config: MemoryConfig, sequential_allowed: bool):
        self.attachment = attachment
        self.config = config
        self.sequential_allowed = sequential_allowed
        self.current: memory_planner.CallPlan | None = None  # the running staged call's plan

    def plan(self, request, stages: list) -> list:
        self.current = None
        if len(stages) == 1 and stages[0].trivial:
            return stages  # a plain call: its own first step plans it
        self.current = self.plan_stages(request, stages)
        return stages

    def plan_stages(self, request, stages: list) -> memory_planner.CallPlan:
        attachment, pipe = self.attachment, self.attachment.pipe
        info, denoiser = attachment.info, attachment.denoiser
        height, width, arguments = request.height, request.width, request.arguments
        batch = _call_batch(arguments)
        denoiser_passes, vae_passes = call_passes(
            info, stages, batch, pipe.vae.config.latent_channels, decodes=arguments.get("output_type") != "latent",
            uses_cfg=lambda stage: _uses_cfg(info.family, arguments, stage))
        device = torch.device(pipe._execution_device)
        budget, other = memory_planner.call_budget(pipe, denoiser, self.config, device)
        tiling = attachment.config.vae_tiling
        return memory_planner.plan_call(
            denoiser, pipe.vae, denoiser_passes=denoiser_passes, vae_passes=vae_passes,
            latent_factor=info.latent_factor, dtype=next(iter(denoiser.parameters())).dtype, batch=batch,
            cfg_batched=info.family.cfg_batched, budget=budget, other_weights=other,
            tile_vae=None if not tiling.enabled or tiling.mode == "auto" else tiling.mode == "always",
            tile_size=tiling.tile_size if tiling.enabled else None,
            feed_forward_chunks=self.config.feed_forward_chunks,
            sequential_cfg=self.config.sequential_cfg if self.sequential_allowed else False,
            name=f"{width}x{height} {info.name} in {len(stages)} stages", device_type=device.type,
            adaptations=attachment.estimate_adaptations)


def call_plan(pipe) -> memory_planner.CallPlan | None:
    """The whole-call memory plan of the last staged call on `pipe` (None: none, or memory is off)."""
    planner = planner_of(pipe, PLANNER_NAME)
    return planner.current if planner is not None else None


@dataclasses.dataclass
class _MemoryCall:
    plan: object = None  # the call's memory plan, made at its first denoiser call


class MemoryPlanHook(ModelHook):
    """At a call's first denoiser step: plan for the call's size, refuse what cannot fit, set the
    choices. A stage call takes its choices from the whole call's plan (`CallMemoryPlanner`)."""

    def __init__(self, attachment, config, choices: Choices, sequential_allowed: bool,
                 call_planner: CallMemoryPlanner | None = None):
        super().__init__()
        self.attachment = attachment
        self.config = config
        self.choices = choices
        self.sequential_allowed = sequential_allowed
        self.call_planner = call_planner

    def _stage_pass(self, state):
        whole = self.call_planner.current if self.call_planner is not None and state.stage is not None else None
        if whole is None:
            return None, None
        size = (state.height, state.width)
        return whole, next((p for p in whole.denoiser_passes() if p.shape == size), None)

    def pre_forward(self, module, *args, **kwargs):
        state = self.attachment.state
        if state is None or state.slot(_MemoryCall).plan is not None:
            return args, kwargs
        whole, stage_pass = self._stage_pass(state)
        if stage_pass is None and self.config.above_base_only and not _above_base(self.attachment, state):
            self.choices.feed_forward_chunks, self.choices.sequential_cfg = 1, False
            return args, kwargs
        if stage_pass is not None:
            plan, chosen = whole, stage_pass
            state.log["log.memory_call_plan"] = whole.summary()
        else:
            call = self.attachment.calls.current()
            decodes = state.stage is None and (call is None or call.arguments().get("output_type") != "latent")
            plan = memory_planner.plan_for_call(self.attachment, self.config, state, args, kwargs,
                                                sequential_allowed=self.sequential_allowed, decodes=decodes)
            chosen = plan.denoiser_passes()[0]
        state.slot(_MemoryCall).plan = plan
        state.log["log.memory_plan"] = chosen.line() + f"; budget {memory_planner.format_bytes(plan.budget)}"
        self.choices.feed_forward_chunks = chosen.feed_forward_chunks
        self.choices.sequential_cfg = bool(chosen.sequential_cfg)
        return args, kwargs


def _above_base(attachment, state) -> bool:
    info = attachment.info
    return state.height * state.width > info.base_height * info.base_width


def _tiling_decision(attachment, max_memory: int | None, above_base_only: bool = False):
    return functools.partial(_decide, attachment=attachment, max_memory=max_memory, above_base_only=above_base_only)


def _decide(vae, kind, shape, dtype, tile_size, attachment, max_memory, above_base_only=False):
    """One VAE pass's tiling, against the budget less every other weight on the VAE's device (the
    denoiser stays resident while the VAE runs)."""
    state = attachment.state
    if above_base_only and (state is None or not _above_base(attachment, state)):
        return None
    resident = 0
    if max_memory is not None:
        device = next(iter(vae.parameters())).device
        resident = memory_planner.pipeline_weights(attachment.pipe,
                                                   device) - memory_planner.bytes_on_device(vae, device)
    return memory_planner.vae_tiling_decision(vae, kind, shape, dtype, max_memory=max_memory, tile_size=tile_size,
                                              resident=resident)


def install_memory(attachment, config: MemoryConfig) -> None:
    """Installer of `MemoryConfig`.

    Per call, at the first denoiser step (the size is known only then), the planner estimates the
    call's peak and refuses it with the numbers if it cannot fit; otherwise its choices of
    feed-forward chunks and sequential CFG (those left None in the config) apply to that call. A
    staged call (structure guidance, bottleneck) is planned whole before its first stage runs:
    every stage's denoiser and every VAE decode and encode (`CallMemoryPlanner`), and each stage
    takes its choices from that plan. VAE tiling in mode "auto" is decided per decode and per encode
    from the planner's estimate of that pass.
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
    batched = attachment.info.family.cfg_batched
    clashing = attachment.enabled_with("whole_cfg_batch")
    if config.sequential_cfg and batched and clashing:
        raise ValueError(
            f"MemoryConfig.sequential_cfg=True cannot be combined with {', '.join(clashing)} (it needs both CFG "
            f"halves in one denoiser call); use sequential_cfg=False or None"
        )
    sequential_allowed = batched and not clashing and config.sequential_cfg is not False
    if sequential_allowed:
        attachment.add_hook(denoiser, SequentialCFGHook(choices), SEQUENTIAL_CFG_HOOK)
    call_planner = None
    if attachment.stages is not None:
        # Staged techniques install first (lower order), so this planner sees their finished plan.
        call_planner = CallMemoryPlanner(attachment, config, sequential_allowed)
        attachment.stages.add_planner(PLANNER_NAME, call_planner)
    # Registered after the sequential hook, so it sees the whole batch.
    attachment.add_hook(denoiser, MemoryPlanHook(attachment, config, choices,
                                                 sequential_allowed, call_planner), PLAN_HOOK)
    if not attachment.config.vae_tiling.enabled:
        # An enabled VAETilingConfig installs its own (after this one) with its mode and sizes.
        tiled_vae.install_tiling(attachment, "auto", None,
                                 _tiling_decision(attachment, config.max_memory, config.above_base_only))


def install_vae_tiling(attachment, config: VAETilingConfig) -> None:
    """Installer of `VAETilingConfig`: tiled decode/encode on the pipeline's VAE."""
    memory = attachment.config.memory
    max_memory = memory.max_memory if memory.enabled else None
    tiled_vae.install_tiling(attachment, config.mode, config.tile_size,
                             _tiling_decision(attachment, max_memory), config.halo)
