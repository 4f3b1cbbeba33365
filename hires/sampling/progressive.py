"""Progressive structure guidance (DiffuseHigh): base size -> upscale -> re-noise -> guided denoise.

How a call runs. After `hires.apply(pipe, HiresConfig(structure_guidance=StructureGuidanceConfig(
enabled=True)))`, the user calls `pipe(prompt, height=H, width=W)` as usual. When the pipeline calls
its own `encode_prompt` (the first method every supported pipeline calls after validating its
inputs, with its arguments still as the user gave them), hires reads the call's arguments from the
`__call__` frame and runs the stages, each one a normal call of the same pipeline at the stage's
size with `output_type="latent"`:
1. the base stage: the user's call at the base size (same aspect ratio as the request);
2. each later stage: the previous result is upscaled (pixel space: decoded, resized, sharpened,
   encoded; latent space: the latent itself resized and sharpened), its low wavelet band becomes the
   stage's guide, the pipeline builds its own schedule and keeps only the last `renoise` fraction
   (`schedules.truncate_schedule`, through the scheduler's `set_timesteps`), and `prepare_latents`
   returns the upscaled result noised to that schedule's first timestep. During the stage's first
   `guided_steps` steps a denoiser hook converts the model output to the predicted x0, swaps its low
   band for the guide's, and converts back (eps / v / flow);
3. the user's own call then gets the last stage's latent from `prepare_latents` and an empty
   schedule, so it only decodes and post-processes as it always does.
Every stage is a pipeline call, so the runtime's call state (and every other technique) sees the
stage's own size; `hires.last_call(pipe)` describes the last stage, `last_run(pipe)` all stages.
Per-stage options (renoise, guided_steps, guidance_scale, apg: one value, or one per stage after the
base) go to the stage's call; `apg` is read by hires.techniques.apg through `current_stage`.

Flow families: a later stage's schedule uses the shift of the base size (dynamic mu clamped to its
base-size value, as HiFlow does): diffusers' dynamic shift is linear in the token count without a
cap, which at 3-4K puts every step but the last at sigma > 0.97. A static shift is left as it is.

Starting from the user's own picture instead of a base generation: `generate(pipe, prompt, height,
width, image=...)` (stages above the image's size only). SDXL size conditioning (`original_size`,
`target_size`) is the base size in every stage, as in DiffuseHigh, unless the user gave other values
(the pipeline fills both with the requested size before hires sees them, so a value equal to the
requested size counts as not given). Randomness (re-noise noise, sharpening sigma) is drawn from
the call's generator.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from diffusers.utils.torch_utils import randn_tensor

from ..config import StructureGuidanceConfig
from ..runtime import get_attachment
from ..techniques.guidance import ensure_guidance_hook
from . import schedules, wavelets

HOOK_NAME = "hires.structure_guidance"
WAVELET_MODE = "symmetric"  # as the paper's pytorch_wavelets DWTForward(mode="symmetric")
SHARPEN_KERNEL = 3  # the paper's torchvision GaussianBlur(kernel_size=3)
DEFAULT_RENOISE = 0.3  # DiffuseHigh: the last 15 of 50 steps
DEFAULT_GUIDED_FRACTION = 1 / 3  # DiffuseHigh: 5 of those 15 steps
LANCZOS_TAPS = 3
# __call__ arguments that resize the request inside the pipeline; stages pass exact sizes instead.
RESIZING_ARGUMENTS = {"use_resolution_binning": False}
_SIZE_CONDITIONING = ("original_size", "target_size")


# -- image math --------------------------------------------------------------------------------
def _lanczos_matrix(n_in: int, n_out: int, device) -> torch.Tensor:
    """(n_out, n_in) Lanczos-3 resampling weights (half-pixel centres, edge samples repeated)."""
    scale = n_in / n_out
    support = LANCZOS_TAPS * max(scale, 1.0)  # widen when shrinking, so it also antialiases
    centres = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5
    offsets = torch.arange(-math.ceil(support), math.ceil(support) + 1, dtype=torch.float64)
    taps = torch.floor(centres)[:, None] + offsets[None, :]
    x = (centres[:, None] - taps) / max(scale, 1.0)
    weights = torch.sinc(x) * torch.sinc(x / LANCZOS_TAPS) * (x.abs() < LANCZOS_TAPS)
    weights = weights / weights.sum(dim=1, keepdim=True)
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    matrix.scatter_add_(1, taps.clamp(0, n_in - 1).long(), weights)
    return matrix.to(device=device, dtype=torch.float32)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize (B, C, H, W) to `size` in float32 and cast back: bicubic / bilinear / lanczos."""
    work = x.float()
    if mode in ("bicubic", "bilinear"):
        out = F.interpolate(work, size=size, mode=mode, align_corners=False)
    elif mode == "lanczos":
        rows = _lanczos_matrix(x.shape[-2], size[0], x.device)
        cols = _lanczos_matrix(x.shape[-1], size[1], x.device)
        out = torch.einsum("oh,bchw,pw->bcop", rows, work, cols)
    else:
        raise ValueError(f"mode={mode!r} is not a resize mode; use 'bicubic', 'bilinear' or 'lanczos'")
    return out.to(x.dtype)


def gaussian_kernel(sigma: float, size: int = SHARPEN_KERNEL) -> torch.Tensor:
    half = (size - 1) / 2
    k = torch.exp(-((torch.arange(size, dtype=torch.float64) - half) ** 2) / (2 * sigma**2))
    return (k / k.sum()).float()


def unsharp_mask(x: torch.Tensor, alpha: float, sigma: float, size: int = SHARPEN_KERNEL) -> torch.Tensor:
    """(1 + alpha) x - alpha blur(x), blur a separable Gaussian with reflect padding (float32)."""
    if alpha == 0:
        return x
    work = x.float()
    channels = work.shape[1]
    k = gaussian_kernel(sigma, size).to(work.device)
    pad = size // 2
    blurred = F.pad(work, (pad, pad, pad, pad), mode="reflect")
    blurred = F.conv2d(blurred, k.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    blurred = F.conv2d(blurred, k.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
    return ((1 + alpha) * work - alpha * blurred).to(x.dtype)


def pack(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/p * w/p, C p p): Flux's packed token layout."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of `pack` for a latent grid of height x width."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.view(b, height // patch, width // patch, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


# -- the stage plan ----------------------------------------------------------------------------
def round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def base_stage_size(info, height: int, width: int) -> tuple[int, int]:
    """The base generation's size for a request: the request's aspect ratio at the base area."""
    shrink = math.sqrt(info.base_height * info.base_width / (height * width))
    m = info.size_multiple
    return round_to(height * shrink, m), round_to(width * shrink, m)


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
    base = base_stage_size(info, height, width)
    m = info.size_multiple
    if start is None and not _grows(base, (height, width)):
        return [(height, width)]  # at or below the base area (or no side grows): a plain call
    if config.stages is not None:
        middle = [_explicit_stage(e, base, m) for e in config.stages]
    else:  # DiffuseHigh's ladder: 2x, then one base side more per stage (1024 -> 2048 -> 3072 -> 4096)
        factor = max(height / base[0], width / base[1])
        ladder = [(base[0] * k, base[1] * k) for k in range(2, math.ceil(factor - 1e-9))]
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
    for name in ("renoise", "guided_steps", "guidance_scale", "apg"):
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
class _Stage:
    height: int
    width: int
    renoise: float | None = None  # None: the base stage (full schedule, no guidance)
    guided_steps: int | None = None
    guidance_scale: float | None = None
    apg: Any = None  # the stage's own APGConfig (None: the call's; read by hires.techniques.apg)
    x0: torch.Tensor | None = None  # upscaled previous result, spatial latent
    guide: torch.Tensor | None = None  # low band of the guide (latent or pixel space)
    sharpen_sigma: float | None = None
    generator: Any = None
    start_timestep: Any = None
    steps: int | None = None
    timesteps: tuple = ()
    target: torch.Tensor | None = None  # the tensor prepare_latents returned, filled in place
    guided: set = dataclasses.field(default_factory=set)

    def record(self) -> StageRecord:
        return StageRecord(self.height, self.width, self.steps if self.steps is not None else len(self.timesteps),
                           self.timesteps, tuple(sorted(self.guided)), self.guidance_scale, self.sharpen_sigma)


@dataclasses.dataclass
class _Latent:
    z: torch.Tensor  # spatial, in the denoiser's latent space


@dataclasses.dataclass
class _Pixels:
    image: torch.Tensor  # (B, 3, H, W) in [-1, 1]


def _draw_uniform(generator, low: float, high: float) -> float:
    g = generator[0] if isinstance(generator, (list, tuple)) else generator
    device = g.device if g is not None else "cpu"
    return float(low + (high - low) * torch.rand((), generator=g, device=device).item())


def tile_batch(x: torch.Tensor, batch: int) -> torch.Tensor:
    if x.shape[0] == batch:
        return x
    if batch % x.shape[0]:
        raise ValueError(f"cannot match a batch of {x.shape[0]} guides to a batch of {batch}")
    return x.repeat(batch // x.shape[0], *([1] * (x.ndim - 1)))


def replace_latents(result, tensor):
    """`prepare_latents`' result (a tensor, or a tuple led by one) with `tensor` in the latents' place."""
    current = result[0] if isinstance(result, tuple) else result
    if current.shape != tensor.shape:
        raise RuntimeError(f"a hires stage prepared latents of shape {tuple(tensor.shape)} where the "
                           f"pipeline expects {tuple(current.shape)}")
    tensor = tensor.to(device=current.device, dtype=current.dtype)
    return (tensor, *result[1:]) if isinstance(result, tuple) else tensor


class _Progressive:
    """The per-attachment driver: wraps encode_prompt / prepare_latents and the scheduler's
    set_timesteps during a run, and holds the current stage for the denoiser hook."""

    def __init__(self, attachment, config: StructureGuidanceConfig):
        self.attachment = attachment
        self.config = config
        self.info = attachment.info
        self.pipe = attachment.pipe
        self.call_code = inspect.unwrap(type(self.pipe).__call__).__code__
        params = inspect.signature(inspect.unwrap(type(self.pipe).__call__)).parameters.values()
        self.call_params = [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        self.stage: _Stage | None = None
        self.running = False
        self.outer = None  # (frame, latents) of the user's call until its prepare_latents takes them
        self.pending_image: torch.Tensor | None = None
        self.last_run: tuple[StageRecord, ...] | None = None
        self._shadowed_scheduler = None
        self._empty_schedule_for = None  # the user's call frame whose schedule is emptied

    # -- pipeline entry points ---------------------------------------------------------------
    def wrap_encode_prompt(self, original):
        def encode_prompt(*args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code is self.call_code and not self.running:
                if self.outer is None or self.outer[0] is not frame:
                    self._drop_outer()
                    self._maybe_run(frame)
            return original(*args, **kwargs)

        return encode_prompt

    @staticmethod
    def wrap_prepare_image(original):
        """Flux and SD3 ControlNet pipelines take a tensor control image as it is and then read the call's
        height and width from it, so every stage (and the user's call) would run at the control
        image's size; resize the tensor to the call's size instead, as they do for PIL images."""
        signature = inspect.signature(original)

        def prepare_image(*args, **kwargs):
            arguments = signature.bind(*args, **kwargs).arguments
            image, size = arguments["image"], (arguments["height"], arguments["width"])
            if isinstance(image, torch.Tensor) and image.ndim == 4 and tuple(image.shape[-2:]) != size:
                arguments["image"] = F.interpolate(image, size=size, mode="bilinear", antialias=True)
            return original(**arguments)

        return prepare_image

    def wrap_prepare_latents(self, original):
        def prepare_latents(*args, **kwargs):
            result = original(*args, **kwargs)
            frame = sys._getframe(1)
            if frame.f_code is not self.call_code:
                return result
            if self.running and self.stage is not None and self.stage.x0 is not None:
                return replace_latents(result, self._stage_target(result))
            if self.outer is not None and self.outer[0] is frame:
                latents = self.outer[1]
                self.outer = None
                return replace_latents(result, latents)
            return result

        return prepare_latents

    # -- the run ------------------------------------------------------------------------------
    def _maybe_run(self, frame) -> None:
        values = frame.f_locals
        arguments = {name: values[name] for name in self.call_params if name in values}
        height, width = arguments.get("height"), arguments.get("width")
        image = self.pending_image
        if height is None or width is None:
            return
        start = tuple(image.shape[-2:]) if image is not None else None
        sizes = stage_sizes(self.info, self.config, int(height), int(width), start)
        if image is None and len(sizes) < 2:
            return  # at or below the base size: a plain call
        if arguments.get("latents") is not None:
            raise ValueError("latents= cannot be combined with structure guidance: each stage prepares its own "
                             "latents; pass generator= for reproducible results")
        saved = {k: v for k, v in self.pipe.__dict__.items() if k.startswith("_") and not k.startswith("_hires")}
        self.running = True
        self._shadow_scheduler()
        try:
            latents = self._run_stages(arguments, sizes, image)
        except BaseException:
            self._unshadow_scheduler()
            raise
        finally:
            self.running = False
            self.stage = None
            self.pipe.__dict__.update(saved)  # the user's call set its own state before encode_prompt
        # The user's call only decodes: its prepare_latents returns the result, its schedule is empty.
        self.outer = (frame, latents)
        self._empty_schedule_for = frame

    def _drop_outer(self) -> None:
        self.outer = None
        self._empty_schedule_for = None
        self._unshadow_scheduler()

    def _run_stages(self, arguments: dict, sizes: list, image: torch.Tensor | None):
        config, info = self.config, self.info
        generator = arguments.get("generator")
        later = len(sizes) - 1
        renoise = per_stage(config, "renoise", later)
        guided = per_stage(config, "guided_steps", later)
        scales = per_stage(config, "guidance_scale", later)
        apgs = per_stage(config, "apg", later)
        requested = sizes[-1]
        conditioning = {name: arguments.get(name) for name in _SIZE_CONDITIONING if name in self.call_params}
        conditioning = {k: (v if v is not None and tuple(v) != requested else base_stage_size(info, *requested))
                        for k, v in conditioning.items()}
        previous = _Pixels(image) if image is not None else None
        records = []
        output = None
        for index, (height, width) in enumerate(sizes):
            if previous is None:
                stage = _Stage(height, width)
            elif index == 0:
                continue  # the input image's own size: not a stage
            else:
                i = index - 1
                stage = _Stage(height, width, renoise=renoise[i] if renoise[i] is not None else DEFAULT_RENOISE,
                               guided_steps=guided[i], guidance_scale=scales[i], apg=apgs[i], generator=generator)
                self._prepare(stage, previous)
            kwargs = dict(arguments)
            kwargs.update(height=height, width=width, output_type="latent", return_dict=False, latents=None)
            kwargs.update({k: v for k, v in RESIZING_ARGUMENTS.items() if k in self.call_params})
            kwargs.update(conditioning)
            if stage.guidance_scale is not None:
                kwargs[info.family.guidance_scale_name] = stage.guidance_scale
            self.stage = stage
            output = self.pipe(**kwargs)[0]
            self.stage = None
            records.append(stage.record())
            spatial = output
            if info.family.latent_layout == "packed":
                spatial = unpack(output, height // info.latent_factor, width // info.latent_factor, info.patch_size)
            previous = _Latent(spatial)
        self.last_run = tuple(records)
        return output

    def _prepare(self, stage: _Stage, previous) -> None:
        """Upscale the previous result to the stage: its x0 and the guide's low band."""
        config, info = self.config, self.info
        latent_size = (stage.height // info.latent_factor, stage.width // info.latent_factor)
        stage.sharpen_sigma = _draw_uniform(stage.generator, *config.sharpen_sigma) if config.sharpen_alpha else None
        sharpen = (lambda x: unsharp_mask(x, config.sharpen_alpha, stage.sharpen_sigma)) if stage.sharpen_sigma else (lambda x: x)
        if config.space == "latent" and isinstance(previous, _Latent):
            z = sharpen(resize(previous.z.float(), latent_size, config.upscale))
            stage.x0, stage.guide = z, self._low(z)
            return
        pixels = previous.image if isinstance(previous, _Pixels) else self.decode(previous.z)
        image = sharpen(resize(pixels.float(), (stage.height, stage.width), config.upscale)).clamp(-1, 1)
        stage.x0 = self.encode(image).float()
        stage.guide = self._low(image if config.space == "pixel" else stage.x0)

    def _low(self, x: torch.Tensor) -> torch.Tensor:
        return wavelets.low_band(x.float(), self.config.wavelet, self.config.wavelet_level, WAVELET_MODE)

    # -- VAE ----------------------------------------------------------------------------------
    def _vae_factors(self):
        vae_config = self.pipe.vae.config
        return vae_config.scaling_factor, getattr(vae_config, "shift_factor", None) or 0.0

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        scale, shift = self._vae_factors()
        return vae.decode((z / scale + shift).to(vae.dtype), return_dict=False)[0].float()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        scale, shift = self._vae_factors()
        return ((vae.encode(image.to(vae.dtype)).latent_dist.mode().float() - shift) * scale)

    # -- schedules ----------------------------------------------------------------------------
    def _shadow_scheduler(self) -> None:
        scheduler = self.pipe.scheduler
        original = scheduler.set_timesteps
        # Another technique's instance wrapper (the positions' shift policy) stays beneath ours.
        self._covered_set_timesteps = scheduler.__dict__.get("set_timesteps")
        controller = self

        def set_timesteps(*args, **kwargs):
            original(*args, **kwargs)
            if get_attachment(controller.pipe) is not controller.attachment:
                controller._unshadow_scheduler(scheduler)  # left by a call that raised before removal
                return
            if controller._empty_schedule_for is not None:
                if _called_from(controller._empty_schedule_for):  # the user's own call: it only decodes
                    scheduler.timesteps = scheduler.timesteps[:0]
                controller._empty_schedule_for = None
                controller._unshadow_scheduler()
                return
            stage = controller.stage
            if stage is not None and stage.renoise is not None:
                if kwargs.get("mu") is not None:
                    capped = min(kwargs["mu"], schedules.scheduler_shift_mu(scheduler.config, controller.info.base_tokens))
                    if capped != kwargs["mu"]:
                        original(*args, **{**kwargs, "mu": capped})
                controller._truncate(stage, scheduler)
            elif stage is not None:
                stage.timesteps = tuple(float(t) for t in scheduler.timesteps)

        set_timesteps.__wrapped__ = original  # retrieve_timesteps inspects the signature
        scheduler.__dict__["set_timesteps"] = self._shadow = set_timesteps
        self._shadowed_scheduler = scheduler

    def _unshadow_scheduler(self, scheduler=None) -> None:
        scheduler = scheduler or self._shadowed_scheduler
        self._shadowed_scheduler = None
        covered, self._covered_set_timesteps = getattr(self, "_covered_set_timesteps", None), None
        # Only take out our own shadow; whatever another technique set or restored meanwhile stays.
        if scheduler is not None and scheduler.__dict__.get("set_timesteps") is getattr(self, "_shadow", None):
            if covered is not None:
                scheduler.__dict__["set_timesteps"] = covered
            else:
                scheduler.__dict__.pop("set_timesteps", None)

    def _truncate(self, stage: _Stage, scheduler) -> None:
        total = len(scheduler.timesteps)
        steps = schedules.stage_steps(total, stage.renoise)
        if stage.guided_steps is None:
            stage.guided_steps = max(1, int(round(steps * DEFAULT_GUIDED_FRACTION)))
        if stage.guided_steps > steps:
            raise ValueError(f"StructureGuidanceConfig.guided_steps={stage.guided_steps} exceeds the {steps} steps of the "
                             f"{stage.height}x{stage.width} stage (renoise {stage.renoise} of {total}); lower it or raise "
                             "renoise / num_inference_steps")
        schedules.truncate_schedule(scheduler, total - steps)
        stage.steps = steps
        stage.start_timestep = scheduler.timesteps[0]
        stage.timesteps = tuple(float(t) for t in scheduler.timesteps)
        if stage.target is not None:
            self._fill(stage)

    def _stage_target(self, result) -> torch.Tensor:
        stage = self.stage
        current = result[0] if isinstance(result, tuple) else result
        target = stage.target = torch.empty_like(current)
        if stage.start_timestep is not None:  # the pipeline set its schedule before its latents
            self._fill(stage)
        return target

    def _fill(self, stage: _Stage) -> None:
        """Write the re-noised upscaled result into the tensor the pipeline's loop will start from."""
        target = stage.target
        batch = target.shape[0]
        x0 = tile_batch(stage.x0, batch).to(target.device)
        noise = randn_tensor(x0.shape, generator=stage.generator, device=target.device, dtype=torch.float32)
        noisy = schedules.renoise(self.pipe.scheduler, x0, noise, stage.start_timestep)
        if self.info.family.latent_layout == "packed":
            noisy = pack(noisy, self.info.patch_size)
        target.copy_(noisy.to(target.dtype))
        stage.target = None

    # -- the denoiser-side guidance -----------------------------------------------------------
    def guide_output(self, output: torch.Tensor, sample: torch.Tensor, timestep, state) -> torch.Tensor:
        """The model output with its predicted x0's low band replaced by the stage's guide."""
        stage, info = self.stage, self.info
        packed = info.family.latent_layout == "packed"
        lh, lw = state.latent_height, state.latent_width
        x = unpack(sample, lh, lw, info.patch_size) if packed else sample
        full = unpack(output, lh, lw, info.patch_size) if packed else output
        channels = x.shape[1]
        prediction, rest = full[:, :channels], full[:, channels:]  # PixArt's learned sigma stays as it is
        t = torch.as_tensor(timestep).flatten()[0].double() / info.family.timestep_input_scale
        level = schedules.noise_level(self.pipe.scheduler, info.prediction_type, t).to(x.device)
        x0 = schedules.predicted_x0(prediction, x, info.prediction_type, level)
        x0 = self._swap(x0, state)
        new = schedules.output_from_x0(x0, x, info.prediction_type, level).to(output.dtype)
        if rest.shape[1]:
            new = torch.cat([new, rest], dim=1)
        return pack(new, info.patch_size) if packed else new

    def _swap(self, x0: torch.Tensor, state) -> torch.Tensor:
        config, guide = self.config, self.stage.guide
        level = config.wavelet_level
        if config.space == "latent":  # affine in x0, so swapping each half equals swapping the guided x0
            return wavelets.swap_low_band(x0, tile_batch(guide, x0.shape[0]).to(x0.device), config.wavelet, level, WAVELET_MODE)
        # Pixel space: the VAE is not linear, so swap the guided prediction once and move every
        # half by the same amount; the pipeline's combination then yields exactly the swapped x0.
        halves = state.guidance_scale is not None and info_batched(self.info) and x0.shape[0] % 2 == 0
        if halves:
            uncond, cond = x0.chunk(2)
            guided = uncond + state.guidance_scale * (cond - uncond)
        else:
            guided = x0
        image = self.decode(guided)
        image = wavelets.swap_low_band(image, tile_batch(guide, image.shape[0]).to(image.device), config.wavelet, level, WAVELET_MODE)
        delta = self.encode(image) - guided
        return x0 + (torch.cat([delta, delta]) if halves else delta)


def _called_from(frame, depth: int = 4) -> bool:
    """Whether `frame` is among the few callers of the caller (set_timesteps <- retrieve_timesteps <- __call__)."""
    current = sys._getframe(2)
    for _ in range(depth):
        if current is None:
            return False
        if current is frame:
            return True
        current = current.f_back
    return False


def info_batched(info) -> bool:
    return info.family.guidance_layout == "batched"


class _StructureGuidanceHook(ModelHook):
    """Swaps the low band of the predicted x0 during a stage's first guided steps."""

    def __init__(self, controller: _Progressive):
        super().__init__()
        self.controller = controller
        self.signature = inspect.signature(type(controller.attachment.denoiser).forward)
        self.pending = None

    def pre_forward(self, module, *args, **kwargs):
        self.pending = None
        controller = self.controller
        stage, state = controller.stage, controller.attachment.state
        if stage is None or stage.guide is None or state is None or state.step_index >= stage.guided_steps:
            return args, kwargs
        bound = self.signature.bind_partial(module, *args, **kwargs).arguments
        sample = next(v for k, v in bound.items() if k != "self")
        self.pending = (sample, bound["timestep"], state)
        return args, kwargs

    def deinitalize_hook(self, module):  # diffusers' spelling; runs when hires.remove takes the hook out
        self.controller._drop_outer()  # a call that raised after its stages may have left a scheduler shadow
        return module

    def post_forward(self, module, output):
        if self.pending is None:
            return output
        sample, timestep, state = self.pending
        self.pending = None
        prediction = output[0] if isinstance(output, tuple) else output.sample
        guided = self.controller.guide_output(prediction, sample, timestep, state)
        self.controller.stage.guided.add(state.step_index)
        if isinstance(output, tuple):
            return (guided, *output[1:])
        output.sample = guided
        return output


_CONTROLLERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def install(attachment, config: StructureGuidanceConfig) -> None:
    """hires.apply's installer: validate against the family, wrap the pipeline's entry points."""
    validate(config, attachment.info)
    controller = _Progressive(attachment, config)
    # Instance attributes shadowing the pipeline's own methods, restored by hires.remove.
    attachment.wrap_pipe_method("encode_prompt", controller.wrap_encode_prompt)
    attachment.wrap_pipe_method("prepare_latents", controller.wrap_prepare_latents)
    if "control_image" in controller.call_params and hasattr(attachment.pipe, "prepare_image"):
        attachment.wrap_pipe_method("prepare_image", controller.wrap_prepare_image)
    # The guidance hook goes in first, beneath ours: the low-band swap then acts on outputs whose
    # CFG combination already is APG's / noise-damped guidance's result, so the swap stays exact.
    ensure_guidance_hook(attachment)
    attachment.add_hook(attachment.denoiser, _StructureGuidanceHook(controller), HOOK_NAME)
    _CONTROLLERS[attachment] = controller
    stage_apgs = config.apg if isinstance(config.apg, tuple) else (config.apg,)
    if any(a is not None and a.enabled for a in stage_apgs) and not attachment.config.apg.enabled:
        from ..techniques import apg  # only stages ask for APG: install it, off for the base generation

        apg.install(attachment, attachment.config.apg)


def controller_of(attachment) -> "_Progressive | None":
    """The structure-guidance driver of an attachment (None when structure guidance is off)."""
    return _CONTROLLERS.get(attachment) if attachment is not None else None


def current_stage(attachment) -> "_Stage | None":
    """The stage being denoised right now (None outside a progressive run)."""
    controller = controller_of(attachment)
    return controller.stage if controller is not None else None


def _controller(pipe) -> _Progressive:
    controller = controller_of(get_attachment(pipe))
    if controller is None:
        raise ValueError("structure guidance is not applied to this pipeline: call hires.apply(pipe, "
                         "HiresConfig(structure_guidance=StructureGuidanceConfig(enabled=True))) first")
    return controller


def last_run(pipe) -> tuple[StageRecord, ...] | None:
    """The stages of the last progressive call on `pipe` (None if none ran)."""
    return _controller(pipe).last_run


def testbed_configs():
    """Rows for the coherence testbed (scripts/eval_coherence.py): structure guidance with the presets
    (DiffuseHigh ladder, re-noise 0.3, a third of each stage guided), in latent and in pixel space."""
    from ..config import HiresConfig

    return {f"structure guidance ({space})": HiresConfig(structure_guidance=StructureGuidanceConfig(enabled=True, space=space))
            for space in ("latent", "pixel")}


def generate(pipe, prompt=None, height: int | None = None, width: int | None = None, image=None, **call_kwargs):
    """Call `pipe` with structure guidance; with `image` (PIL image, array or tensor in [0, 1]) the
    stages start from that picture instead of a base generation. Returns the pipeline's output."""
    controller = _controller(pipe)
    if image is not None:
        processed = pipe.image_processor.preprocess(image)
        controller.pending_image = processed.to(device=pipe._execution_device, dtype=torch.float32)
    try:
        return pipe(prompt=prompt, height=height, width=width, **call_kwargs)
    finally:
        controller.pending_image = None
