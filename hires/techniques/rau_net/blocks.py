"""RAU-Net, HiDiffusion's resolution-aware UNet: in the early steps the deep levels of the UNet run
on a feature map of about the base size, so they lay out one object instead of repeating it.

Two switches, each active in a [start, stop) window of the call's schedule fractions (family facts
in hires.families.RAUNetFacts, or RAUNetConfig):
- the strided downsampler: the conv of one down block's downsampler runs at stride 4, dilation 2,
  padding 2 instead of stride 2 (output ceil(h / 4)); its matching upsampler (the up block at the
  mirrored level) then upsamples to the downsampler's input size, 4x;
- the pooled block: a cross-attention down block average-pools its features 2x (ceil mode) after
  its first resnet/attention pair, so its skip connections and everything deeper are pooled too; the
  matching up block resizes back (bicubic) to the size before pooling after the last pair that
  consumes the pooled block's skips, before the pair that takes the shallower skip.
While any switch is active every upsampler is given its mirrored downsampler's input size as its
output size, so sizes that do not divide evenly still meet their skip connections (HiDiffusion adds
12 to `unet.num_upsamplers` for this and never takes it back; nothing of the UNet changes here).

How it attaches: named hooks (`hires.rau_net.*`) on the downsamplers, the upsamplers and the first
/ last layer of the pooled pair, all through the attachment; the per-call plan and the recorded
sizes live in the call state, so an interrupted call leaves nothing behind. The conv's stride,
padding and dilation are changed only for the duration of its own forward (every kxk conv inside
the downsampler's conv module, so a peft LoRA wrapper runs as one kernel). Active only above the
base size; nothing here is random, so the call's generator alone decides the image.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from ...denoiser.outputs import output_tensor, with_tensor
from ...validation import closest_names
from .config import RAUNetConfig

HOOK_PREFIX = "hires.rau_net"
LOG_PLAN = "log.rau_net"
LOG_STEPS = "log.rau_net_steps"
RAU_STRIDE, RAU_DILATION, RAU_PADDING = 4, 2, 2


# -- math: pure functions ----------------------------------------------------------------------------

def in_window(fraction: float, window: tuple[float, float]) -> bool:
    """Whether a step at schedule `fraction` lies in the [start, stop) window."""
    start, stop = window
    return start <= fraction < stop


def steps_for_size(facts, side_scale: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """(downsampler window, pooled window) of a family's facts for the smaller side's scale."""
    if side_scale >= facts.extreme_scale:
        return facts.extreme_downsampler_steps, facts.extreme_pooled_steps
    return facts.downsampler_steps, facts.pooled_steps


def strided_conv(conv_forward, convs: list[torch.nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
    """Run `conv_forward(x)` with every conv in `convs` at RAU-Net's stride 4, dilation 2, padding 2."""
    saved = [(c.stride, c.padding, c.dilation) for c in convs]
    try:
        for conv in convs:
            conv.stride, conv.padding, conv.dilation = (RAU_STRIDE,) * 2, (RAU_PADDING,) * 2, (RAU_DILATION,) * 2
        return conv_forward(x)
    finally:
        for conv, (stride, padding, dilation) in zip(convs, saved):
            conv.stride, conv.padding, conv.dilation = stride, padding, dilation


def pool_features(x: torch.Tensor) -> torch.Tensor:
    """RAU-Net's 2x average pooling (ceil mode: odd sides keep their last row / column)."""
    return F.avg_pool2d(x, kernel_size=2, ceil_mode=True)


# -- which modules -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
    """The modules RAU-Net hooks on one UNet, resolved from the facts / config."""

    downsampler: str
    pooled_block: str
    pooled_first: str  # the module whose output is pooled: the pooled block's first attention (or resnet)
    # the module whose output is resized back: the matching up block's pair before the shallower skip
    restored_last: str
    upsampler_sources: dict[str, str]  # every up-block upsampler -> the downsampler at its mirrored level


def _pair_module(block: torch.nn.Module, name: str, index: int) -> str:
    attentions = getattr(block, "attentions", None)
    if attentions is not None and len(attentions) > index:
        return f"{name}.attentions.{index}"
    return f"{name}.resnets.{index}"


def resolve_layout(unet: torch.nn.Module, downsampler: str, pooled_block: str, family: str) -> Layout:
    """Check the module names against this UNet and find the matching up-path modules."""
    modules = dict(unet.named_modules())
    down_blocks, up_blocks = list(unet.down_blocks), list(unet.up_blocks)
    downsampler_names = [f"down_blocks.{i}.downsamplers.0" for i, b in enumerate(down_blocks)
                         if getattr(b, "downsamplers", None)]
    module = modules.get(downsampler)
    if downsampler not in downsampler_names:
        raise ValueError(
            f"RAUNetConfig.downsampler={downsampler!r} is no down-block downsampler of this {family} UNet; "
            f"its downsamplers are: {closest_names(downsampler, downsampler_names, n=len(downsampler_names))}")
    if not isinstance(getattr(module, "conv", None), torch.nn.Module) or not getattr(module, "use_conv", True):
        raise ValueError(f"RAUNetConfig.downsampler={downsampler!r} pools instead of convolving; RAU-Net needs a "
                         "conv downsampler")
    block_names = [f"down_blocks.{i}" for i in range(len(down_blocks))]
    if pooled_block not in block_names:
        raise ValueError(f"RAUNetConfig.pooled_block={pooled_block!r} is no down block of this {family} UNet; "
                         f"its down blocks are: {', '.join(block_names)}")
    depth = len(down_blocks)
    index = block_names.index(pooled_block)
    up_name = f"up_blocks.{depth - 1 - index}"
    up_block = up_blocks[depth - 1 - index]
    # The up block takes the pooled block's skips in its first len(resnets) - 1 pairs.
    last_pooled_pair = len(up_block.resnets) - 2
    sources = {}
    for k, block in enumerate(up_blocks):
        if getattr(block, "upsamplers", None):
            mirrored = depth - 2 - k
            source = f"down_blocks.{mirrored}.downsamplers.0"
            if source not in downsampler_names:
                raise ValueError(f"RAU-Net: up_blocks.{k}'s upsampler has no mirrored downsampler ({source}) in this "
                                 f"{family} UNet, whose layout is not the symmetric UNet2DConditionModel one")
            sources[f"up_blocks.{k}.upsamplers.0"] = source
    return Layout(downsampler=downsampler, pooled_block=pooled_block,
                  pooled_first=_pair_module(down_blocks[index], pooled_block, 0),
                  restored_last=_pair_module(up_block, up_name, last_pooled_pair),
                  upsampler_sources=sources)


# -- per call -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _RAUNetCall:
    windows: tuple[tuple[float, float], tuple[float, float]] | None = None  # (downsampler, pooled)
    downsampler_inputs: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    pooled_size: tuple[int, int] | None = None
    step: int = -1
    strided: bool = False
    pooled: bool = False


class RAUNet:
    """The installed technique: resolves its plan per call and tells each hook what to do."""

    def __init__(self, attachment, config: RAUNetConfig):
        self.attachment = attachment
        self.config = config
        info = attachment.info
        facts = info.family.rau_net
        unet = attachment.denoiser
        self.layout = resolve_layout(unet, config.downsampler or facts.downsampler,
                                     config.pooled_block or facts.pooled_block, info.name)
        self.facts = facts
        modules = dict(unet.named_modules())
        self.downsampler_convs = [m for m in modules[self.layout.downsampler].conv.modules()
                                  if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
        add = attachment.add_hook
        for name in sorted(set(self.layout.upsampler_sources.values()) | {self.layout.downsampler}):
            add(modules[name], _DownsamplerHook(self, name), f"{HOOK_PREFIX}.downsampler.{name}")
        for name in self.layout.upsampler_sources:
            add(modules[name], _UpsamplerHook(self, name), f"{HOOK_PREFIX}.upsampler.{name}")
        add(modules[self.layout.pooled_first], _PoolHook(self), f"{HOOK_PREFIX}.pool")
        add(modules[self.layout.restored_last], _RestoreHook(self), f"{HOOK_PREFIX}.restore")

    def call(self) -> _RAUNetCall | None:
        """This step's settings, or None outside a call or at / below the base size."""
        state = self.attachment.state
        if state is None or state.area_scale <= 1:
            return None
        slot = state.slot(_RAUNetCall)
        if slot.windows is None:
            side_scale = min(state.scale_height, state.scale_width)
            preset = steps_for_size(self.facts, side_scale) if self.facts is not None else (None, None)
            slot.windows = (self.config.downsampler_steps or preset[0], self.config.pooled_steps or preset[1])
            state.log[LOG_PLAN] = {"downsampler": self.layout.downsampler, "downsampler_steps": slot.windows[0],
                                   "pooled_block": self.layout.pooled_block, "pooled_steps": slot.windows[1]}
        if slot.step != state.step_index:
            slot.step = state.step_index
            fraction = state.step_fraction()
            slot.strided = in_window(fraction, slot.windows[0])
            slot.pooled = in_window(fraction, slot.windows[1])
            if slot.strided or slot.pooled:
                steps = state.log.setdefault(LOG_STEPS, {"strided": [], "pooled": []})
                for kind, on in (("strided", slot.strided), ("pooled", slot.pooled)):
                    if on and state.step_index not in steps[kind]:
                        steps[kind].append(state.step_index)
        return slot


class _DownsamplerHook(ModelHook):
    """Records the input size (for the mirrored upsampler); the RAU downsampler also runs strided."""

    def __init__(self, controller: RAUNet, name: str):
        super().__init__()
        self.controller = controller
        self.name = name

    def new_forward(self, module, hidden_states, *args, **kwargs):
        original = self.fn_ref.original_forward
        call = self.controller.call()
        if call is None:
            return original(hidden_states, *args, **kwargs)
        call.downsampler_inputs[self.name] = tuple(hidden_states.shape[-2:])
        if call.strided and self.name == self.controller.layout.downsampler:
            return strided_conv(lambda x: original(x, *args, **kwargs), self.controller.downsampler_convs,
                                hidden_states)
        return original(hidden_states, *args, **kwargs)


class _UpsamplerHook(ModelHook):
    """While RAU-Net acts, upsample to the mirrored downsampler's input size (the skip's size)."""

    def __init__(self, controller: RAUNet, name: str):
        super().__init__()
        self.controller = controller
        self.source = controller.layout.upsampler_sources[name]

    def new_forward(self, module, hidden_states, output_size=None, *args, **kwargs):
        call = self.controller.call()
        if call is not None and (call.strided or call.pooled) and self.source in call.downsampler_inputs:
            output_size = call.downsampler_inputs[self.source]
        return self.fn_ref.original_forward(hidden_states, output_size, *args, **kwargs)


class _PoolHook(ModelHook):
    """Average-pools the output of the pooled block's first pair (its skip and what follows)."""

    def __init__(self, controller: RAUNet):
        super().__init__()
        self.controller = controller

    def post_forward(self, module, output):
        call = self.controller.call()
        if call is None or not call.pooled:
            return output
        features = output_tensor(output)
        call.pooled_size = tuple(features.shape[-2:])
        return with_tensor(output, pool_features(features))


class _RestoreHook(ModelHook):
    """Resizes the matching up block's features back to the size before pooling."""

    def __init__(self, controller: RAUNet):
        super().__init__()
        self.controller = controller

    def post_forward(self, module, output):
        call = self.controller.call()
        if call is None or not call.pooled or call.pooled_size is None:
            return output
        features = output_tensor(output)
        mode = self.controller.config.upsample_mode
        resized = F.interpolate(features, size=call.pooled_size, mode=mode,
                                **({} if mode == "nearest" else {"align_corners": False}))
        return with_tensor(output, resized)


def install(attachment, config: RAUNetConfig) -> RAUNet:
    if getattr(attachment.pipe, "controlnet", None) is not None:
        raise ValueError(
            f"RAUNetConfig on {type(attachment.pipe).__name__}: the ControlNet's residuals are computed at the full "
            "resolution and cannot be added to RAU-Net's downsampled skip connections; use RAU-Net without "
            "ControlNet, or RedilationConfig / progressive structure guidance with it")
    return RAUNet(attachment, config)
