"""Bottleneck sampling (Tian, Xia et al., arXiv 2503.18940): high -> low -> high resolution stages.

How a call runs. With `BottleneckConfig(enabled=True)`, `pipe(prompt, height=H, width=W,
num_inference_steps=N)` runs K stages. Stage i denoises at (round(H s_i), round(W s_i)) (multiples of
the family's size multiple) for a contiguous slice [start_i, end_i) of the call's own N-step schedule.
`Bottleneck` is a planner of the stage engine (hires.sampling.stages): it replaces every stage that
samples from pure noise with its full schedule by these K slices, which the engine runs as nested
calls of the same pipeline (`output_type="latent"`); the user's own call then only decodes. Every
stage is a pipeline call, so the runtime's call state, and every other technique, sees the stage's
own size.

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

Composition with progressive structure guidance: structure guidance plans first, so bottleneck
slices its base stage (the one that samples from pure noise); its later stages re-run the tail of a
schedule from an upscaled image and are left as they are. `last_run(pipe)` describes the stages of
the last call.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction

import torch

from ...families import round_to
from ...sampling import schedules
from ...sampling.stages import Stage, last_run_of, planner_of
from ...sampling.resize import resize
from .config import BottleneckConfig

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
                    f"BottleneckConfig.renoise[{i - 1}]={r} restarts "
                    f"stage {i} at step {start} of {num_steps}, after the "
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


class Bottleneck:
    """The planner: every stage that samples from pure noise with its full schedule becomes K slices."""

    def __init__(self, info, config: BottleneckConfig, attachment=None):
        self.attachment = attachment
        self.config = config
        self.info = info

    def plan(self, request, stages: list) -> list:
        planned = []
        for stage in stages:
            planned.extend(self._slices(request, stage) if stage.trivial else [stage])
        return planned

    def _slices(self, request, parent: Stage) -> list:
        steps = request.steps
        if not isinstance(steps, int):
            raise ValueError(f"num_inference_steps={steps!r}: bottleneck sampling splits the call's step count "
                             "between its stages and needs it as an int")
        plans = plan_stages(self.info, self.config, parent.height, parent.width, steps)
        slices = []
        for i, plan in enumerate(plans):
            slices.append(Stage(plan.height, plan.width, owner=TECHNIQUE_NAME, generator=parent.generator,
                                call_arguments=dict(parent.call_arguments), settings=dict(parent.settings),
                                schedule=self._schedule, start=self._start if i else None,
                                stops_early=i < len(plans) - 1, data=(plan, steps), parent=parent,
                                planned_steps=plan.steps))
        return slices

    def _start(self, stage: Stage, previous: Stage) -> torch.Tensor:
        f = self.info.latent_factor
        return resize(previous.result.float(), (stage.height // f, stage.width // f), self.config.resample)

    def _schedule(self, stage: Stage, scheduler, set_timesteps, args, kwargs) -> None:
        """The call's own N-step schedule at this stage's size and shift, sliced to the stage's steps."""
        plan, total_steps = stage.data
        schedules.set_timesteps_with_shift(scheduler, set_timesteps, args, kwargs, plan.shift)
        total = len(scheduler.timesteps)
        if total != total_steps:
            raise ValueError(f"bottleneck sampling slices the call's {total_steps}-step schedule, but "
                             f"{type(scheduler).__name__} built {total} steps; use a first-order scheduler "
                             "(e.g. FlowMatchEulerDiscreteScheduler, EulerDiscreteScheduler, DDIMScheduler)")
        if plan.start:
            schedules.truncate_schedule(scheduler, plan.start)
        if plan.end < total:
            keep_first(scheduler, plan.steps)


TECHNIQUE_NAME = "bottleneck"


def last_run(pipe) -> tuple[StageRecord, ...] | None:
    """The stages of the last bottleneck call on `pipe` (None if none finished)."""
    planner = planner_of(pipe, TECHNIQUE_NAME)
    if planner is None:
        raise ValueError("bottleneck sampling is not applied to this pipeline: call hires.apply(pipe, "
                         "HiresConfig(bottleneck=BottleneckConfig(enabled=True))) first")
    stages = last_run_of(planner.attachment.stages, TECHNIQUE_NAME)
    if stages is None:
        return None
    return tuple(StageRecord(s.height, s.width, s.steps, s.timesteps, s.data[0].shift) for s in stages)
