"""The guidance hook: where guidance techniques see both classifier-free-guidance halves.

Classic pipelines combine the denoiser's outputs themselves as `uncond + w * (cond - uncond)`.
A guidance technique therefore works inside one denoiser hook (DESIGN.md's guidance rule): the hook
collects the pair, computes the guided prediction

    G = combiner(uncond, cond, w, state) + sum of active offsets

and hands back outputs whose combination *by the pipeline* is exactly G:

- "batched" layout (one call on [uncond, cond]): it returns [u, u + (G - u) / w], since
  u + w * ((u + (G - u) / w) - u) = G;
- "separate" layout (Flux true CFG: a cond call, then an uncond call at the same step): the cond
  output passes through and the uncond output is replaced by (G - w c) / (1 - w), since
  u' + w (c - u') = (1 - w) u' + w c = G.

Techniques plug in through `ensure_guidance_hook(attachment)`:
- `set_combiner(fn, owner, active=None)`: fn(uncond, cond, w, state) -> guided tensor, or None for
  plain CFG at this step (APG sets it). A combiner needs CFG: a call without it raises, naming
  `owner`, unless `active(state)` says the combiner sits this call out (APG off in one stage).
- `add_offset(name, fn)`: fn(run, args, kwargs, uncond, cond, state) -> tensor added to G, or None
  when inactive at this step; `run(args, kwargs)` calls everything below this hook (the denoiser's
  own forward) and returns its raw output, so an offset may run an extra pass. Noise-damped
  guidance adds (weak-dilation uncond - uncond), so with APG on too, APG acts on the pair the
  pipeline's own pass produced (the strong-dilation pair) and the offset is added afterwards.

uncond/cond given to combiners and offsets hold the prediction channels only (PixArt-Sigma's
learned-sigma channels are left as the model produced them); offsets return that shape. While a
combiner or offset runs, `state.slot(GuidanceCall).step` holds a `GuidanceStep` (the latent the pair was
predicted from, and the timestep), e.g. to convert predictions to x0. With nothing active at a
step the model's outputs pass through untouched, so steps (and calls) without guidance changes
are bit-identical to plain diffusers.

A pipeline that reads the cond half again after combining sees the returned cond, not the raw one:
SD3's skip-layer guidance adds (cond - skip-layer cond) * scale, so with a guidance technique on,
that term uses u + (G - u) / w. Batched calls whose two latent halves differ (SD3's skip-layer pass
itself) are not CFG pairs and pass through.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook

from .outputs import output_tensor, with_tensor

GUIDANCE_HOOK = "hires.guidance"

Combiner = Callable[[torch.Tensor, torch.Tensor, float, Any], "torch.Tensor | None"]
Offset = Callable[..., "torch.Tensor | None"]


@dataclasses.dataclass
class GuidanceStep:
    """What a combiner may need beyond the two predictions."""

    sample: torch.Tensor  # the latent the pair was predicted from (one half's batch), prediction channels
    timestep: float  # in scheduler units (the denoiser's timestep argument / the family's input scale)
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class GuidanceCall:
    """Per-call slot of the guidance hook (`state.slot(GuidanceCall)`)."""

    step: GuidanceStep | None = None  # while a combiner or offset runs
    pending_cond: torch.Tensor | None = None  # separate layout: the cond output waiting for its uncond call


def plain_cfg(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def ensure_guidance_hook(attachment) -> "GuidanceHook":
    """The attachment's guidance hook on its denoiser, installed on first use."""
    registry = getattr(attachment.denoiser, "_diffusers_hook", None)
    hook = registry.get_hook(GUIDANCE_HOOK) if registry is not None else None
    if hook is None or hook.attachment is not attachment:
        hook = GuidanceHook(attachment)
        attachment.add_hook(attachment.denoiser, hook, GUIDANCE_HOOK)
    return hook


def prediction_channels(denoiser_config) -> int | None:
    """Channels that carry the prediction; None when all do.

    Models with learned variance (PixArt-Sigma) output twice their input channels, the second half
    being the variance the pipeline drops; the same test the pipelines use.
    """
    get = denoiser_config.get if isinstance(denoiser_config,
                                            dict) else lambda k, d=None: getattr(denoiser_config, k, d)
    inputs, outputs = get("in_channels"), get("out_channels")
    return inputs if inputs and outputs and outputs == 2 * inputs else None


def pipeline_runs_cfg(attachment, state) -> float | None:
    """The guidance scale the pipeline combines with in this call, or None without CFG."""
    scale = state.guidance_scale
    # Pipelines that expose it also turn CFG off for guidance-embedded UNets despite scale > 1.
    if scale is not None and getattr(attachment.pipe, "do_classifier_free_guidance", True) is False:
        return None
    return scale


def _no_guidance_error(owner: str, attachment, state) -> ValueError:
    family = attachment.info.family
    name = family.guidance_scale_name
    value = state.call_locals.get(name)
    if family.cfg_separate and family.cfg_switch:
        remedy = (f"pass {name} > 1 together with a negative_prompt (true classifier-free guidance), "
                  f"or disable {owner}")
        got = f"{name}={value!r}, negative prompt given: {bool(state.call_locals.get(family.cfg_switch, False))}"
    else:
        remedy = f"pass {name} > 1, or disable {owner}"
        got = f"{name}={value!r}"
    return ValueError(f"{owner} needs classifier-free guidance, but this {type(attachment.pipe).__name__} call runs "
                      f"without it ({got}); {remedy}")


def _sample(arguments: dict) -> torch.Tensor:
    """The latent argument: the denoiser's first parameter (sample / hidden_states)."""
    return next(v for k, v in arguments.items() if k != "self")


class GuidanceHook(ModelHook):
    """Sees the CFG pair on the denoiser and returns outputs the pipeline combines into G."""

    def __init__(self, attachment):
        super().__init__()
        self.attachment = attachment
        self.separate = attachment.info.family.cfg_separate  # a cond call, then an uncond call (true CFG)
        self.cond_first = attachment.info.family.cfg_cond_first
        self.timestep_input_scale = attachment.info.family.timestep_input_scale
        self.channels = prediction_channels(attachment.denoiser.config)
        self.combiner: Combiner | None = None
        self.combiner_owner: str | None = None
        self.combiner_active: Callable[[Any], bool] = lambda state: True
        self.offsets: dict[str, Offset] = {}
        self._signature = inspect.signature(type(attachment.denoiser).forward)

    # -- what techniques call ------------------------------------------------------------------
    def set_combiner(self, fn: Combiner, owner: str, active: Callable[[Any], bool] | None = None) -> None:
        if self.combiner is not None and self.combiner_owner != owner:
            raise ValueError(f"{owner} and {self.combiner_owner} both replace how the CFG pair combines; enable one")
        self.combiner, self.combiner_owner = fn, owner
        self.combiner_active = active or (lambda state: True)

    def add_offset(self, name: str, fn: Offset) -> None:
        self.offsets[name] = fn

    def run_inner(self, args: tuple, kwargs: dict):
        """Everything below this hook: the denoiser's raw output for these arguments."""
        return self.fn_ref.original_forward(*args, **kwargs)

    # -- the hook ------------------------------------------------------------------------------
    def new_forward(self, module, *args, **kwargs):
        output = self.fn_ref.original_forward(*args, **kwargs)
        state = self.attachment.state
        if state is None or (self.combiner is None and not self.offsets):
            return output
        scale = pipeline_runs_cfg(self.attachment, state)
        if scale is None:
            if self.combiner is not None and self.combiner_active(state):
                raise _no_guidance_error(self.combiner_owner, self.attachment, state)
            return output
        if self.separate:
            return self._separate(output, scale, state, args, kwargs)
        return self._batched(output, scale, state, args, kwargs)

    def _bound(self, module_args: tuple, kwargs: dict) -> dict:
        return self._signature.bind_partial(self.attachment.denoiser, *module_args, **kwargs).arguments

    def _step(self, args, kwargs, arguments: dict, half: slice | None) -> GuidanceStep:
        sample = _sample(arguments)
        if half is not None:
            sample = sample[half]
        timestep = arguments.get(self.attachment.info.family.timestep_argument)
        t = float("nan") if timestep is None else float(torch.as_tensor(timestep).flatten()[0])
        t /= self.timestep_input_scale
        return GuidanceStep(sample=self._prediction(sample), timestep=t, args=args, kwargs=kwargs)

    def _prediction(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.channels is None else tensor[:, : self.channels]

    def _guided(self, uncond, cond, scale, state, step: GuidanceStep) -> torch.Tensor | None:
        """G in float32, or None when no combiner or offset is active at this step."""
        slot = state.slot(GuidanceCall)
        slot.step = step
        try:
            combined = self.combiner(uncond, cond, scale, state) if self.combiner is not None else None
            offsets = [fn(self.run_inner, step.args, step.kwargs, uncond, cond, state) for fn in self.offsets.values()]
        finally:
            slot.step = None
        offsets = [o for o in offsets if o is not None]
        if combined is None and not offsets:
            return None
        guided = combined.float() if combined is not None else plain_cfg(uncond.float(), cond.float(), scale)
        for offset in offsets:
            guided = guided + offset.float()
        return guided

    def _batched(self, output, scale, state, args, kwargs):
        tensor = output_tensor(output)
        batch = tensor.shape[0]
        if batch % 2:
            return output
        half = batch // 2
        arguments = self._bound(args, kwargs)
        sample = _sample(arguments)
        # A CFG call duplicates the latent; any other call (e.g. SD3's skip-layer pass) is not a pair.
        if not torch.equal(sample[:half], sample[half:]):
            return output
        # [uncond, cond], or [cond, uncond] where the family stacks the cond half first (Z-Image)
        uncond_half, cond_half = (slice(half, None),
                                  slice(0, half)) if self.cond_first else (slice(0, half), slice(half, None))
        uncond, cond = self._prediction(tensor[uncond_half]), self._prediction(tensor[cond_half])
        guided = self._guided(uncond, cond, scale, state, self._step(args, kwargs, arguments, slice(0, half)))
        if guided is None:
            return output
        u = uncond.float()
        new_cond = (u + (guided - u) / scale).to(tensor.dtype)
        result = tensor.clone()
        if self.channels is None:
            result[cond_half] = new_cond
        else:
            result[cond_half, : self.channels] = new_cond
        return with_tensor(output, result)

    def _separate(self, output, scale, state, args, kwargs):
        tensor = output_tensor(output)
        slot = state.slot(GuidanceCall)
        pending, slot.pending_cond = slot.pending_cond, None
        if pending is None:  # the cond call of this step: keep it for the uncond call that follows
            slot.pending_cond = tensor
            return output
        cond, uncond = self._prediction(pending), self._prediction(tensor)
        guided = self._guided(uncond, cond, scale, state, self._step(args, kwargs, self._bound(args, kwargs), None))
        if guided is None:
            return output
        new_uncond = ((guided - scale * cond.float()) / (1.0 - scale)).to(tensor.dtype)
        if self.channels is None:
            result = new_uncond
        else:
            result = tensor.clone()
            result[:, : self.channels] = new_uncond
        return with_tensor(output, result)
