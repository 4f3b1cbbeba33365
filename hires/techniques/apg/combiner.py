"""Adaptive projected guidance (APG; Sadat, Hilliges, Weber, ICLR 2025, arXiv 2410.02416).

With D_c, D_u the conditional / unconditional predictions and w the CFG scale:

    delta      = D_c - D_u
    delta_bar  = delta + beta * delta_bar_prev            (momentum; buffer starts at 0 each call)
    delta_clip = delta_bar * min(1, r / ||delta_bar||)    (L2 norm per sample, over all non-batch dims)
    par        = <delta_clip, D_c> / ||D_c||^2 * D_c ;  orth = delta_clip - par
    G          = D_c + (w - 1) * (orth + eta * par)

eta=1, r=inf, beta=0 is plain CFG, D_u + w (D_c - D_u). The paper works on the x0 prediction
(space="x0"): the denoiser's output is converted to x0 at the current step, guided, and converted
back (space="output" guides the raw output: eps, v or flow velocity, as diffusers' guider does).

Mapping to diffusers' `AdaptiveProjectedGuidance` / `normalized_guidance`: diffusers' default
returns D_u + s (orth + eta par); with `use_original_formulation=True` it returns D_c + s (...), so
this G equals diffusers with use_original_formulation=True, guidance_scale = w - 1,
adaptive_projected_guidance_momentum = beta, adaptive_projected_guidance_rescale = r (diffusers'
0 means "no clipping", ours is math.inf) and eta = eta. The default formulation coincides with this
one only when nothing changes delta (eta=1, no clipping, no momentum).

Which pair: APG acts on the pair the pipeline's own denoiser call produced. With noise-damped
guidance on as well (hires.denoiser.guidance offsets), that is the strong-dilation pair and the
offset (weak-dilation uncond - uncond) is added to APG's result.

Progressive stages: `StructureGuidanceConfig.apg` gives each stage after the base its own APGConfig
(or APGConfig(enabled=False) for plain CFG there); HiresConfig.apg rules the base generation and
every stage left at None. Each stage is a call of its own, so momentum restarts per stage.

Conversion to x0 (x is the latent the denoiser received):
- eps and v: pipelines give the denoiser the variance-preserving latent x = alpha x0 + sigma eps,
  with alpha^2 = alphas_cumprod and sigma^2 = 1 - alpha^2. DDIM / DPM-Solver pass the latent as
  it is; Euler-type schedulers keep x0 + s eps internally and their `scale_model_input` divides by
  sqrt(s^2 + 1), which is the same latent with alpha^2 = 1 / (s^2 + 1). alpha^2 is therefore read
  from the scheduler's `sigmas[step]` (s, where the scheduler has them, exact also for Karras
  schedules) or else from `alphas_cumprod[t]`. eps: x0 = (x - sigma eps) / alpha;
  v: x0 = alpha x - sigma v.
- flow: x = (1 - s) x0 + s noise, velocity v = noise - x0, so x0 = x - s v with s = sigmas[step]
  of the flow scheduler (or timestep / num_train_timesteps).
Schedulers with EDM preconditioning (`sigma_data` in their config) are not variance-preserving:
space="x0" raises there; space="output" works with any scheduler.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ...denoiser.guidance import GuidanceCall, ensure_guidance_hook
from .config import APGConfig

TECHNIQUE_NAME = "apg"


# -- the math ----------------------------------------------------------------------------------
def _math_dtype(device: torch.device) -> torch.dtype:
    # The paper projects in float64; devices without it fall back to float32.
    return torch.float32 if device.type in ("mps", "npu") else torch.float64


def adaptive_projected_guidance(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    scale: float,
    *,
    eta: float,
    norm_threshold: float = math.inf,
    momentum: float = 0.0,
    running_delta: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """APG's guided prediction (in cond's dtype) and the new momentum buffer (None without momentum).

    `running_delta` is the previous step's buffer (None at the first step of a call).
    """
    dtype = _math_dtype(cond.device)
    c, u = cond.to(dtype), uncond.to(dtype)
    dims = tuple(range(1, c.ndim))
    delta = c - u
    new_running = None
    if momentum != 0.0:
        if running_delta is not None:
            delta = delta + momentum * running_delta.to(dtype)
        new_running = delta
    if math.isfinite(norm_threshold):
        norm = torch.linalg.vector_norm(delta, dim=dims, keepdim=True)
        delta = delta * torch.clamp(norm_threshold / norm, max=1.0).nan_to_num(1.0)
    direction = c / torch.linalg.vector_norm(c, dim=dims, keepdim=True).clamp_min(1e-30)
    parallel = (delta * direction).sum(dim=dims, keepdim=True) * direction
    update = (delta - parallel) + eta * parallel
    guided = c + (scale - 1.0) * update
    return guided.to(cond.dtype), new_running


# -- x0 conversion -----------------------------------------------------------------------------
def _scheduler_sigma(scheduler, step_index: int, timestep: float) -> float | None:
    """The scheduler's own sigma for this step, when its `sigmas` line up with its timesteps."""
    sigmas, timesteps = getattr(scheduler, "sigmas", None), getattr(scheduler, "timesteps", None)
    if not isinstance(sigmas, torch.Tensor) or not isinstance(timesteps, torch.Tensor):
        return None
    if not (0 <= step_index < len(timesteps) <= len(sigmas)):
        return None
    if abs(float(timesteps[step_index]) - timestep) > 1e-3 * max(1.0, abs(timestep)):
        return None
    return float(sigmas[step_index])


def _alphas_cumprod_at(scheduler, timestep: float) -> float:
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is None:
        raise ValueError(
            f"APGConfig.space='x0' cannot convert predictions of scheduler {type(scheduler).__name__}: it has neither "
            "sigmas aligned with its timesteps nor alphas_cumprod; use APGConfig(space='output')"
        )
    table = table.double().cpu()
    # Fractional timesteps (Karras-style schedules) interpolate log-sigma, as schedulers' sigma_to_t does.
    log_sigma = 0.5 * torch.log((1 - table) / table)
    t = min(max(timestep, 0.0), len(table) - 1.0)
    low = int(math.floor(t))
    high = min(low + 1, len(table) - 1)
    value = log_sigma[low] + (t - low) * (log_sigma[high] - log_sigma[low])
    return float(1.0 / (1.0 + torch.exp(2 * value)))


def x0_coefficients(prediction_type: str, scheduler, step_index: int, timestep: float) -> tuple[float, float]:
    """(a, b) such that x0 = a * x + b * output for the latent x the denoiser received at this step."""
    if "sigma_data" in getattr(scheduler, "config", {}):
        raise ValueError(
            f"APGConfig.space='x0' assumes a variance-preserving or flow latent; scheduler {type(scheduler).__name__} "
            "uses EDM preconditioning (sigma_data). Use APGConfig(space='output') with it"
        )
    sigma = _scheduler_sigma(scheduler, step_index, timestep)
    if prediction_type == "flow":
        if sigma is None:
            sigma = timestep / float(scheduler.config.num_train_timesteps)
        return 1.0, -sigma
    alpha_bar = 1.0 / (1.0 + sigma * sigma) if sigma is not None else _alphas_cumprod_at(scheduler, timestep)
    alpha, noise = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return 1.0 / alpha, -noise / alpha
    if prediction_type == "v_prediction":
        return alpha, -noise
    raise ValueError(
        f"APGConfig.space='x0' does not know prediction_type={prediction_type!r}; it converts 'epsilon', "
        "'v_prediction' and 'flow'. Use APGConfig(space='output')"
    )


@dataclasses.dataclass(frozen=True)
class APGSettings:
    """An APGConfig with the family preset filled in."""

    eta: float
    momentum: float
    norm_threshold: float | None  # absolute L2 norm, or None: rms_threshold * sqrt(elements)
    rms_threshold: float | None
    space: str
    start: float
    stop: float

    @property
    def is_plain_cfg(self) -> bool:
        return self.eta == 1.0 and self.momentum == 0.0 and self.norm_threshold == math.inf

    def threshold_for(self, tensor: torch.Tensor) -> float:
        if self.norm_threshold is not None:
            return self.norm_threshold
        return self.rms_threshold * math.sqrt(tensor[0].numel())


def resolve(config, info) -> APGSettings:
    """`config` with its family's defaults filled in (hires.families.Family.apg)."""
    preset = info.family.apg
    if preset is None:
        raise ValueError(f"APGConfig has no defaults for family {info.name!r}, which runs no classifier-free guidance")
    rms = preset.rms_threshold_x0 if config.space == "x0" else preset.rms_threshold_output
    return APGSettings(
        eta=preset.eta if config.eta is None else float(config.eta),
        momentum=preset.momentum if config.momentum is None else float(config.momentum),
        norm_threshold=None if config.norm_threshold is None else float(config.norm_threshold),
        rms_threshold=rms if config.norm_threshold is None else None,
        space=config.space,
        start=config.start,
        stop=config.stop,
    )


@dataclasses.dataclass
class _APGCall:
    running_delta: torch.Tensor | None = None  # the momentum buffer, new for every call


# -- the combiner ------------------------------------------------------------------------------
class APGCombiner:
    """Combines the CFG pair by APG at active steps; None (plain CFG) elsewhere."""

    def __init__(self, attachment, settings: APGSettings | None):
        self.attachment = attachment
        self.settings = settings  # the call's own; None: off except in stages that turn it on
        self._stage_settings: dict = {}

    def settings_for(self, state) -> APGSettings | None:
        """The stage's own APG (pushed by the stage engine, e.g. StructureGuidanceConfig.apg) or the call's."""
        config = state.stage_setting(APGConfig)
        if config is None:
            return self.settings
        if not config.enabled:
            return None
        if config not in self._stage_settings:
            self._stage_settings[config] = resolve(config, self.attachment.info)
        return self._stage_settings[config]

    def active(self, state) -> bool:
        return self.settings_for(state) is not None

    def __call__(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float, state) -> torch.Tensor | None:
        s = self.settings_for(state)
        if s is None or not (s.start <= state.step_fraction() < s.stop) or s.is_plain_cfg:
            return None
        step = state.slot(GuidanceCall).step
        if s.space == "x0":
            a, b = x0_coefficients(self.attachment.info.prediction_type, self.attachment.pipe.scheduler,
                                   state.step_index, step.timestep)
            sample = step.sample.float()
            cond_pred, uncond_pred = a * sample + b * cond.float(), a * sample + b * uncond.float()
        else:
            cond_pred, uncond_pred = cond.float(), uncond.float()
        guided, running = adaptive_projected_guidance(
            cond_pred, uncond_pred, scale, eta=s.eta, norm_threshold=s.threshold_for(cond_pred),
            momentum=s.momentum, running_delta=state.slot(_APGCall).running_delta,
        )
        if running is not None:
            state.slot(_APGCall).running_delta = running
        state.log.setdefault("log.apg.steps", []).append(state.step_index)
        return (guided - a * sample) / b if s.space == "x0" else guided


def install(attachment, config) -> None:
    """hires.apply's installer. A disabled `config` is installed where only another technique's per-stage
    settings ask for APG (StructureGuidanceConfig.apg): plain CFG outside those stages."""
    settings = resolve(config, attachment.info) if config.enabled else None
    combiner = APGCombiner(attachment, settings)
    owner = "APGConfig" if config.enabled else " / ".join(attachment.config.stage_settings_fields(TECHNIQUE_NAME))
    ensure_guidance_hook(attachment).set_combiner(combiner, owner=owner, active=combiner.active)
