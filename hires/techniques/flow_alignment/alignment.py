"""HiFlow's flow-aligned guidance, on top of structure guidance's stages (flow-matching families).

Structure guidance already runs HiFlow's cascade: each upscaled stage starts from the previous
result, upscaled and noised to the first timestep of the tail of the base schedule (with the base
size's shift). This technique adds HiFlow's guidance in those stages (Bujiazi/HiFlow
`flux_pipeline_hiflow.py`, `flowmatch_step`). With x_ref the stage's upscaled clean latent (the
stage engine's `Stage.x0`, the clean start the stage was noised from), at step i of the stage's N
steps, for the sample x_t at noise level sigma and the predicted velocity v:

- reference velocity: v_ref = (x_t - x_ref) / sigma, the flow that carries x_t to x_ref;
- direction alignment: v <- v + alpha_i (low(v_ref) - low(v)), i.e. the low band of the predicted
  x0 = x_t - sigma v becomes alpha_i of the reference's. `low` is a Butterworth low-pass of the
  centred 2D FFT, 1 / (1 + (d^2 / cutoff^2)^order) with d^2 = (2h/H - 1)^2 + (2w/W - 1)^2 (HiFlow's
  mask; cutoff 0.2, order 4), or the level-1 Haar approximation (HiFlow's "dwt");
- acceleration alignment, from the stage's second step: v <- v + beta_i (v_prev + v_ref - v_ref_prev - v),
  so the velocity changes from step to step as the reference's does; v_prev is the previous
  step's final (guided) velocity and v_ref_prev its reference velocity;
- alpha_i = alpha (N - i) / N and beta_i = beta (N - i) / N. HiFlow's weights for its 2K and 4K
  stages: alphas (1.0, 0.25), betas (0.5, 0.5); here the first upscaled stage takes 1.0, every
  later one 0.25, and beta 0.5 everywhere, unless FlowAlignmentConfig says otherwise.

HiFlow's own code takes x_ref per step from the low-resolution pass's prediction at the same
timestep; hires takes the stage's upscaled clean result, the latent structure guidance's stage
starts from (in pixel space the upscaled, sharpened image re-encoded), so no extra decode runs.

Both maps are affine with weights summing to 1, so applying them to each classifier-free-guidance
half (batched, or Flux's separate true-CFG calls) with the same v_ref, v_prev and v_ref_prev gives
exactly the guided velocity the pipeline's combination u + w (c - u) would give them. Flux's
distilled guidance is a single prediction: the map acts on it directly.

The weights per stage reach the stage's call through the stage engine's per-stage settings
(`Stage.set`, `CallState.stage_setting`): this technique is a planner after structure guidance that
tags the stages that refine an upscaled result (`Stage.refines`); it reads nothing of structure
guidance's own.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ...denoiser.outputs import PredictionHook
from ...sampling import schedules, wavelets
from ...sampling.stages import tile_batch
from .config import FlowAlignmentConfig

TECHNIQUE_NAME = "flow_alignment"
HOOK_NAME = "hires.flow_alignment"
FIRST_STAGE_ALPHA, LATER_STAGE_ALPHA = 1.0, 0.25  # HiFlow's alphas (2K, 4K)
DEFAULT_BETA = 0.5  # HiFlow's betas
DWT_WAVELET = "haar"  # HiFlow's split_frequency_components_dwt(wavelet="haar", level=1)


# -- math ---------------------------------------------------------------------------------------
def butterworth_mask(height: int, width: int, cutoff: float, order: int, device=None) -> torch.Tensor:
    """(H, W) float32 low-pass mask over the centred (fftshifted) spectrum: 1 / (1 + (d^2 / c^2)^n)."""
    return _cpu_mask(height, width, float(cutoff), int(order)).to(device=device)


@functools.lru_cache(maxsize=8)
def _cpu_mask(height: int, width: int, cutoff: float, order: int) -> torch.Tensor:
    rows = (2 * torch.arange(height, dtype=torch.float64) / height - 1) ** 2
    cols = (2 * torch.arange(width, dtype=torch.float64) / width - 1) ** 2
    distance = rows[:, None] + cols[None, :]
    return (1 / (1 + (distance / cutoff**2) ** order)).float()


def fft_low_pass(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The low-frequency part of (..., H, W) x under a centred spectral mask (float32, real)."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float()), dim=(-2, -1))
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))).real


def dwt_low_pass(x: torch.Tensor) -> torch.Tensor:
    """x rebuilt from its level-1 Haar approximation alone (details zeroed), at x's size."""
    x = x.float()
    zeros = torch.zeros_like(wavelets.low_band(x, DWT_WAVELET, 1, "symmetric"))
    return x - wavelets.swap_low_band(x, zeros, DWT_WAVELET, 1, "symmetric")


def reference_velocity(sample: torch.Tensor, reference_x0: torch.Tensor, sigma: float) -> torch.Tensor:
    """The velocity that carries `sample` at noise level sigma to `reference_x0`: (x_t - x_ref) / sigma."""
    return (sample.float() - reference_x0.float()) / sigma


def align_direction(velocity: torch.Tensor, reference: torch.Tensor, alpha: float, low_pass) -> torch.Tensor:
    """v + alpha (low(v_ref) - low(v)): the low band moved toward the reference's by alpha."""
    return velocity + alpha * low_pass(reference - velocity)


def align_acceleration(velocity: torch.Tensor, previous: torch.Tensor, reference: torch.Tensor,
                       previous_reference: torch.Tensor, beta: float) -> torch.Tensor:
    """v + beta (v_prev + v_ref - v_ref_prev - v): the step's change of velocity toward the reference's."""
    return velocity + beta * (previous + reference - previous_reference - velocity)


def decayed(weight: float, step: int, steps: int) -> float:
    """HiFlow's linear decay over a stage: weight (N - i) / N at step i of N."""
    return weight * (steps - step) / steps


def stage_weights(config: FlowAlignmentConfig, stages: int) -> list[tuple[float, float]]:
    """(alpha, beta) for each of `stages` upscaled stages (a tuple field gives one value per stage)."""
    def values(name):
        value = getattr(config, name)
        if isinstance(value, tuple):
            if len(value) != stages:
                raise ValueError(f"FlowAlignmentConfig.{name}={value!r} has "
                                 f"{len(value)} values but structure guidance "
                                 f"plans {stages} stage(s) after the base; give one value or {stages}")
            return list(value)
        return [value] * stages

    defaults = [FIRST_STAGE_ALPHA] + [LATER_STAGE_ALPHA] * max(stages - 1, 0)
    return [(float(defaults[i] if a is None else a), float(DEFAULT_BETA if b is None else b))
            for i, (a, b) in enumerate(zip(values("alphas"), values("betas")))]


# -- the planner and the hook ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageWeights:
    """What this technique pushes onto an upscaled stage's call (`CallState.stage_setting`)."""

    alpha: float
    beta: float


@dataclasses.dataclass
class _AlignmentCall:
    """One stage call's history: the step being guided and the previous step's velocities."""

    step: int = -1
    reference: torch.Tensor | None = None  # v_ref of the current step
    outputs: list = dataclasses.field(default_factory=list)  # guided velocities of the step's calls
    previous: tuple | None = None  # (v_prev, v_ref_prev)
    steps_aligned: list = dataclasses.field(default_factory=list)  # (step, alpha_i, beta_i or None)


class FlowAlignment:
    def __init__(self, info, config: FlowAlignmentConfig, attachment=None):
        self.attachment = attachment
        self.config = config
        self.info = info

    def plan(self, request, stages: list) -> list:
        """Tag the stages that refine an upscaled result (structure guidance's later ones) with their weights."""
        upscaled = [s for s in stages if s.refines]
        for stage, (alpha, beta) in zip(upscaled, stage_weights(self.config, len(upscaled))):
            stage.set(StageWeights(alpha, beta))
        return stages

    def low_pass(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.band == "dwt":
            return dwt_low_pass(x)
        mask = butterworth_mask(x.shape[-2], x.shape[-1], self.config.cutoff, self.config.order, x.device)
        return fft_low_pass(x, mask)

    def guide(self, output: torch.Tensor, sample: torch.Tensor,
              timestep, state, weights: StageWeights) -> torch.Tensor:
        info, latents = self.info, self.attachment.latents
        lh, lw = state.latent_height, state.latent_width
        x = latents.to_spatial(sample, lh, lw)
        velocity = latents.to_spatial(output, lh, lw).float()
        t = torch.as_tensor(timestep).flatten()[0].double() / info.family.timestep_input_scale
        sigma = float(schedules.flow_sigma(self.attachment.pipe.scheduler, t))
        call = state.slot(_AlignmentCall)
        step, steps = state.step_index, state.num_steps
        if step != call.step:  # the first call of a step: the last step's velocities become the previous
            if call.step >= 0 and call.outputs:
                call.previous = (self._combined(call.outputs, state), call.reference)
            reference_x0 = tile_batch(state.stage.x0, x.shape[0]).to(x.device)
            call.step, call.reference, call.outputs = step, reference_velocity(x, reference_x0, sigma), []
        reference = call.reference
        alpha, beta = decayed(weights.alpha, step, steps), decayed(weights.beta, step, steps)
        guided = align_direction(velocity, reference, alpha, self.low_pass)
        if call.previous is not None and beta:
            v_prev, ref_prev = call.previous
            guided = align_acceleration(guided, v_prev, reference, ref_prev, beta)
        if not call.outputs:
            call.steps_aligned.append((step, alpha, beta if call.previous is not None else None))
        call.outputs.append(guided)
        state.log["log.flow_alignment.steps"] = list(call.steps_aligned)
        guided = guided.to(output.dtype)
        return latents.from_spatial(guided)

    def _combined(self, outputs: list, state) -> torch.Tensor:
        """The step's velocity as the pipeline combined it from its calls' guided outputs."""
        scale = state.guidance_scale
        if scale is None:
            return outputs[0]
        if self.info.family.cfg_separate:  # true CFG: the cond call, then the uncond
            if len(outputs) != 2:
                return outputs[0]
            cond, uncond = outputs
            return uncond + scale * (cond - uncond)
        uncond, cond = outputs[0].chunk(2)
        return (uncond + scale * (cond - uncond)).repeat(2, *([1] * (cond.ndim - 1)))


class _FlowAlignmentHook(PredictionHook):
    """Aligns the velocity of every denoiser call in an upscaled stage (outside structure guidance's hook)."""

    def __init__(self, alignment: FlowAlignment):
        super().__init__(alignment.attachment)
        self.alignment = alignment

    def wanted(self, state):
        weights = state.stage_setting(StageWeights)
        return None if weights is None or state.stage is None or state.stage.x0 is None else weights

    def change(self, prediction, sample, timestep, state, weights):
        return self.alignment.guide(prediction, sample, timestep, state, weights)


def install(attachment, config: FlowAlignmentConfig) -> None:
    """hires.apply's installer: a planner after structure guidance's and a denoiser hook outside its
    (the record requires structure guidance, which HiresConfig.validate_for checks)."""
    alignment = attachment.stages.planner(TECHNIQUE_NAME)
    attachment.add_hook(attachment.denoiser, _FlowAlignmentHook(alignment), HOOK_NAME)
