"""Schedules for progressive sampling: which steps a stage re-runs, re-noising, and x0 <-> model output.

Two noise conventions cover every supported family:
- variance preserving (eps / v / sample prediction; DDIM, Euler, DPM-Solver, ...): the denoiser sees
  x = sqrt(a) x0 + sqrt(1 - a) eps, with a = alphas_cumprod at the (possibly fractional) timestep.
  Euler-type schedulers keep x0 + sigma eps internally and scale it by 1 / sqrt(sigma^2 + 1) before
  the denoiser, which is the same x; so the denoiser-side formulas hold for all of them.
- flow matching (SD3, Flux): x = (1 - sigma) x0 + sigma eps and the model predicts v = eps - x0.
The `level` passed around is `a` (alpha-bar) for the first and `sigma` for the second.

A stage re-runs the last `k = round(renoise * N)` steps of the call's own N-step schedule: the
pipeline builds its schedule as usual and `truncate_schedule` keeps the tail (as diffusers'
img2img pipelines do with `strength`, but on the scheduler itself, so that any pipeline's loop sees
only those steps). Re-noising to the tail's first timestep uses the scheduler's own `add_noise`
(`scale_noise` for flow matching), so each scheduler's convention (VP sample, Euler's x0 + sigma eps)
is its own.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")


def stage_steps(num_steps: int, renoise: float) -> int:
    """How many of a schedule's `num_steps` steps a stage re-runs (at least 1)."""
    return max(1, min(num_steps, int(math.floor(renoise * num_steps + 0.5))))


def schedule_call_of(args: tuple, kwargs: dict, num_steps: int) -> tuple[tuple, dict]:
    """The arguments of the pipeline's `set_timesteps(*args, **kwargs)` call for a schedule of `num_steps`
    steps: the step count replaced, or a given `sigmas` list (flow pipelines pass their unshifted
    sigmas) resampled linearly over its index, so the schedule keeps its first and last sigma and its shape."""
    if kwargs.get("timesteps") is not None:
        raise ValueError("StructureGuidanceConfig.step_fraction cannot respace a pipeline's custom `timesteps` list; "
                         "pass num_inference_steps instead, or leave step_fraction None")
    sigmas = kwargs.get("sigmas")
    if sigmas is not None:
        given = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu().numpy()
        resampled = np.interp(np.linspace(0, len(given) - 1, num_steps), np.arange(len(given)), given)
        kwargs = {**kwargs, "sigmas": resampled.tolist()}
        if kwargs.get("num_inference_steps") is not None:
            kwargs["num_inference_steps"] = num_steps
        return args, kwargs
    if "num_inference_steps" in kwargs or not args:
        return args, {**kwargs, "num_inference_steps": num_steps}
    return (num_steps, *args[1:]), kwargs


def respace_schedule(scheduler, set_timesteps, args: tuple, kwargs: dict, steps: int, start: float,
                     longest: int) -> int:
    """Rebuild the scheduler with the pipeline's own schedule (`set_timesteps(*args, **kwargs)` respaced by
    `schedule_call_of`) of the length, from `steps` to `longest`, whose last `steps` steps start nearest to
    timestep `start`: the same renoised depth in fewer, evenly spaced steps. Returns that length."""
    def start_of(length: int) -> float:
        call_args, call_kwargs = schedule_call_of(args, kwargs, length)
        set_timesteps(*call_args, **call_kwargs)
        return float(scheduler.timesteps[len(scheduler.timesteps) - steps])

    best = min(range(steps, longest + 1), key=lambda length: (abs(start_of(length) - start), length))
    start_of(best)
    return len(scheduler.timesteps)


def truncate_schedule(scheduler, start: int) -> None:
    """Keep the scheduler's steps from index `start` on, as if those were its whole schedule.

    Slices `timesteps` and, where the scheduler has one per step (plus the final 0), `sigmas`, and
    clears the step/begin index so the next step looks its index up in the new schedule.
    `num_inference_steps` is kept: DDIM-type schedulers derive each step's stride from it.
    """
    order = getattr(scheduler, "order", 1)
    if order != 1:
        raise ValueError(
            f"structure guidance re-runs the tail of the schedule and needs a first-order scheduler; "
            f"{type(scheduler).__name__} has order {order}. Use e.g. EulerDiscreteScheduler, DDIMScheduler, "
            "DPMSolverMultistepScheduler or FlowMatchEulerDiscreteScheduler"
        )
    count = len(scheduler.timesteps)
    if not 0 <= start < count:
        raise ValueError(f"start={start} must index the {count}-step schedule")
    scheduler.timesteps = scheduler.timesteps[start:]
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and sigmas.ndim == 1 and len(sigmas) in (count, count + 1):
        scheduler.sigmas = sigmas[start:]
    for name in ("_step_index", "_begin_index"):
        if hasattr(scheduler, name):
            setattr(scheduler, name, None)
    if hasattr(scheduler, "model_outputs"):  # multistep solvers start their history afresh
        scheduler.model_outputs = [None] * len(scheduler.model_outputs)
        scheduler.lower_order_nums = 0


def renoise(scheduler, x0: torch.Tensor, noise: torch.Tensor, timestep) -> torch.Tensor:
    """x0 noised to `timestep` in the scheduler's own sample convention (call after its set_timesteps)."""
    t = torch.as_tensor(timestep, device=x0.device).reshape(1)
    if hasattr(scheduler, "scale_noise"):  # flow matching: (1 - sigma) x0 + sigma noise
        return scheduler.scale_noise(x0, t, noise)
    return scheduler.add_noise(x0, noise, t)


def vp_alpha_bar(scheduler, timestep) -> torch.Tensor:
    """alpha-bar at a scheduler timestep; fractional timesteps (Karras / Euler interpolation) are
    interpolated in log sigma, the inverse of diffusers' own sigma -> timestep map."""
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    t = float(torch.as_tensor(timestep).flatten()[0])
    t = min(max(t, 0.0), len(alphas) - 1.0)
    low = int(math.floor(t))
    high = min(low + 1, len(alphas) - 1)
    log_sigma = torch.log(((1 - alphas) / alphas) ** 0.5)
    w = t - low
    sigma = torch.exp((1 - w) * log_sigma[low] + w * log_sigma[high])
    return (1.0 / (1.0 + sigma**2)).to(torch.float32)


def flow_sigma(scheduler, timestep) -> torch.Tensor:
    """sigma of a flow-matching scheduler timestep (timesteps are sigma * num_train_timesteps)."""
    t = float(torch.as_tensor(timestep).flatten()[0])
    return torch.tensor(t / scheduler.config.num_train_timesteps, dtype=torch.float32)


def noise_level(scheduler, prediction: str, timestep) -> torch.Tensor:
    """The `level` of the module docstring for this prediction type at a scheduler timestep."""
    return flow_sigma(scheduler, timestep) if prediction == "flow" else vp_alpha_bar(scheduler, timestep)


def predicted_x0(output: torch.Tensor, sample: torch.Tensor, prediction: str, level) -> torch.Tensor:
    """The clean sample a model output implies, for the denoiser's input `sample` (float32 math)."""
    out, x = output.float(), sample.float()
    level = torch.as_tensor(level, dtype=torch.float32, device=out.device)
    if prediction == "flow":
        return x - level * out
    if prediction == "sample":
        return out
    a, s = level.sqrt(), (1 - level).sqrt()
    if prediction == "epsilon":
        return (x - s * out) / a
    if prediction == "v_prediction":
        return a * x - s * out
    raise ValueError(f"prediction={prediction!r} is not supported; use one of {', '.join(PREDICTIONS)}")


def output_from_x0(x0: torch.Tensor, sample: torch.Tensor, prediction: str, level) -> torch.Tensor:
    """The model output that implies `x0` for the same input `sample` (inverse of `predicted_x0`)."""
    z, x = x0.float(), sample.float()
    level = torch.as_tensor(level, dtype=torch.float32, device=z.device)
    if prediction == "flow":
        return (x - z) / level
    if prediction == "sample":
        return z
    a, s = level.sqrt(), (1 - level).sqrt()
    if prediction == "epsilon":
        return (x - a * z) / s
    if prediction == "v_prediction":
        return (a * x - z) / s
    raise ValueError(f"prediction={prediction!r} is not supported; use one of {', '.join(PREDICTIONS)}")


def dynamic_shift_mu(tokens: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """diffusers' resolution-dependent shift mu (same float operations): linear in the token count.

    The line runs through (base_seq_len, base_shift) and (max_seq_len, max_shift) and is not capped
    above, so at 4K Flux's schedule sits at sigma > 0.99 for all but the last step.
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return tokens * m + b


def time_shift(t, shift: float):
    """The SD3 / Flux static time shift of sigma (or t in [0, 1]): s t / (1 + (s - 1) t)."""
    return shift * t / (1 + (shift - 1) * t)


def mu_for_shift(shift: float, time_shift_type: str) -> float:
    """The mu whose time shift equals the static shift s*sigma / (1 + (s-1) sigma)."""
    return math.log(shift) if time_shift_type == "exponential" else float(shift)


def scheduler_shift_mu(scheduler_config, tokens: int) -> float:
    """mu the flow pipelines compute for `tokens` image tokens from the scheduler's config."""
    get = scheduler_config.get if hasattr(scheduler_config,
                                          "get") else lambda k, d=None: getattr(scheduler_config, k, d)
    return dynamic_shift_mu(tokens, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                            get("base_shift", 0.5), get("max_shift", 1.15))


def flux2_empirical_mu(tokens: int, steps: int) -> float:
    """Flux.2's mu (black-forest-labs/flux2 sampling.py, diffusers' compute_empirical_mu): linear in the
    token count through fits at 10 and 200 steps, interpolated linearly in the step count; past 4300
    tokens the 200-step line alone."""
    def at_200(n):
        return 0.00016927 * n + 0.45666666

    if tokens > 4300:
        return float(at_200(tokens))
    at_10 = 8.73809524e-05 * tokens + 1.89833333
    slope = (at_200(tokens) - at_10) / 190.0
    return float(at_200(tokens) + slope * (steps - 200))


def _flux2_rule(scheduler_config, tokens: int, steps: int | None) -> float:
    if steps is None:
        raise ValueError("Flux.2's shift depends on the step count; num_inference_steps is unknown here")
    return flux2_empirical_mu(tokens, int(steps))


def _static_rule(scheduler_config, tokens: int, steps: int | None) -> float:
    # A constant shift whatever the size (Flux 3): the mu that gives the scheduler's own shift.
    return mu_for_shift(float(scheduler_config.get("shift", 1.0)),
                        scheduler_config.get("time_shift_type", "exponential"))


# The families' mu rules (hires.families.Family.shift_rule).
SHIFT_RULES = {
    "static": _static_rule,
    "linear": lambda scheduler_config, tokens, steps: scheduler_shift_mu(scheduler_config, tokens),
    "flux2_empirical": _flux2_rule,
}


def pipeline_shift_mu(rule: str, scheduler_config, tokens: int, steps: int | None) -> float:
    """mu a family's pipeline computes for `tokens` image tokens (`hires.families.Family.shift_rule`)."""
    if rule not in SHIFT_RULES:
        raise ValueError(f"shift rule {rule!r}: expected one of {', '.join(map(repr, SHIFT_RULES))}")
    return SHIFT_RULES[rule](scheduler_config, tokens, steps)


def base_size_mu(info, scheduler_config, steps: int | None) -> float:
    """mu the family's pipeline computes for the base size's token count (`info`: a hires.ModelInfo)."""
    return pipeline_shift_mu(info.family.shift_rule, scheduler_config, info.base_tokens, steps)


def clamped_mu(mu: float, info, scheduler_config, steps: int | None) -> float:
    """The flow-shift clamp: a pipeline's dynamic mu capped at its base-size value (HiFlow, DyPE). diffusers'
    mu is linear in the token count without a cap, which at 3-4K puts every step but the last at sigma > 0.97."""
    return min(mu, base_size_mu(info, scheduler_config, steps))


def static_shift_mu(scheduler, shift: float) -> float:
    """The mu of a dynamically shifting scheduler that gives the static shift `shift`."""
    return mu_for_shift(shift, scheduler.config.get("time_shift_type", "exponential"))


@contextlib.contextmanager
def static_shift(scheduler, shift: float):
    """Inside the block, a statically shifting scheduler's shift is `shift`; yields the one it had."""
    before = scheduler.shift
    scheduler.set_shift(shift)
    try:
        yield before
    finally:
        scheduler.set_shift(before)


def set_timesteps_with_shift(scheduler, set_timesteps, args, kwargs, shift: float | None) -> None:
    """`set_timesteps(*args, **kwargs)` with the static time shift s t / (1 + (s - 1) t) (None: as given),
    through mu where the scheduler shifts dynamically, else through its own shift."""
    if shift is None:
        set_timesteps(*args, **kwargs)
    elif scheduler.config.get("use_dynamic_shifting", False):
        set_timesteps(*args, **{**kwargs, "mu": static_shift_mu(scheduler, shift)})
    else:
        with static_shift(scheduler, shift):
            set_timesteps(*args, **kwargs)


def clean_estimate(scheduler, prediction: str, model_output: torch.Tensor,
                   timestep, sample: torch.Tensor) -> torch.Tensor:
    """The predicted x0 of one scheduler step's inputs (float32), for any prediction type.

    Euler-type VP schedulers keep x0 + sigma eps; the denoiser saw it scaled by `scale_model_input`,
    which is the sample `predicted_x0` expects."""
    x = sample
    if prediction != "flow" and hasattr(scheduler, "scale_model_input"):
        x = scheduler.scale_model_input(sample.clone(), timestep)
    level = noise_level(scheduler, prediction, timestep).to(sample.device)
    return predicted_x0(model_output, x, prediction, level)


# -- DemoFusion's cosine schedules, for every noise convention ------------------------------------
# DemoFusion (and FreeScale) write their weights as functions of SDXL's DDPM timestep t in [0, 1000).
# What t stands for is a noise level, so every family reads them at the timestep of that training
# schedule (scaled-linear betas 0.00085 -> 0.012, as SD 1.x / 2.x / SDXL) with the same
# signal-to-noise ratio: for SD and SDXL that is their own t, for PixArt's linear betas a nearby one,
# and for flow matching x = (1 - sigma) x0 + sigma eps, which is the VP sample scaled by
# 1 / sqrt((1 - sigma)^2 + sigma^2), i.e. alpha-bar = (1 - sigma)^2 / ((1 - sigma)^2 + sigma^2).
# (Reading t as 1000 sigma instead would keep Flux's shifted schedules near cosf = 1 for most steps.)
REFERENCE_TRAIN_TIMESTEPS = 1000


def _reference_log_sigmas() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, REFERENCE_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, dim=0)
    return 0.5 * torch.log((1 - alphas) / alphas)


def alpha_bar_of_level(prediction: str, level) -> float:
    """The VP alpha-bar of a `noise_level` (alpha-bar itself, or a flow sigma)."""
    level = float(torch.as_tensor(level).flatten()[0])
    if prediction != "flow":
        return level
    signal, noise = (1 - level) ** 2, level**2
    return signal / (signal + noise)


def reference_timestep(alpha_bar: float) -> float:
    """The (fractional) timestep of the reference schedule whose alpha-bar is `alpha_bar`: the inverse of
    `vp_alpha_bar` on that schedule (linear in log sigma between integer timesteps), clamped to it."""
    table = _reference_log_sigmas()
    if alpha_bar <= 0:
        return float(len(table) - 1)
    if alpha_bar >= 1:
        return 0.0
    log_sigma = 0.5 * math.log((1 - alpha_bar) / alpha_bar)
    high = int(torch.searchsorted(table, torch.tensor([log_sigma], dtype=torch.float64))[0])
    if high <= 0:
        return 0.0
    if high >= len(table):
        return float(len(table) - 1)
    low_value, high_value = float(table[high - 1]), float(table[high])
    return high - 1 + (log_sigma - low_value) / (high_value - low_value)


def cosine_factor(scheduler, prediction: str, timestep) -> float:
    """DemoFusion's cosf = (1 + cos(pi (1000 - t) / 1000)) / 2 at a scheduler timestep: 1 at pure noise,
    0 at the clean end (t read on the reference schedule, see above)."""
    t = reference_timestep(alpha_bar_of_level(prediction, noise_level(scheduler, prediction, timestep)))
    n = REFERENCE_TRAIN_TIMESTEPS
    return 0.5 * (1 + math.cos(math.pi * (n - t) / n))
