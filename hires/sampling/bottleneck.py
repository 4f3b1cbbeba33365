"""Bottleneck sampling (Tian, Xia et al., arXiv 2503.18940): high -> low -> high resolution stages.

How a call runs. With `BottleneckConfig(enabled=True)`, `pipe(prompt, height=H, width=W,
num_inference_steps=N)` runs K stages. Stage i denoises at (round(H s_i), round(W s_i)) (multiples of
the family's size multiple) for a contiguous slice [start_i, end_i) of the call's own N-step schedule.
The mechanism is the one of progressive structure guidance (hires.sampling.progressive): when the
user's call reaches `encode_prompt`, its arguments are read from the `__call__` frame and stages
0..K-2 run as nested calls of the same pipeline (`output_type="latent"`); the scheduler's
`set_timesteps` keeps only the stage's slice and `prepare_latents` returns the stage's starting
latent. The user's own call is the last stage (it is at the requested size): it gets the last slice
and the re-noised latent, and decodes as usual. Every stage is a pipeline call, so the runtime's call
state, and every other technique, sees the stage's own size.

Transitions. At the last step of stages 0..K-2 the scheduler's input (the guided model output and the
sample) gives the predicted clean latent x0 (`schedules.predicted_x0`, any prediction type). x0 is
resized to the next stage (Lanczos-3 by default, antialiased when shrinking; or bicubic) and noised
to the next stage's first timestep with the scheduler's own forward process (`schedules.renoise`):
x = (1 - sigma) x0 + sigma eps for flow families, sqrt(a) x0 + sqrt(1 - a) eps for DDPM-type
schedulers (x0 + sigma eps in Euler's convention); eps comes from the call's generator. This is the
paper's noise re-injection: the new stage starts from its own noise level, not from a resized noisy
latent whose noise no longer has the right statistics.

Defaults and their sources (the paper's own per-stage values were not recoverable; see
/work/shared/references/attention_guidance.md (c)):
- scales (1, 0.5, 1): the paper's high -> low -> high with half the side (a quarter of the tokens).
- step fractions (0.1, 0.7, 0.2): Pruna's layout (the first 10% of the steps at full size, then a
  `fraction` at low size, then full size) with fraction 0.7, which leaves 20% at full size; RALU's
  reproduced boundaries put 19-24% of the steps in the last stage. Measured denoiser FLOPs against
  full-size sampling at the same step count (scripts/benchmarks/bottleneck.py, which also reports
  Pruna's 10/60/30 and RALU's Flux 5x boundaries): Flux.1-dev 28 steps (3 / 20 / 5) 2.03x at 1024²
  (its 512 text tokens keep the low stage above a quarter of the cost) and 2.42x at 2048²; SDXL 50
  steps 2.15x (1024²) and 2.32x (2048²). Other K: 10% first, 20% last, the middle stages share the
  rest.
- renoise None: stage i+1 starts where stage i stopped in the schedule (index end_i). A value r is the
  fraction of the schedule still ahead where stage i+1 restarts (1 = pure noise): a larger r than
  1 - end_i/N re-runs the steps in between at the new size, as structure guidance's re-noise does.
- shifts None: each stage keeps its pipeline's own shift at the stage's size (Flux: the dynamic mu of
  the stage's token count, so the low stage already gets a lower shift; SD3: its static shift). A
  value s is the SD3/Flux time shift t' = s t / (1 + (s - 1) t) of that stage's schedule (flow
  families only).

Composition with progressive structure guidance: bottleneck runs inside the base stage (the one
that samples from pure noise); progressive's later stages re-run the tail of a schedule from an
upscaled image and are left as they are. `last_run(pipe)` describes the stages of the last call.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import sys
import weakref
from fractions import Fraction
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.utils.torch_utils import randn_tensor

from ..config import BottleneckConfig
from . import progressive, schedules
# Shared with progressive structure guidance (see the module docstring).
from .progressive import RESIZING_ARGUMENTS, pack, resize, round_to, tile_batch, unpack

HOOK_NAME = "hires.bottleneck"
DEFAULT_STEP_FRACTIONS = (0.1, 0.7, 0.2)
FIRST_FRACTION, LAST_FRACTION = 0.1, 0.2  # for K != 3: 10% first, 20% last, the rest shared


# -- the plan -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StagePlan:
    height: int
    width: int
    start: int  # first index into the call's N-step schedule
    end: int  # one past the last
    shift: float | None  # static time shift of the stage's schedule (None: the pipeline's own)

    @property
    def steps(self) -> int:
        return self.end - self.start


def default_step_fractions(stages: int) -> tuple[float, ...]:
    if stages == 3:
        return DEFAULT_STEP_FRACTIONS
    middle = (1 - FIRST_FRACTION - LAST_FRACTION) / (stages - 2)
    return (FIRST_FRACTION,) + (middle,) * (stages - 2) + (LAST_FRACTION,)


def split_steps(total: int, fractions: tuple[float, ...]) -> list[int]:
    """Steps per stage: each stage's share of `total`, rounded by largest remainder, at least 1 each.

    Shares are exact fractions, so equal remainders are true ties (0.7 * 28 and 0.2 * 28 both leave
    0.6, which float arithmetic would order by rounding noise); a tie goes to the earlier stage."""
    if total < len(fractions):
        raise ValueError(f"num_inference_steps={total} is fewer than the {len(fractions)} bottleneck stages; "
                         f"use at least {len(fractions)} steps (the default schedule is meant for 20 or more)")
    exact = [Fraction(f).limit_denominator(10**6) * total for f in fractions]
    counts = [max(1, math.floor(e)) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    i = 0
    while sum(counts) < total:
        counts[order[i % len(order)]] += 1
        i += 1
    while sum(counts) > total:  # only when the floor of 1 took steps from elsewhere; ties: the later stage gives
        j = max((k for k in range(len(counts)) if counts[k] > 1), key=lambda k: (counts[k] - exact[k], k))
        counts[j] -= 1
    return counts


def time_shift(t, shift: float):
    """The SD3/Flux static time shift s t / (1 + (s - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def plan_stages(info, config: BottleneckConfig, height: int, width: int, num_steps: int) -> list[StagePlan]:
    """Sizes, schedule slices and shifts of every stage of a call at height x width with num_steps."""
    scales = config.scales
    fractions = config.step_fractions or default_step_fractions(len(scales))
    counts = split_steps(num_steps, fractions)
    ends = list(itertools.accumulate(counts))
    m = info.size_multiple
    shifts = config.shifts or (None,) * len(scales)
    stages = []
    for i, scale in enumerate(scales):
        size = (height, width) if scale == 1.0 else (round_to(height * scale, m), round_to(width * scale, m))
        start = 0 if i == 0 else ends[i - 1]
        if i > 0 and config.renoise is not None:
            r = config.renoise[i - 1]
            start = min(num_steps - 1, int(math.floor((1 - r) * num_steps + 0.5)))
            if start > ends[i - 1] or start >= ends[i]:
                raise ValueError(
                    f"BottleneckConfig.renoise[{i - 1}]={r} restarts stage {i} at step {start} of {num_steps}, after the "
                    f"stage's own steps {ends[i - 1]}..{ends[i] - 1} would begin; use renoise >= "
                    f"{1 - ends[i - 1] / num_steps:.3f} (the fraction of the schedule still ahead at that transition)")
        stages.append(StagePlan(size[0], size[1], start, ends[i], shifts[i]))
    if (stages[-1].height, stages[-1].width) != (height, width):
        raise ValueError(f"the last bottleneck stage is {stages[-1].height}x{stages[-1].width}, not the requested "
                         f"{height}x{width}; BottleneckConfig.scales must end at 1.0")
    return stages


# -- schedule and transition math ---------------------------------------------------------------
def keep_first(scheduler, count: int) -> None:
    """Keep the scheduler's first `count` steps (the sigma after the last one stays, as its target)."""
    total = len(scheduler.timesteps)
    if not 0 < count <= total:
        raise ValueError(f"count={count} must be within the {total}-step schedule")
    scheduler.timesteps = scheduler.timesteps[:count]
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and sigmas.ndim == 1 and len(sigmas) in (total, total + 1):
        scheduler.sigmas = sigmas[:count + (len(sigmas) - total)]


def clean_estimate(scheduler, prediction: str, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> torch.Tensor:
    """The predicted x0 of one scheduler step's inputs (float32), for any prediction type.

    Euler-type VP schedulers keep x0 + sigma eps; the denoiser saw it scaled by `scale_model_input`,
    which is the sample `schedules.predicted_x0` expects."""
    x = sample
    if prediction != "flow" and hasattr(scheduler, "scale_model_input"):
        x = scheduler.scale_model_input(sample.clone(), timestep)
    level = schedules.noise_level(scheduler, prediction, timestep).to(sample.device)
    return schedules.predicted_x0(model_output, x, prediction, level)


def transition(scheduler, x0: torch.Tensor, latent_size: tuple[int, int], mode: str, noise: torch.Tensor,
               timestep) -> torch.Tensor:
    """x0 (B, C, h, w) resized to `latent_size` and noised to `timestep` in the scheduler's convention."""
    resized = resize(x0.float(), latent_size, mode)
    return schedules.renoise(scheduler, resized, noise.float(), timestep)


# -- one run ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageRecord:
    """What one stage did (see `last_run`)."""

    height: int
    width: int
    steps: int
    timesteps: tuple[float, ...]
    shift: float | None


@dataclasses.dataclass
class _Stage:
    plan: StagePlan
    final: bool
    x0: torch.Tensor | None = None  # previous stage's clean estimate, resized to this stage (spatial)
    generator: Any = None
    timesteps: tuple = ()
    start_timestep: Any = None
    target: torch.Tensor | None = None
    steps_taken: int = 0
    captured: torch.Tensor | None = None  # this stage's own clean estimate at its last step
    latents_done: bool = False

    def record(self) -> StageRecord:
        return StageRecord(self.plan.height, self.plan.width, len(self.timesteps), self.timesteps, self.plan.shift)


class _Bottleneck:
    def __init__(self, attachment, config: BottleneckConfig):
        self.attachment = attachment
        self.config = config
        self.info = attachment.info
        self.pipe = attachment.pipe
        params = inspect.signature(inspect.unwrap(type(self.pipe).__call__)).parameters.values()
        self.call_params = [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        self.running = False  # nested stage calls in progress
        self.current: _Stage | None = None
        self.pending_frame = None  # the call that runs the last stage
        self.records: list[StageRecord] = []
        self.last_run: tuple[StageRecord, ...] | None = None
        self._saved_scheduler_attrs: dict[str, tuple[bool, Any]] = {}

    # -- pipeline entry points --------------------------------------------------------------
    def wrap_encode_prompt(self, original):
        def encode_prompt(*args, **kwargs):
            result = original(*args, **kwargs)
            frame = self._caller()
            if self.running or frame is None or frame is self.pending_frame:
                return result
            self._abandon()
            if self._eligible(frame):
                self._run(frame)
            return result

        return encode_prompt

    def wrap_prepare_latents(self, original):
        def prepare_latents(*args, **kwargs):
            result = original(*args, **kwargs)
            stage = self.current
            if stage is None or stage.x0 is None or stage.latents_done:
                return result
            frame = self._caller()
            if frame is None or not (self.running or frame is self.pending_frame):
                return result
            current = result[0] if isinstance(result, tuple) else result
            stage.target = torch.empty_like(current)
            stage.latents_done = True
            if stage.start_timestep is not None:  # the pipeline set its schedule first
                self._fill(stage)
            out = progressive.replace_latents(result, stage.target)
            self._maybe_finish()
            return out

        return prepare_latents

    def _caller(self):
        """The pipeline __call__ frame that called the wrapped method (through structure guidance's
        wrapper, which sits outside ours), or None."""
        frame = sys._getframe(2)
        if self.attachment.pipeline_call_frame(frame) is None and frame.f_code.co_filename == progressive.__file__:
            frame = frame.f_back
        return frame if self.attachment.pipeline_call_frame(frame) is not None else None

    def _eligible(self, frame) -> bool:
        guidance = progressive.controller_of(self.attachment)
        if guidance is not None:
            if guidance.outer is not None and guidance.outer[0] is frame:
                return False  # structure guidance's own call: it only decodes
            if guidance.running and guidance.stage is not None and guidance.stage.x0 is not None:
                return False  # a later structure-guidance stage re-runs a schedule tail: left as it is
        values = frame.f_locals
        return values.get("height") is not None and values.get("width") is not None

    # -- the run ------------------------------------------------------------------------------
    def _run(self, frame) -> None:
        values = frame.f_locals
        arguments = {name: values[name] for name in self.call_params if name in values}
        height, width = int(arguments["height"]), int(arguments["width"])
        steps = arguments.get("num_inference_steps")
        if not isinstance(steps, int):
            raise ValueError(f"num_inference_steps={steps!r}: bottleneck sampling splits the call's step count "
                             "between its stages and needs it as an int")
        plans = plan_stages(self.info, self.config, height, width, steps)
        generator = arguments.get("generator")
        stages = [_Stage(p, final=i == len(plans) - 1, generator=generator) for i, p in enumerate(plans)]
        self.total_steps = steps
        self.records = []
        saved = {k: v for k, v in self.pipe.__dict__.items() if k.startswith("_") and not k.startswith("_hires")}
        guidance = progressive.controller_of(self.attachment)
        quiet_guidance = guidance is not None and not guidance.running
        self._shadow("set_timesteps", self._set_timesteps)
        self._shadow("step", self._step)
        self.running = True
        if quiet_guidance:
            guidance.running = True  # stage calls are not user requests for structure guidance
        try:
            previous = None
            for stage in stages[:-1]:
                self._enter(stage, previous)
                kwargs = dict(arguments)
                kwargs.update(height=stage.plan.height, width=stage.plan.width, output_type="latent", return_dict=False)
                if stage.x0 is not None:
                    kwargs["latents"] = None
                kwargs.update({k: v for k, v in RESIZING_ARGUMENTS.items() if k in self.call_params})
                self.pipe(**kwargs)
                if stage.captured is None:
                    raise RuntimeError(f"bottleneck stage {stage.plan.height}x{stage.plan.width} ran no step of its schedule")
                self.records.append(stage.record())
                previous = stage
            self._enter(stages[-1], previous)
        except BaseException:
            self._restore_scheduler()
            self.current = None
            raise
        finally:
            self.running = False
            if quiet_guidance:
                guidance.running = False
            self._unshadow("step")
            self.pipe.__dict__.update(saved)
        self.pending_frame = frame

    def _enter(self, stage: _Stage, previous: _Stage | None) -> None:
        if previous is not None:
            x0 = previous.captured
            if self.info.family.latent_layout == "packed":
                f = self.info.latent_factor
                x0 = unpack(x0, previous.plan.height // f, previous.plan.width // f, self.info.patch_size)
            f = self.info.latent_factor
            stage.x0 = resize(x0.float(), (stage.plan.height // f, stage.plan.width // f), self.config.resample)
        self.current = stage

    def _fill(self, stage: _Stage) -> None:
        target = stage.target
        x0 = tile_batch(stage.x0, target.shape[0]).to(target.device)
        noise = randn_tensor(x0.shape, generator=stage.generator, device=target.device, dtype=torch.float32)
        noisy = schedules.renoise(self.pipe.scheduler, x0, noise, stage.start_timestep)
        if self.info.family.latent_layout == "packed":
            noisy = pack(noisy, self.info.patch_size)
        target.copy_(noisy.to(target.dtype))

    def _maybe_finish(self) -> None:
        stage = self.current
        if stage is not None and stage.final and not self.running and stage.start_timestep is not None \
                and (stage.latents_done or stage.x0 is None):
            self.records.append(stage.record())
            self.last_run = tuple(self.records)
            self.current = None
            self.pending_frame = None
            self._restore_scheduler()

    def _abandon(self) -> None:
        """Drop what a call that raised before its last stage left behind."""
        if self.pending_frame is not None or self._saved_scheduler_attrs:
            self._restore_scheduler()
        self.pending_frame = None
        self.current = None

    # -- scheduler shadows ---------------------------------------------------------------------
    def _shadow(self, name: str, make) -> None:
        scheduler = self.pipe.scheduler
        self._saved_scheduler_attrs[name] = (name in scheduler.__dict__, scheduler.__dict__.get(name))
        original = getattr(scheduler, name)
        scheduler.__dict__[name] = functools.update_wrapper(make(original), original)

    def _unshadow(self, name: str) -> None:
        if name not in self._saved_scheduler_attrs:
            return
        had, value = self._saved_scheduler_attrs.pop(name)
        scheduler = self.pipe.scheduler
        if had:
            scheduler.__dict__[name] = value
        else:
            scheduler.__dict__.pop(name, None)

    def _restore_scheduler(self) -> None:
        for name in list(self._saved_scheduler_attrs):
            self._unshadow(name)

    def _set_timesteps(self, original):
        controller = self

        def set_timesteps(*args, **kwargs):
            stage = controller.current
            if stage is None:
                return original(*args, **kwargs)
            scheduler = controller.pipe.scheduler
            controller._with_shift(stage.plan.shift, original, args, kwargs)
            total = len(scheduler.timesteps)
            if total != controller.total_steps:
                raise ValueError(f"bottleneck sampling slices the call's {controller.total_steps}-step schedule, but "
                                 f"{type(scheduler).__name__} built {total} steps; use a first-order scheduler "
                                 "(e.g. FlowMatchEulerDiscreteScheduler, EulerDiscreteScheduler, DDIMScheduler)")
            plan = stage.plan
            if plan.start:
                schedules.truncate_schedule(scheduler, plan.start)
            if plan.end < total:
                keep_first(scheduler, plan.steps)
            stage.timesteps = tuple(float(t) for t in scheduler.timesteps)
            stage.start_timestep = scheduler.timesteps[0]
            if stage.target is not None:
                controller._fill(stage)
            controller._maybe_finish()

        return set_timesteps

    def _with_shift(self, shift, original, args, kwargs) -> None:
        scheduler = self.pipe.scheduler
        if shift is None:
            original(*args, **kwargs)
            return
        if scheduler.config.get("use_dynamic_shifting", False):
            from ..techniques.positions import mu_for_shift

            original(*args, **{**kwargs, "mu": mu_for_shift(shift, scheduler.config.get("time_shift_type", "exponential"))})
            return
        before = scheduler.shift
        scheduler.set_shift(shift)
        try:
            original(*args, **kwargs)
        finally:
            scheduler.set_shift(before)

    def _step(self, original):
        controller = self
        names = list(inspect.signature(original).parameters)

        def step(*args, **kwargs):
            stage = controller.current
            if stage is not None and controller.running and not stage.final:
                stage.steps_taken += 1
                if stage.steps_taken == stage.plan.steps:
                    bound = dict(zip(names, args))
                    bound.update(kwargs)
                    stage.captured = clean_estimate(controller.pipe.scheduler, controller.info.prediction_type,
                                                    bound["model_output"], bound["timestep"], bound["sample"])
            return original(*args, **kwargs)

        return step


class _CleanupHook(ModelHook):
    """No-op on the denoiser; its removal (hires.remove) drops what a call that raised after its stage
    calls left on the scheduler."""

    def __init__(self, controller: _Bottleneck):
        super().__init__()
        self.controller = controller

    def deinitalize_hook(self, module):  # diffusers' spelling
        self.controller._abandon()
        return module


_CONTROLLERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def validate(config: BottleneckConfig, info) -> None:
    if config.shifts is not None and info.prediction_type != "flow":
        raise ValueError(f"BottleneckConfig.shifts={config.shifts!r} is a flow-matching time shift; {info.name} "
                         f"predicts {info.prediction_type!r}. Leave shifts=None for this family")


def install(attachment, config: BottleneckConfig) -> None:
    """hires.apply's installer: validate against the family, wrap encode_prompt and prepare_latents."""
    validate(config, attachment.info)
    controller = _Bottleneck(attachment, config)
    guidance = progressive.controller_of(attachment)  # installed before us (HiresConfig field order)
    for name in ("encode_prompt", "prepare_latents"):
        make = getattr(controller, "wrap_" + name)
        if guidance is not None and attachment.wraps(name):  # structure guidance's stays outermost
            attachment.wrap_pipe_method_beneath(name, make, getattr(guidance, "wrap_" + name))
        else:
            attachment.wrap_pipe_method(name, make)
    attachment.add_hook(attachment.denoiser, _CleanupHook(controller), HOOK_NAME)
    _CONTROLLERS[attachment] = controller


def _controller(pipe) -> _Bottleneck:
    from ..runtime import get_attachment

    attachment = get_attachment(pipe)
    controller = _CONTROLLERS.get(attachment) if attachment is not None else None
    if controller is None:
        raise ValueError("bottleneck sampling is not applied to this pipeline: call hires.apply(pipe, "
                         "HiresConfig(bottleneck=BottleneckConfig(enabled=True))) first")
    return controller


def last_run(pipe) -> tuple[StageRecord, ...] | None:
    """The stages of the last bottleneck call on `pipe` (None if none finished)."""
    return _controller(pipe).last_run


def testbed_configs():
    """Rows for the coherence testbed (scripts/eval_coherence.py): the default schedule, and Pruna's
    10/60/30 layout, both at half side in the middle stage."""
    from ..config import HiresConfig

    return {
        "bottleneck (default 10/70/20)": HiresConfig(bottleneck=BottleneckConfig(enabled=True)),
        "bottleneck (Pruna 10/60/30)": HiresConfig(bottleneck=BottleneckConfig(enabled=True, step_fractions=(0.1, 0.6, 0.3))),
    }
