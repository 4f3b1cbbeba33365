"""Re-dilation, progressive dilation, dispersed convolution and noise-damped guidance (ScaleCrafter).

During the early, structure-forming steps chosen 3x3 convolutions of the UNet (resnet conv1/conv2,
down/upsampler convs) run dilated, so they see as much of a large latent as they saw of a base-size
one. Everything goes through named hooks on those conv modules; nothing is swapped.

- Re-dilation by d: the conv runs at dilation ceil(d) with padding = dilation * (k - 1) / 2 (same
  output size). A fractional d first resizes the input bilinearly by ceil(d) / d and resizes the
  output back to input size // stride, as the official code does.
- Active steps: the first tau steps of the call, tau counted from the schedule fraction
  (step / num_steps < stop_fraction) or from a timestep threshold (timestep >= min_timestep).
- Progressive: at step i < tau the factor is max(ceil(d * (tau - i) / tau), 2), capped at d (which
  changes nothing for the official integer factors); factors <= 2 stay.
- Dispersion: during its steps a listed conv runs a 5x5 kernel R k (hires.techniques.redilation.dispersion) at
  dilation max(d_i / 2, 1), where d_i is its re-dilation factor at that step (1 if none), as the
  official runtime does.
- Noise-damped guidance: prediction = u_weak + w (c - u), (c, u) from the strongly dilated pass and
  u_weak from an extra unconditional pass with the weaker `ndcfg_dilations` map. It is an offset
  (u_weak - u) on the shared guidance hook (hires.denoiser.guidance), so APG, when on, acts on the
  strong pair.

The conv hook runs the module's own forward with the dilation and padding of every kxk conv inside
it changed for that call, so a peft LoRA wrapper (base conv + lora_A, which copies the base padding
but not its dilation) is dilated as one effective kernel. Dispersion needs the effective weight
itself: nn.Conv2d, or a peft LoRA conv (base + the active adapters' delta weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from ...denoiser.guidance import ensure_guidance_hook, pipeline_runs_cfg
from ...denoiser.outputs import output_tensor
from ...validation import closest_names
from .config import RedilationConfig
from .dispersion import disperse_kernel
from .presets import family_presets, map_to_depth, preset_for

HOOK_NAME = "hires.redilation"
NDCFG_OFFSET = "noise_damped_guidance"
# ScaleCrafter's candidates (all_valid_convs.txt): resnet conv1/conv2 and down/upsampler convs.
DILATABLE_CONV = re.compile(r"(?:^|\.)(?:resnets\.\d+\.conv[12]|downsamplers\.\d+\.conv|upsamplers\.\d+\.conv)$")
DISPERSED_KERNEL = 5


# -- math: pure functions -------------------------------------------------------------------------

def dilation_for_step(factor: float, step: int, active_steps: int, progressive: bool) -> float:
    """The dilation factor at loop index `step` (1.0: not dilated)."""
    if factor <= 1 or step >= active_steps or step < 0:
        return 1.0
    if not progressive or factor <= 2:
        return float(factor)
    # capped at the factor itself, which only matters for fractional factors (official ones are integers)
    return float(min(factor, max(math.ceil(factor * (active_steps - step) / active_steps), 2)))


def active_step_count(timesteps: torch.Tensor, stop_fraction: float | None, min_timestep: float | None) -> int:
    """tau: how many leading steps of this schedule are active (scheduler-agnostic)."""
    num_steps = len(timesteps)
    if min_timestep is not None:
        active = (timesteps >= min_timestep).tolist()
        return next((i for i, on in enumerate(active) if not on), num_steps)
    if stop_fraction is None:
        return 0
    return sum(1 for i in range(num_steps) if i / num_steps < stop_fraction)


def run_dilated(forward, convs: list[torch.nn.Conv2d], x: torch.Tensor, factor: float, stride: int) -> torch.Tensor:
    """Call `forward(x)` with every conv in `convs` at dilation ceil(factor), padding keeping the size.

    A fractional factor resizes the input by ceil(factor) / factor first and the output back to
    input size // stride afterwards (bilinear).
    """
    dilation = math.ceil(factor - 1e-9)
    height, width = x.shape[-2:]
    resized = dilation != factor
    if resized:
        x = F.interpolate(x, size=(int(height * dilation / factor), int(width * dilation / factor)),
                          mode="bilinear")
    saved = [(conv.dilation, conv.padding) for conv in convs]
    try:
        for conv in convs:
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation * (conv.kernel_size[0] - 1) // 2, dilation * (conv.kernel_size[1] - 1) // 2)
        out = forward(x)
    finally:
        for conv, (old_dilation, old_padding) in zip(convs, saved):
            conv.dilation, conv.padding = old_dilation, old_padding
    if resized:
        out = F.interpolate(out, size=(height // stride, width // stride), mode="bilinear")
    return out


def dispersed_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, groups: int,
                   factor: float, eta: float) -> torch.Tensor:
    """The conv with its kernel dispersed to 5x5 and run at dilation `factor` (fractional rule)."""
    kernel = disperse_kernel(weight, eta=eta, large=DISPERSED_KERNEL)
    dilation = math.ceil(factor - 1e-9)
    height, width = x.shape[-2:]
    resized = dilation != factor
    if resized:
        x = F.interpolate(x, size=(int(height * dilation / factor), int(width * dilation / factor)), mode="bilinear")
    out = F.conv2d(x, kernel, bias, stride=stride, padding=dilation * (DISPERSED_KERNEL - 1) // 2,
                   dilation=dilation, groups=groups)
    if resized:
        out = F.interpolate(out, size=(height // stride, width // stride), mode="bilinear")
    return out


# -- the UNet's dilatable convs --------------------------------------------------------------------

def _kernel_convs(module: torch.nn.Module) -> list[torch.nn.Conv2d]:
    """The kxk (k > 1) Conv2d layers a module's forward runs: itself, or a wrapper's base and LoRA-A convs."""
    return [m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]


def _base_conv(module: torch.nn.Module) -> torch.nn.Conv2d | None:
    if isinstance(module, torch.nn.Conv2d):
        return module
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, torch.nn.Conv2d) else None


def dilatable_convs(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Module name -> module (the conv, or the LoRA wrapper around it) of every candidate 3x3 conv."""
    found = {}
    for name, module in unet.named_modules():
        base = _base_conv(module)
        if DILATABLE_CONV.search(name) and base is not None and base.kernel_size == (3, 3):
            found[name] = module
    return found


def _name_pool(conv_names) -> list[str]:
    """Every conv name and every block prefix of one: the names a config may use."""
    pool = set()
    for name in conv_names:
        parts = name.split(".")
        pool.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(pool)


def resolve_names(pairs, conv_names, where: str, family: str) -> dict[str, Any]:
    """(module name or prefix, value) pairs -> {conv name: value}; a name matching nothing is an error.

    A more specific name overrides a shorter prefix that also covers the conv.
    """
    resolved: dict[str, tuple[int, Any]] = {}
    for name, value in pairs:
        matched = [c for c in conv_names if c == name or c.startswith(name + ".")]
        if not matched:
            raise ValueError(
                f"{where} names {name!r}, which is no dilatable 3x3 conv (resnet conv1/conv2, down/upsampler "
                f"conv) of this {family} UNet nor a block containing one; closest valid names: "
                f"{closest_names(name, _name_pool(conv_names))}"
            )
        for conv in matched:
            if conv not in resolved or resolved[conv][0] <= len(name):
                resolved[conv] = (len(name), value)
    return {conv: value for conv, (_, value) in resolved.items()}


def resolve_preset_names(pairs, family: str, conv_names: list[str],
                         unet_depth: int) -> tuple[dict[str, Any], list[str]]:
    """A preset's (full-size name, value) pairs resolved on a UNet of `unet_depth` levels.

    Returns {conv name: value} and the preset names left out because this UNet lacks their level
    (none for a UNet of the family's full depth, where every name must exist).
    """
    table_depth = family_presets(family).depth
    mapped, left_out = [], []
    for name, value in pairs:
        target = map_to_depth(name, table_depth, unet_depth)
        if target is None:
            left_out.append(name)
        else:
            mapped.append((target, value))
    return resolve_names(mapped, conv_names, f"{family} re-dilation preset", family), left_out


# -- per-call settings -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CallPlan:
    """What re-dilation does in one call, resolved from the config and the preset for its size."""

    dilations: dict[str, float]  # conv name -> factor
    active_steps: int  # tau
    progressive: bool
    noise_damped_guidance: bool
    ndcfg_explicit: bool  # asked for in the config (not by the preset): no CFG is then an error
    ndcfg_dilations: dict[str, float]
    ndcfg_steps: int
    dispersion: frozenset[str]
    dispersion_steps: int
    preset: str
    left_out: tuple[str, ...]  # preset names for levels this UNet lacks

    def summary(self) -> dict[str, Any]:
        return {
            "preset": self.preset, "active_steps": self.active_steps, "progressive": self.progressive,
            "dilations": dict(sorted(self.dilations.items())), "noise_damped_guidance": self.noise_damped_guidance,
            "ndcfg_steps": self.ndcfg_steps, "ndcfg_dilations": dict(sorted(self.ndcfg_dilations.items())),
            "dispersion": sorted(self.dispersion), "dispersion_steps": self.dispersion_steps,
            "left_out": list(self.left_out),
        }


@dataclasses.dataclass
class _RedilationCall:
    plan: CallPlan | None = None
    checked: bool = False


class Redilation:
    """One attachment's re-dilation: the conv hooks' shared controller."""

    def __init__(self, attachment, config: RedilationConfig):
        self.attachment = attachment
        self.config = config
        self.info = attachment.info
        unet = attachment.denoiser
        self.convs = dilatable_convs(unet)
        if not self.convs:
            raise ValueError(f"RedilationConfig: the {self.info.name} denoiser {type(unet).__name__} has no "
                             "dilatable 3x3 convs (resnet conv1/conv2, down/upsampler convs)")
        self.depth = len(getattr(unet, "down_blocks", ()))
        self.table = family_presets(self.info.name)
        names = list(self.convs)
        where = "RedilationConfig"
        # Names the user gave are checked now, against this UNet.
        self.explicit_dilations = (None if config.dilations is None
                                   else resolve_names(config.dilations, names, f"{where}.dilations", self.info.name))
        self.explicit_ndcfg = (None if config.ndcfg_dilations is None
                               else resolve_names(config.ndcfg_dilations, names, f"{where}.ndcfg_dilations",
                                                  self.info.name))
        self.explicit_dispersion = (None if config.dispersion_modules is None
                                    else frozenset(resolve_names([(n, True) for n in config.dispersion_modules], names,
                                                                 f"{where}.dispersion_modules", self.info.name)))
        self.weak_pass = False
        self.hooked: dict[str, torch.nn.Module] = {}

    # which convs can ever be touched: hook only those
    def hooked_names(self) -> list[str]:
        names = set()
        for explicit in (self.explicit_dilations, self.explicit_ndcfg, self.explicit_dispersion):
            if explicit is not None:
                names.update(explicit)
        if None in (self.explicit_dilations, self.explicit_ndcfg, self.explicit_dispersion):
            for preset in self.table.presets:
                for pairs in (preset.dilations, preset.ndcfg_dilations,
                              [(n, True) for n in preset.dispersion_modules]):
                    names.update(self._resolve_preset(pairs)[0])
        return sorted(names)

    def may_use_ndcfg(self) -> bool:
        if self.config.noise_damped_guidance is not None:
            return bool(self.config.noise_damped_guidance)
        return any(p.noise_damped_guidance for p in self.table.presets)

    def _resolve_preset(self, pairs) -> tuple[dict[str, Any], list[str]]:
        return resolve_preset_names(pairs, self.info.name, list(self.convs), self.depth)

    def plan(self, state) -> CallPlan:
        """The call's plan, built once per call (kept in the call's slot)."""
        slot = state.slot(_RedilationCall)
        plan = slot.plan
        if plan is None:
            plan = slot.plan = self._build_plan(state)
            state.log["log.redilation.plan"] = plan.summary()
        return plan

    def _build_plan(self, state) -> CallPlan:
        config = self.config
        long_side, short_side = max(state.scale_height, state.scale_width), min(state.scale_height, state.scale_width)
        preset = preset_for(self.info.name, state.area_scale, long_side / short_side)
        left_out: list[str] = []

        def pick(explicit, pairs):
            if explicit is not None:
                return explicit
            resolved, dropped = self._resolve_preset(pairs)
            left_out.extend(dropped)
            return resolved

        dilations = pick(self.explicit_dilations, preset.dilations)
        ndcfg_dilations = pick(self.explicit_ndcfg, preset.ndcfg_dilations)
        dispersion = pick(self.explicit_dispersion, [(n, True) for n in preset.dispersion_modules])

        stop = config.stop_fraction if config.stop_fraction is not None else preset.stop_fraction
        min_timestep = config.min_timestep
        timesteps = state.timesteps
        tau = active_step_count(timesteps, None if min_timestep is not None else stop, min_timestep)

        ndcfg = preset.noise_damped_guidance if config.noise_damped_guidance is None else config.noise_damped_guidance

        def steps_for(fraction):  # NDCFG and dispersion default to the re-dilation window
            return tau if fraction is None else active_step_count(timesteps, fraction, None)
        return CallPlan(
            dilations={k: float(v) for k, v in dilations.items()},
            active_steps=tau,
            progressive=preset.progressive if config.progressive is None else bool(config.progressive),
            noise_damped_guidance=bool(ndcfg),
            ndcfg_explicit=config.noise_damped_guidance is not None,
            ndcfg_dilations={k: float(v) for k, v in ndcfg_dilations.items()},
            ndcfg_steps=steps_for(config.ndcfg_stop_fraction) if ndcfg else 0,
            dispersion=frozenset(dispersion),
            dispersion_steps=steps_for(config.dispersion_stop_fraction) if dispersion else 0,
            preset=preset.official_size,
            left_out=tuple(sorted(set(left_out))),
        )

    # -- what one conv does at the current step ------------------------------------------------
    def conv_action(self, name: str) -> tuple[str, float] | None:
        """("dilate" | "disperse", factor) for conv `name` now, or None for the plain conv."""
        state = self.attachment.state
        if state is None:
            return None
        plan = self.plan(state)
        step = state.step_index
        if self.weak_pass:
            factor = dilation_for_step(plan.ndcfg_dilations.get(name, 1.0), step, plan.ndcfg_steps, plan.progressive)
            return ("dilate", factor) if factor > 1 else None
        factor = dilation_for_step(plan.dilations.get(name, 1.0), step, plan.active_steps, plan.progressive)
        if name in plan.dispersion and step < plan.dispersion_steps:
            self._count(state, "dispersed", step)
            return "disperse", max(factor / 2, 1.0)
        if factor > 1:
            self._count(state, "dilated", step)
            return "dilate", factor
        return None

    @staticmethod
    def _count(state, what: str, step: int) -> None:
        counts = state.log.setdefault(f"log.redilation.{what}_convs_per_step", {})
        counts[step] = counts.get(step, 0) + 1

    # -- the denoiser-level check, once per call ---------------------------------------------------
    def on_denoiser_call(self) -> None:
        state = self.attachment.state
        if state is None:
            return
        plan = self.plan(state)
        slot = state.slot(_RedilationCall)
        if slot.checked:
            return
        slot.checked = True
        unet = self.attachment.denoiser
        for name, module in self.hooked.items():
            try:
                current = unet.get_submodule(name)
            except AttributeError:
                current = None
            if current is not module:
                raise RuntimeError(
                    f"the UNet's module {name!r} was replaced after hires.apply (for example by loading or unloading "
                    "a LoRA); call hires.apply(pipe, config) again so re-dilation hooks the current modules"
                )
        if plan.noise_damped_guidance and pipeline_runs_cfg(self.attachment, state) is None:
            if plan.ndcfg_explicit:
                scale_name = self.info.family.guidance_scale_name
                raise ValueError(
                    f"RedilationConfig.noise_damped_guidance=True needs classifier-free guidance, but this call runs "
                    f"without it ({scale_name}={state.call_locals.get(scale_name)!r}); pass {scale_name} > 1 or set "
                    "noise_damped_guidance=False"
                )
            state.log["log.redilation.ndcfg_skipped"] = "the preset's noise-damped guidance needs CFG (scale > 1)"

    # -- noise-damped guidance: an offset on the shared guidance hook -----------------------------
    def ndcfg_offset(self, run, args, kwargs, uncond, cond, state):
        plan = self.plan(state)
        if not plan.noise_damped_guidance or not 0 <= state.step_index < plan.ndcfg_steps:
            return None
        half = uncond.shape[0]
        # Only the uncond half of the weak pass is used: run that half alone.
        half_args, half_kwargs = _first_half(args, 2 * half), _first_half(kwargs, 2 * half)
        with self._weak():
            output = output_tensor(run(half_args, half_kwargs))
        steps = state.log.setdefault("log.redilation.ndcfg_steps", [])
        steps.append(state.step_index)
        weak_uncond = output[:, : uncond.shape[1]].to(uncond.dtype)
        return weak_uncond - uncond

    @contextlib.contextmanager
    def _weak(self):
        self.weak_pass = True
        try:
            yield
        finally:
            self.weak_pass = False


def _first_half(value, full: int):
    if isinstance(value, torch.Tensor):
        return value[: full // 2] if value.ndim and value.shape[0] == full else value
    if isinstance(value, dict):
        return {k: _first_half(v, full) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_first_half(v, full) for v in value)
    return value


def effective_conv_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) the module's forward applies: a Conv2d, or a peft LoRA conv with its active adapters."""
    if isinstance(module, torch.nn.Conv2d):
        return module.weight, module.bias
    base = _base_conv(module)
    if base is None or not hasattr(module, "get_delta_weight"):
        raise TypeError(f"dispersed convolution cannot read the effective kernel of {type(module).__name__}; it "
                        "supports nn.Conv2d and peft LoRA convs")
    weight = base.weight
    if not getattr(module, "disable_adapters", False) and not getattr(module, "merged", False):
        for adapter in module.active_adapters:
            if adapter in getattr(module, "lora_variant", {}):
                raise TypeError(f"dispersed convolution does not support the LoRA variant of adapter {adapter!r} "
                                f"(e.g. DoRA) on {type(module).__name__}; leave dispersion off for this model")
            if adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return weight, base.bias


class RedilatedConvHook(ModelHook):
    """Runs one 3x3 conv dilated or dispersed when the controller says so, else untouched."""

    def __init__(self, controller: Redilation, name: str):
        super().__init__()
        self.controller = controller
        self.name = name

    def new_forward(self, module, x, *args, **kwargs):
        action = self.controller.conv_action(self.name)
        if action is None:
            return self.fn_ref.original_forward(x, *args, **kwargs)
        kind, factor = action
        base = _base_conv(module)
        if kind == "dilate":
            forward = self.fn_ref.original_forward
            return run_dilated(lambda inputs: forward(inputs, *args, **kwargs), _kernel_convs(module), x, factor,
                               base.stride[0])
        weight, bias = effective_conv_weight(module)
        return dispersed_conv(x, weight, bias, base.stride[0], base.groups, factor,
                              self.controller.config.dispersion_eta)


class _DenoiserHook(ModelHook):
    def __init__(self, controller: Redilation):
        super().__init__()
        self.controller = controller

    def pre_forward(self, module, *args, **kwargs):
        self.controller.on_denoiser_call()
        return args, kwargs


def install(attachment, config: RedilationConfig) -> Redilation:
    """hires installer: hooks on the dilatable convs, a per-call check on the UNet, and the
    noise-damped guidance offset on the shared guidance hook when it may be used."""
    if not isinstance(config, RedilationConfig):
        raise TypeError(f"config={config!r} must be a hires.RedilationConfig")
    config.validate_for(attachment.info)
    controller = Redilation(attachment, config)
    controller.hooked = {name: controller.convs[name] for name in controller.hooked_names()}
    for name, module in controller.hooked.items():
        for conv in _kernel_convs(module):
            if conv.padding_mode != "zeros":
                raise ValueError(f"RedilationConfig: conv {name!r} uses padding_mode={conv.padding_mode!r}; "
                                 "re-dilation keeps the output size with zero padding only")
        attachment.add_hook(module, RedilatedConvHook(controller, name), HOOK_NAME)
    attachment.add_hook(attachment.denoiser, _DenoiserHook(controller), HOOK_NAME)
    if controller.may_use_ndcfg():
        ensure_guidance_hook(attachment).add_offset(NDCFG_OFFSET, controller.ndcfg_offset)
    return controller
