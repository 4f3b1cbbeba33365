"""DemoFusion's skip residual (also FreeScale's restart blend): keep a high-resolution stage close to
the upscaled result it started from while the noise is high.

A stage that starts from an upscaled previous result z_up (structure guidance's stages, bottleneck's
upscaling stage, or a stage that upscales the user's picture) is noised to its first timestep with
one noise draw eps from the call's generator (the stage engine's own start). Before each later
step at timestep t the latent is blended toward z_up noised to t with that same eps:

    z = (1 - c1) z + c1 noised(z_up, eps, t),  c1 = cosf(t) ** exponent,
    cosf(t) = (1 + cos(pi (1000 - t) / 1000)) / 2.

DemoFusion uses exponent 3, FreeScale 2. At the first step the latent *is* noised(z_up, eps, t0),
so the blend starts at the second step; the engine applies it to each step's result with the next
step's timestep, which is the same thing. t is read on SDXL's training schedule at the sample's
signal-to-noise ratio (`schedules.cosine_factor`): SD / SDXL use their own t, flow families the t of
equal SNR to their sigma. The blend uses the scheduler's own noising (`schedules.renoise`), so each
scheduler's sample convention holds.

How it composes. `SkipResidual` is a planner of the stage engine installed after the staged
techniques: it leaves their plan as it is and adds its blend (`Stage.after_step`) to every stage that
starts from an upscaled result; the engine keeps the stage's clean start and noise while it runs. It
needs a staged technique to be on. Note that with structure guidance's default renoise (0.3, t about
281 on SDXL) c1 is below 0.01; it matters with stronger re-noising (FreeScale 0.7, DemoFusion 1).
"""

from __future__ import annotations

import dataclasses

import torch

from ...sampling import schedules
from ...sampling.stages import Stage, planner_of, tile_batch
from .config import SkipResidualConfig

TECHNIQUE_NAME = "skip_residual"


def skip_weight(cosine: float, exponent: float) -> float:
    """c1 = cosf ** exponent."""
    return float(cosine) ** exponent


def blend(latents: torch.Tensor, noised_start: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - c1) z + c1 noised_start, in float32."""
    return (1 - weight) * latents.float() + weight * noised_start.float()


@dataclasses.dataclass(frozen=True)
class SkipRecord:
    """The blend weight applied after each step of one stage (see `last_run`)."""

    height: int
    width: int
    weights: tuple[float, ...]


class SkipResidual:
    """The planner that adds the blend to every stage that starts from an upscaled result."""

    def __init__(self, info, config: SkipResidualConfig, attachment=None):
        self.attachment = attachment
        self.config = config
        self.last: list[tuple[Stage, list[float]]] = []

    def plan(self, request, stages: list) -> list:
        self.last = []
        previous = None
        for stage in stages:
            grows = previous is None or stage.height * stage.width > previous.height * previous.width
            if stage.start is not None and grows:
                weights: list[float] = []
                self.last.append((stage, weights))
                stage.after_step = [*stage.after_step, self._make_blend(weights)]
            previous = stage
        return stages

    def _make_blend(self, weights: list[float]):
        def after_step(stage: Stage, index: int, latents: torch.Tensor) -> torch.Tensor:
            if index + 1 >= stage.steps or stage.x0 is None or stage.noise is None:
                return latents  # the last step leaves the clean end: cosf there is 0 anyway
            scheduler = self.attachment.pipe.scheduler
            t_next = scheduler.timesteps[index + 1]  # the scheduler's own dtype (DDIM indexes with it)
            weight = skip_weight(schedules.cosine_factor(scheduler, self.attachment.info.prediction_type, t_next),
                                 self.config.exponent)
            weights.append(weight)
            state = self.attachment.state
            if state is not None:
                state.log["log.skip_residual.weights"] = tuple(weights)
            x0 = tile_batch(stage.x0, latents.shape[0]).to(latents.device, torch.float32)
            noised = schedules.renoise(scheduler, x0, stage.noise.to(latents.device), t_next)
            return blend(latents, noised, weight)

        return after_step


def last_run(pipe) -> tuple[SkipRecord, ...] | None:
    """The blend weights of the last staged call on `pipe`, one record per blended stage (None if none)."""
    planner = planner_of(pipe, TECHNIQUE_NAME)
    if planner is None:
        raise ValueError("skip residual is not applied to this pipeline: call hires.apply(pipe, HiresConfig("
                         "structure_guidance=StructureGuidanceConfig(enabled=True), skip_residual="
                         "SkipResidualConfig(enabled=True))) first")
    if not planner.last:
        return None
    return tuple(SkipRecord(stage.height, stage.width, tuple(weights)) for stage, weights in planner.last)
