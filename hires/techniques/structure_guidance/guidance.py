"""Progressive structure guidance (DiffuseHigh): base size -> upscale -> re-noise -> guided denoise.

How a call runs. After `hires.apply(pipe, HiresConfig(structure_guidance=StructureGuidanceConfig(
enabled=True)))`, the user calls `pipe(prompt, height=H, width=W)` as usual. `StructureGuidance` is a
planner of the stage engine (hires.sampling.stages), which runs the plan as nested calls of the same
pipeline and lets the user's own call only decode:
1. the base stage: the user's call at the base size (same aspect ratio as the request);
2. each later stage: the previous result is upscaled (pixel space: decoded, resized, sharpened,
   encoded; latent space: the latent itself resized and sharpened), its low wavelet band becomes the
   stage's guide, the pipeline builds its own schedule and keeps only the last `renoise` fraction
   (`schedules.truncate_schedule`), and the stage starts from the upscaled result noised to that
   schedule's first timestep. During the stage's first `guided_steps` steps a denoiser hook converts
   the model output to the predicted x0, swaps its low band for the guide's, and converts back
   (eps / v / flow).
Every stage is a pipeline call, so the runtime's call state (and every other technique) sees the
stage's own size; `hires.last_call(pipe)` describes the last stage, `last_run(pipe)` all stages.
Per-stage options (renoise, guided_steps, guidance_scale, apg: one value, or one per stage after the
base) go to the stage's call; `apg` (APG's settings for the stage) is pushed onto the stage call's state
(`CallState.stage_setting`).
Requests whose base stage would not be smaller than the request (at or below the base area) are
plain calls.

Flow families: a later stage's schedule uses the shift of the base size (dynamic mu clamped to its
base-size value, as HiFlow does): diffusers' dynamic shift is linear in the token count without a
cap, which at 3-4K puts every step but the last at sigma > 0.97. A static shift is left as it is.

Starting from the user's own picture instead of a base generation: `generate(pipe, prompt, height,
width, image=..., strength=...)`, or an img2img / inpaint pipeline's own call with its `image` and
`strength` at a size larger than the image (an image at least as large as the request is a plain
img2img call). There is then no base stage: the first stage starts from the upscaled picture. `strength`
is the renoise of every stage after the picture, exactly (no few-step floor): 0 runs no step, so the
result is the picture upscaled straight to the request (no intermediate stage, no sharpening; the
anti-ringing clamp as configured) once through the VAE; 1 runs every step from pure noise, still guided
by the picture's low band. Without a strength the stages keep their `renoise`. An img2img pipeline's own
`image` argument gets the picture resized to each stage's size (Z-Image's img2img pipeline takes only
an image of its call's size, so it upscales through `generate`, which gives its call the picture at the
requested size). SDXL size conditioning (`original_size`,
`target_size`) is the base size in every stage, as in DiffuseHigh, unless the user gave other values
(the pipeline fills both with the requested size before hires sees them, so a value equal to the
requested size counts as not given). Randomness (re-noise noise, sharpening sigma) is drawn from
the call's generator.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ...denoiser.guidance import ensure_guidance_hook
from ...denoiser.outputs import PredictionHook
from ...families import base_area_size, round_to
from ...sampling import schedules, wavelets
from ...sampling.latent_space import VAECodec
from ...sampling.resize import clamp_to_source_range, resize, unsharp_mask
from ...sampling.stages import Stage, VAEPass, last_run_of, planner_of, tile_batch
from ...validation import STAGE_SETTINGS, check_strength
from .config import StructureGuidanceConfig

HOOK_NAME = "hires.structure_guidance"
WAVELET_MODE = "symmetric"  # as the paper's pytorch_wavelets DWTForward(mode="symmetric")
SHARPEN_KERNEL = 3  # the paper's torchvision GaussianBlur(kernel_size=3)
DEFAULT_RENOISE = 0.3  # DiffuseHigh: the last 15 of 50 steps
# Few-step (distilled) models, e.g. SDXL-Turbo / Lightning and Flux-schnell at 1-8 steps: 0.3 of 4
# steps would leave each stage one step from a barely noised start; half the schedule gives two.
FEW_STEPS = 8
FEW_STEP_RENOISE = 0.5


def guided_steps_for(stage_steps: int, config: StructureGuidanceConfig) -> int:
    """Guided steps of a stage of `stage_steps` steps whose `guided_steps` is not given."""
    return max(1, int(round(stage_steps * config.guided_fraction)))


def guide_weight(step_index: int, guided_steps: int, handover: str) -> float:
    """How far guided step `step_index` (from 0) of `guided_steps` moves the low band to the guide's."""
    if step_index >= guided_steps:
        return 0.0
    return 1.0 if handover == "hard" else 1.0 - step_index / guided_steps


def takes_picture(parameters) -> bool:
    """Whether a pipeline's __call__ takes the picture it starts from (img2img / inpaint: `image` and `strength`)."""
    return "image" in parameters and "strength" in parameters


def stage_step_count(total_steps: int, renoise: float, step_fraction: float | None) -> int:
    """The steps a stage runs of a `total_steps`-step call: renoise's (as the stage runs it), or fewer where
    `step_fraction` asks for fewer (with the few-step floor)."""
    steps = schedules.stage_steps(total_steps, renoise)
    if step_fraction is None:
        return steps
    return min(steps, schedules.stage_steps(total_steps, stage_renoise(step_fraction, total_steps)))


def stage_renoise(renoise: float | None, total_steps: int) -> float:
    """The re-noised fraction a stage runs: `renoise` (None: the default), at least half the
    schedule when it has FEW_STEPS steps or fewer."""
    value = DEFAULT_RENOISE if renoise is None else renoise
    return max(value, FEW_STEP_RENOISE) if total_steps <= FEW_STEPS else value
_SIZE_CONDITIONING = ("original_size", "target_size")


# -- the stage plan ----------------------------------------------------------------------------


def _explicit_stage(entry, base: tuple[int, int], multiple: int) -> tuple[int, int]:
    if isinstance(entry, float):
        return round_to(base[0] * entry, multiple), round_to(base[1] * entry, multiple)
    return (entry, entry) if isinstance(entry, int) else (int(entry[0]), int(entry[1]))


def _grows(before: tuple[int, int], after: tuple[int, int]) -> bool:
    return after[0] >= before[0] and after[1] >= before[1] and after[0] * after[1] > before[0] * before[1]


def _check_increasing(sizes: list[tuple[int, int]], what: str) -> None:
    for before, after in zip(sizes, sizes[1:]):
        if not _grows(before, after):
            raise ValueError(
                f"StructureGuidanceConfig.stages must grow from stage to stage: {what} goes from "
                f"{before[0]}x{before[1]} to {after[0]}x{after[1]} (height x width); give increasing sizes"
            )


def stage_sizes(info, config: StructureGuidanceConfig, height: int, width: int,
                start: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Pixel sizes (height, width) of every stage: the base (or `start`, an input image's size,
    which is not itself a stage), then the intermediate stages, then the request."""
    base = base_area_size(info, height, width)
    m = info.size_multiple
    if start is None and not _grows(base, (height, width)):
        return [(height, width)]  # at or below the base area (or no side grows): a plain call
    if config.stages is not None:
        middle = [_explicit_stage(e, base, m) for e in config.stages]
    else:
        factor = max(height / base[0], width / base[1])
        if config.ladder == "doubling":  # 2x per side per stage (1024 -> 2048 -> 4096)
            factors = [2**k for k in range(1, math.ceil(math.log2(factor) - 1e-9))]
        else:  # DiffuseHigh's: 2x, then one base side more per stage (1024 -> 2048 -> 3072 -> 4096)
            factors = list(range(2, math.ceil(factor - 1e-9)))
        ladder = [(base[0] * k, base[1] * k) for k in factors]
        # rounding can put a rung past one side of the request: such a rung would not grow into it
        middle = [s for s in ladder if _grows(s, (height, width))]
    sizes = [base] + middle
    if start is not None:
        sizes = [s for s in sizes if s[0] >= start[0] and s[1] >= start[1] and s[0] * s[1] > start[0] * start[1]]
        if height * width <= start[0] * start[1]:
            raise ValueError(f"height x width = {height}x{width} must be larger than the input image "
                             f"({start[0]}x{start[1]}); structure guidance upscales")
        sizes = [start] + sizes
    if (height, width) != sizes[-1]:
        sizes.append((height, width))
    # an input image may have any aspect ratio; the stages after it must grow
    _check_increasing(sizes[1:] if start is not None else sizes, f"the plan toward the requested {height}x{width}")
    return sizes


def per_stage(config: StructureGuidanceConfig, name: str, later_stages: int) -> list:
    """A per-stage option as one value per stage after the base (or input image)."""
    value = getattr(config, name)
    if isinstance(value, tuple):
        if len(value) != later_stages:
            raise ValueError(f"StructureGuidanceConfig.{name}={value!r} has {len(value)} values but the plan has "
                             f"{later_stages} stage(s) after the base; give one value or {later_stages}")
        return list(value)
    return [value] * later_stages


def validate(config: StructureGuidanceConfig, info) -> None:
    """Apply-time checks against the family (size multiple, base size) and the wavelet name."""
    try:
        wavelets.parse_wavelet(config.wavelet)
    except ValueError:
        raise ValueError(f"StructureGuidanceConfig.wavelet={config.wavelet!r} is not supported; use one of "
                         f"{', '.join(wavelets.wavelet_names())}") from None
    if config.stages is None:
        return
    m = info.size_multiple
    for entry in config.stages:
        sides = [] if isinstance(entry, float) else ([entry] if isinstance(entry, int) else list(entry))
        for side in sides:
            if side % m:
                lower = max(m, side - side % m)
                raise ValueError(f"StructureGuidanceConfig.stages entry {entry!r}: {side} is not a multiple of {m}, "
                                 f"which {info.name} requires; use {lower} or {lower + m}")
    base = (info.base_height, info.base_width)
    _check_increasing([base] + [_explicit_stage(e, base, m) for e in config.stages], "the stage list")
    for name in ("renoise", "step_fraction", "guided_steps", "guidance_scale", "apg"):
        value = getattr(config, name)
        if isinstance(value, tuple) and len(value) != len(config.stages) + 1:
            raise ValueError(f"StructureGuidanceConfig.{name}={value!r} needs one value per stage after the base: "
                             f"{len(config.stages) + 1} ({len(config.stages)} listed stages and the requested size)")


# -- one run ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageRecord:
    """What one stage did (see `last_run`)."""

    height: int
    width: int
    steps: int  # denoising steps the stage ran
    timesteps: tuple[float, ...]
    guided_steps: tuple[int, ...]  # step indices whose prediction got the low-band swap
    guidance_scale: float | None
    sharpen_sigma: float | None


@dataclasses.dataclass
class _Guide:
    """Structure guidance's own part of a stage (`Stage.data`)."""

    renoise: float | None = None  # None: the default (stage_renoise); the base stage has no schedule hook
    step_fraction: float | None = None  # None (also under a call's strength): the schedule's own steps there
    exact: bool = False  # renoise is the call's strength: no few-step floor
    guided_steps: int | None = None
    guidance_scale: float | None = None
    guide: torch.Tensor | None = None  # low band of the guide (latent or pixel space)
    origin: torch.Tensor | None = None  # the user's picture (B, 3, H, W) in [-1, 1], upscaled by the first stage
    # the same picture, for an img2img pipeline's own `image` argument, resized to each stage's size
    picture: torch.Tensor | None = None
    sharpen_sigma: float | None = None
    sharpens: bool = True  # False: a stage that runs no step, whose upscale is the result itself, is not sharpened
    guided: set = dataclasses.field(default_factory=set)

    def drop_tensors(self) -> None:
        self.guide = self.origin = self.picture = None


def _draw_uniform(generator, low: float, high: float) -> float:
    g = generator[0] if isinstance(generator, (list, tuple)) else generator
    device = g.device if g is not None else "cpu"
    return float(low + (high - low) * torch.rand((), generator=g, device=device).item())


class StructureGuidance:
    """The planner of structure guidance's stages and its low-band guidance (`attachment` None: a plan
    without a pipeline, for a dry run)."""

    def __init__(self, info, config: StructureGuidanceConfig, attachment=None):
        self.attachment = attachment
        self.config = config
        self.info = info
        self.vae = VAECodec(attachment.pipe, info.family.layout) if attachment is not None else None
        self.pending_image: torch.Tensor | None = None
        self.pending_strength: float | None = None

    def _picture(self, request) -> tuple[torch.Tensor | None, float | None]:
        """The user's picture the stages start from (None: a base generation) and the call's strength."""
        if self.pending_image is not None:
            return self.pending_image, self.pending_strength
        engine = self.attachment.stages if self.attachment is not None else None
        if engine is not None and engine.slices_by_strength and takes_picture(request.parameters):
            picture = request.arguments.get("image")  # a classic img2img / inpaint pipeline's own call
            if picture is not None:
                pipe = self.attachment.pipe
                processed = pipe.image_processor.preprocess(picture).to(device=pipe._execution_device,
                                                                        dtype=torch.float32)
                strength = request.arguments.get("strength")
                return processed, None if strength is None else check_strength(strength)
        return None, request.strength

    def plan(self, request, stages: list) -> list:
        if len(stages) != 1 or not stages[0].trivial:
            return stages
        config, info = self.config, self.info
        height, width = stages[0].height, stages[0].width
        image, strength = self._picture(request)
        start = tuple(image.shape[-2:]) if image is not None else request.image_size
        if start is not None and self.pending_image is None and height * width <= start[0] * start[1]:
            return stages  # an img2img call at or below its image's size is not an upscale: a plain call
        sizes = stage_sizes(info, config, height, width, start)
        if start is None and len(sizes) < 2:
            return stages  # at or below the base size: a plain call
        generator = stages[0].generator
        exact = start is not None and strength is not None
        if exact and strength == 0:  # nothing is denoised: one upscale straight to the request, once through the VAE
            sizes = [sizes[0], sizes[-1]]
        later = len(sizes) - 1
        renoise = [float(strength)] * later if exact else per_stage(config, "renoise", later)
        fractions = per_stage(config, "step_fraction", later)
        guided = per_stage(config, "guided_steps", later)
        scales = per_stage(config, "guidance_scale", later)
        # per-stage settings of other techniques (StructureGuidanceConfig.apg), pushed onto each stage's call
        settings = [per_stage(config, f.name,
                              later) for f in dataclasses.fields(config) if STAGE_SETTINGS in f.metadata]
        conditioning = {name: request.arguments.get(name) for name in _SIZE_CONDITIONING if name in request.parameters}
        conditioning = {k: (v if v is not None and tuple(v) != (height,
                                                                width) else base_area_size(info, height, width))
                        for k, v in conditioning.items()}
        plan = []
        if start is None:
            plan.append(Stage(*sizes[0], owner=TECHNIQUE_NAME, generator=generator, call_arguments=dict(conditioning),
                              planned_steps=request.steps, data=_Guide()))
        for i, (h, w) in enumerate(sizes[1:]):
            denoises = not (exact and renoise[i] == 0)
            guide = _Guide(renoise=renoise[i], exact=exact, step_fraction=None if exact else fractions[i],
                           guided_steps=guided[i],
                           guidance_scale=scales[i], sharpens=denoises)
            call_arguments = dict(conditioning)
            if scales[i] is not None:
                call_arguments[info.family.guidance_scale_name] = scales[i]
            steps = None if request.steps is None else 0 if not denoises else stage_step_count(
                request.steps, renoise[i] if exact else stage_renoise(renoise[i], request.steps), guide.step_fraction)
            stage = Stage(h, w, owner=TECHNIQUE_NAME, generator=generator, call_arguments=call_arguments,
                          schedule=self._schedule, start=self._start, data=guide, planned_steps=steps, refines=True,
                          denoises=denoises,
                          vae_passes=self._vae_passes(sizes[i], (h, w), first=start is not None and i == 0))
            for values in settings:
                if values[i] is not None:
                    stage.set(values[i])
            plan.append(stage)
        if image is not None:
            plan[0].data.origin = image
            if takes_picture(request.parameters):
                for stage in plan:
                    stage.data.picture = image
        return plan

    def _vae_passes(self, previous: tuple[int, int], size: tuple[int, int], first: bool) -> tuple:
        """What a later stage runs through the VAE: in pixel space (`upscale_space` or `space` "pixel") its
        start decodes the previous result (the user's picture needs none) and encodes the upscaled image;
        in latent space nothing. With `space="pixel"` every guided step also decodes and encodes."""
        config, passes = self.config, []
        if (config.upscale_space or config.space) == "pixel" or first:
            if not first:
                passes.append(VAEPass("decode", *previous, f"start: decode of {previous[1]}x{previous[0]}"))
            passes.append(VAEPass("encode", *size, "start: encode of the upscaled image"))
        if config.space == "pixel":
            passes += [VAEPass("decode", *size, "guided steps: decode"),
                       VAEPass("encode", *size, "guided steps: encode")]
        return tuple(passes)

    def _start(self, stage, previous) -> torch.Tensor:
        """Upscale the previous result (or the user's picture) to the stage: its x0 and the guide's low band."""
        config, info, guide = self.config, self.info, stage.data
        latent_size = (stage.height // info.latent_factor, stage.width // info.latent_factor)
        if guide.picture is not None:  # the pipeline encodes its `image` at the call's size (Z-Image: as given)
            sized = resize(guide.picture.float(), (stage.height, stage.width), config.upscale)
            stage.call_arguments["image"] = ((sized + 1) / 2).clamp(0, 1)
        sharpen = config.sharpen_alpha and guide.sharpens
        guide.sharpen_sigma = _draw_uniform(stage.generator, *config.sharpen_sigma) if sharpen else None
        sigma = guide.sharpen_sigma

        def upscale(x, size):
            up = resize(x, size, config.upscale)
            up = unsharp_mask(up, config.sharpen_alpha, sigma, SHARPEN_KERNEL) if sigma else up
            return clamp_to_source_range(up, x) if config.anti_ringing else up

        if (config.upscale_space or config.space) == "latent" and previous is not None:
            z = upscale(previous.result.float(), latent_size)
            guide.guide = self._low(z)
            return z
        pixels = guide.origin if previous is None else self.vae.decode(previous.result)
        image = upscale(pixels.float(), (stage.height, stage.width)).clamp(-1, 1)
        x0 = self.vae.encode(image).float()
        guide.guide = self._low(image if config.space == "pixel" else x0)
        return x0

    def _low(self, x: torch.Tensor) -> torch.Tensor:
        return wavelets.low_band(x.float(), self.config.wavelet, self.config.wavelet_level, WAVELET_MODE)

    def _schedule(self, stage, scheduler, set_timesteps, args, kwargs) -> None:
        """The pipeline's own schedule, keeping its last `renoise` fraction (respaced to `step_fraction`'s steps)."""
        guide = stage.data
        if kwargs.get("mu") is not None:  # flow: the base size's shift (see the module docstring)
            sigmas = kwargs.get("sigmas")
            steps = len(sigmas) if sigmas is not None else kwargs.get("num_inference_steps", args[0] if args else None)
            kwargs = {**kwargs, "mu": schedules.clamped_mu(kwargs["mu"], self.info, scheduler.config, steps)}
        set_timesteps(*args, **kwargs)
        total = len(scheduler.timesteps)
        guide.renoise = guide.renoise if guide.exact else stage_renoise(guide.renoise, total)
        steps = stage_step_count(total, guide.renoise, guide.step_fraction)
        own = schedules.stage_steps(total, guide.renoise)
        if steps != own:
            start = float(scheduler.timesteps[total - own])
            total = schedules.respace_schedule(scheduler, set_timesteps, args, kwargs, steps, start, total)
        if guide.guided_steps is None:
            guide.guided_steps = guided_steps_for(steps, self.config)
        if guide.guided_steps > steps:
            raise ValueError(f"StructureGuidanceConfig.guided_steps={guide.guided_steps} "
                             f"exceeds the {steps} steps of the "
                             f"{stage.height}x{stage.width} stage (renoise "
                             f"{guide.renoise} of {total}); lower it or raise "
                             "renoise / step_fraction / num_inference_steps")
        schedules.truncate_schedule(scheduler, total - steps)

    # -- the denoiser-side guidance -----------------------------------------------------------
    def guide_output(self, output: torch.Tensor, sample: torch.Tensor, timestep, state) -> torch.Tensor:
        """The model output with its predicted x0's low band replaced by the stage's guide."""
        info, latents = self.info, self.attachment.latents
        lh, lw = state.latent_height, state.latent_width
        x = latents.to_spatial(sample, lh, lw)
        full = latents.to_spatial(output, lh, lw)
        channels = x.shape[1]
        prediction, rest = full[:, :channels], full[:, channels:]  # PixArt's learned sigma stays as it is
        t = torch.as_tensor(timestep).flatten()[0].double() / info.family.timestep_input_scale
        level = schedules.noise_level(self.attachment.pipe.scheduler, info.prediction_type, t).to(x.device)
        x0 = schedules.predicted_x0(prediction, x, info.prediction_type, level)
        x0 = self._swap(x0, state)
        new = schedules.output_from_x0(x0, x, info.prediction_type, level).to(output.dtype)
        if rest.shape[1]:
            new = torch.cat([new, rest], dim=1)
        return latents.from_spatial(new)

    def _swap(self, x0: torch.Tensor, state) -> torch.Tensor:
        data = state.stage.data
        swapped = self._swap_low_band(x0, data.guide, state)
        weight = guide_weight(state.step_index, data.guided_steps, self.config.handover)
        return swapped if weight == 1 else torch.lerp(x0.float(), swapped.float(), weight).to(swapped.dtype)

    def _swap_low_band(self, x0: torch.Tensor, guide: torch.Tensor, state) -> torch.Tensor:
        config = self.config
        level = config.wavelet_level
        if config.space == "latent":  # affine in x0, so swapping each half equals swapping the guided x0
            return wavelets.swap_low_band(x0, tile_batch(guide, x0.shape[0]).to(x0.device),
                                          config.wavelet, level, WAVELET_MODE)
        # Pixel space: the VAE is not linear, so swap the guided prediction once and move every
        # half by the same amount; the pipeline's combination then yields exactly the swapped x0.
        halves = state.guidance_scale is not None and self.info.family.cfg_batched and x0.shape[0] % 2 == 0
        if halves:
            uncond, cond = x0.chunk(2)
            if self.info.family.cfg_cond_first:
                uncond, cond = cond, uncond
            guided = uncond + state.guidance_scale * (cond - uncond)
        else:
            guided = x0
        image = self.vae.decode(guided)
        image = wavelets.swap_low_band(image, tile_batch(guide, image.shape[0]).to(image.device),
                                       config.wavelet, level, WAVELET_MODE)
        delta = self.vae.encode(image) - guided
        return x0 + (torch.cat([delta, delta]) if halves else delta)


class _StructureGuidanceHook(PredictionHook):
    """Swaps the low band of the predicted x0 during a stage's first guided steps."""

    def __init__(self, guidance: StructureGuidance):
        super().__init__(guidance.attachment)
        self.guidance = guidance

    def wanted(self, state):
        guide = getattr(state.stage, "data", None)
        if not isinstance(guide, _Guide) or guide.guide is None or state.step_index >= guide.guided_steps:
            return None
        return guide

    def change(self, prediction, sample, timestep, state, guide):
        guided = self.guidance.guide_output(prediction, sample, timestep, state)
        guide.guided.add(state.step_index)
        return guided


TECHNIQUE_NAME = "structure_guidance"


def install(attachment, config: StructureGuidanceConfig) -> None:
    """hires.apply's installer: validate against the family; its planner (the record's) plans the stages."""
    validate(config, attachment.info)
    guidance = attachment.stages.planner(TECHNIQUE_NAME)
    # The guidance hook goes in first, beneath ours: the low-band swap then acts on outputs whose
    # CFG combination already is APG's / noise-damped guidance's result, so the swap stays exact.
    ensure_guidance_hook(attachment)
    attachment.add_hook(attachment.denoiser, _StructureGuidanceHook(guidance), HOOK_NAME)


def _planner(pipe) -> StructureGuidance:
    planner = planner_of(pipe, TECHNIQUE_NAME)
    if planner is None:
        raise ValueError("structure guidance is not applied to this pipeline: call hires.apply(pipe, "
                         "HiresConfig(structure_guidance=StructureGuidanceConfig(enabled=True))) first")
    return planner


def last_run(pipe) -> tuple[StageRecord, ...] | None:
    """The stages of the last progressive call on `pipe` (None if none ran)."""
    planner = _planner(pipe)
    stages = last_run_of(planner.attachment.stages, TECHNIQUE_NAME)
    if stages is None:
        return None
    return tuple(StageRecord(s.height, s.width, s.steps, s.timesteps, tuple(sorted(s.data.guided)),
                             s.data.guidance_scale, s.data.sharpen_sigma) for s in stages)


def generate(pipe, prompt=None, height: int | None = None, width: int | None = None, image=None,
             strength: float | None = None, **call_kwargs):
    """Call `pipe` with structure guidance; with `image` (PIL image, array or tensor in [0, 1]) the
    stages start from that picture instead of a base generation, each re-running the last `strength`
    of its schedule (0: the upscaled picture through the VAE; 1: from noise; None: their renoise).
    Returns the pipeline's output."""
    planner = _planner(pipe)
    if strength is not None:
        check_strength(strength)
        if image is None:
            raise ValueError(f"strength={strength!r} needs image=: it says how much of the given picture is redrawn")
    if image is not None:
        processed = pipe.image_processor.preprocess(image)
        planner.pending_image = processed.to(device=pipe._execution_device, dtype=torch.float32)
        planner.pending_strength = strength
        if takes_picture(planner.attachment.calls.parameters) and height is not None and width is not None:
            # an img2img pipeline's own call needs an image: the picture at the requested size (some, such as
            # Z-Image's, take no other); the stages start from the picture itself
            sized = resize(planner.pending_image, (height, width), planner.config.upscale)
            call_kwargs["image"] = ((sized + 1) / 2).clamp(0, 1)
            call_kwargs.setdefault("strength", 1.0 if strength is None else strength)
    try:
        return pipe(prompt=prompt, height=height, width=width, **call_kwargs)
    finally:
        planner.pending_image = planner.pending_strength = None
