"""Skip residual (DemoFusion): its weights against the paper's cosine and an independent SNR match for
flow models, its blend step by step inside tiny pipelines (against a hand-written forward process),
its effect on all six families, errors, and bit-identity when off or removed."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

import hires
from hires.sampling import schedules, stages
from hires.sampling import latents
from hires.techniques.structure_guidance import guidance as progressive
from hires.techniques.skip_residual import blend as skip_residual
from tiny_models import build, generate

SG = hires.StructureGuidanceConfig
SR = hires.SkipResidualConfig


def _config(exponent=3.0, enabled=True, **structure):
    structure = {"renoise": 1.0, "space": "latent", **structure}
    return hires.HiresConfig(structure_guidance=SG(enabled=True, **structure),
                             skip_residual=SR(enabled=enabled, exponent=exponent))


def _cosf(t: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * (1000 - t) / 1000))


def _sd_alpha_bars() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _timestep_of_alpha_bar(alpha_bar: float) -> float:
    """Bisection on SD's schedule, log sigma linear between integer timesteps (an independent inverse)."""
    log_sigmas = 0.5 * torch.log((1 - _sd_alpha_bars()) / _sd_alpha_bars())

    def alpha_bar_at(t):
        low = min(int(math.floor(t)), 998)
        w = t - low
        log_sigma = (1 - w) * float(log_sigmas[low]) + w * float(log_sigmas[low + 1])
        return 1 / (1 + math.exp(2 * log_sigma))

    lo, hi = 0.0, 999.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if alpha_bar_at(mid) > alpha_bar else (lo, mid)
    return (lo + hi) / 2


# -- math -------------------------------------------------------------------------------------------
def test_weights_on_sdxl_schedule_are_demofusions_cosine():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for t in (981, 781, 581, 481, 281, 21):
        assert schedules.cosine_factor(scheduler, "epsilon", t) == pytest.approx(_cosf(t), abs=1e-6)
    # the reference file's values of c1 = cosf ** 3
    for t, c1 in ((781, 0.70), (581, 0.25), (481, 0.10)):
        assert skip_residual.skip_weight(schedules.cosine_factor(scheduler, "epsilon", t),
                                         3) == pytest.approx(c1, abs=0.012)
    # FreeScale's exponent 2 at its restart t = 681 and at 281
    assert skip_residual.skip_weight(_cosf(681), 2) == pytest.approx(0.59, abs=0.01)
    assert skip_residual.skip_weight(_cosf(281), 2) == pytest.approx(0.03, abs=0.005)


@pytest.mark.parametrize("sigma", [0.98, 0.9, 0.75, 0.5, 0.3, 0.1, 0.02])
def test_flow_weight_is_read_at_the_sd_timestep_of_equal_snr(sigma):
    scheduler = FlowMatchEulerDiscreteScheduler()
    # x = (1 - s) x0 + s eps divided by its norm factor is sqrt(a) x0 + sqrt(1 - a) eps
    norm = math.hypot(1 - sigma, sigma)
    alpha_bar = ((1 - sigma) / norm) ** 2
    assert 1 - alpha_bar == pytest.approx((sigma / norm) ** 2)
    expected = _cosf(_timestep_of_alpha_bar(alpha_bar))
    assert schedules.cosine_factor(scheduler, "flow", sigma * 1000) == pytest.approx(expected, abs=1e-6)


def test_blend_is_the_convex_combination():
    z, n = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for c in (0.0, 0.3, 1.0):
        assert torch.allclose(skip_residual.blend(z, n, c), z - c * z + c * n, atol=1e-6)


# -- inside a pipeline ---------------------------------------------------------------------------------
class _Recorder:
    """The high-resolution stage's start x0, the noise drawn for it, and every scheduler step's in/out."""

    def __init__(self, monkeypatch, pipe):
        self.x0, self.noises, self.steps = [], [], []
        start = progressive.StructureGuidance._start

        def recording_start(planner, stage, previous):
            x0 = start(planner, stage, previous)
            self.x0.append(x0.clone())
            return x0

        monkeypatch.setattr(progressive.StructureGuidance, "_start", recording_start)
        draw = stages.randn_tensor

        def recording_draw(*args, **kwargs):
            noise = draw(*args, **kwargs)
            self.noises.append(noise.clone())
            return noise

        monkeypatch.setattr(stages, "randn_tensor", recording_draw)
        step = type(pipe.scheduler).step

        def recording_step(scheduler, model_output, timestep, sample, *args, **kwargs):
            out = step(scheduler, model_output, timestep, sample, *args, **kwargs)
            latents = out[0] if isinstance(out, tuple) else out.prev_sample
            self.steps.append((float(timestep), sample.clone(), latents.clone()))  # before any blend
            return out

        monkeypatch.setattr(type(pipe.scheduler), "step", recording_step)


@pytest.mark.parametrize("family_name", ["sd15", "flux"])
def test_each_step_starts_from_the_blend_toward_the_noised_start(family_name, monkeypatch):
    pipe = build(family_name)
    hires.apply(pipe, _config())
    recorder = _Recorder(monkeypatch, pipe)
    generate(pipe, family_name, 128, steps=4, seed=3)
    (x0,), (noise,) = recorder.x0, recorder.noises  # one start and one noise draw for the one upscaled stage
    high = recorder.steps[4:]  # after the base stage's 4 steps
    assert len(high) == 4
    flux = family_name == "flux"
    lh = lw = 16

    def spatial(sample):
        return latents.unpack(sample, lh, lw, 2) if flux else sample

    def noised(t):
        if flux:
            s = t / 1000
            return (1 - s) * x0 + s * noise
        a = pipe.scheduler.alphas_cumprod[int(t)].double()
        return (a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()).float()

    def weight(t):
        if flux:
            s = t / 1000
            return _cosf(_timestep_of_alpha_bar((1 - s) ** 2 / ((1 - s) ** 2 + s**2))) ** 3
        return _cosf(t) ** 3

    t0, first, _ = high[0]
    assert torch.allclose(spatial(first), noised(t0).to(first.dtype), atol=1e-5)  # the stage's own start
    records = skip_residual.last_run(pipe)
    assert len(records) == 1 and (records[0].height, records[0].width) == (128, 128)
    assert len(records[0].weights) == 3
    for i in range(3):
        t_next, sample_next, _ = high[i + 1]
        c1 = weight(t_next)
        assert records[0].weights[i] == pytest.approx(c1, abs=1e-6)
        stepped = spatial(high[i][2]).float()  # the scheduler's own result of step i
        expected = (1 - c1) * stepped + c1 * noised(t_next)
        assert torch.allclose(spatial(sample_next).float(), expected, atol=1e-4), \
            float((spatial(sample_next) - expected).abs().max())
    assert any(w > 0.05 for w in records[0].weights)  # the blend moved the latents


def test_every_family_changes_its_upscaled_stage_and_records_weights(family):
    pipe = build(family)
    hires.apply(pipe, _config(enabled=False))
    without = generate(pipe, family, 128, steps=4, seed=1)
    hires.apply(pipe, _config())
    with_skip = generate(pipe, family, 128, steps=4, seed=1)
    again = generate(pipe, family, 128, steps=4, seed=1)
    records = skip_residual.last_run(pipe)
    assert records and records[0].weights and records[0].weights[0] > 0.01
    assert not torch.equal(with_skip, without)
    assert torch.equal(with_skip, again)  # same seed, same image


def test_only_upscaling_stages_blend_with_bottleneck():
    pipe = build("sd15")
    hires.apply(pipe, hires.HiresConfig(bottleneck=hires.BottleneckConfig(enabled=True),
                                        skip_residual=SR(enabled=True)))
    generate(pipe, "sd15", 128, steps=10, seed=0)
    records = skip_residual.last_run(pipe)
    # high -> low -> high: only the last slice starts from an upscaled result
    assert [(r.height, r.width) for r in records] == [(128, 128)]


# -- errors and bit-identity -----------------------------------------------------------------------------
def test_errors_name_the_option():
    with pytest.raises(ValueError, match="exponent=0"):
        SR(enabled=True, exponent=0)
    with pytest.raises(TypeError, match="exponent"):
        SR(enabled=True, exponent="3")
    pipe = build("sd15")
    with pytest.raises(ValueError, match="structure_guidance"):
        hires.apply(pipe, hires.HiresConfig(skip_residual=SR(enabled=True)))
    assert not hires.is_applied(pipe)
    assert hires.HiresConfig.from_dict({"skip_residual": {"enabled": True,
                                                          "exponent": 2.0}}).skip_residual.exponent == 2.0


def test_off_and_removed_are_bit_identical():
    pipe = build("sd15")
    plain = generate(pipe, "sd15", 128, steps=4, seed=2)
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=True, renoise=1.0, space="latent")))
    structure_only = generate(pipe, "sd15", 128, steps=4, seed=2)
    hires.apply(pipe, _config(enabled=False))
    assert torch.equal(generate(pipe, "sd15", 128, steps=4, seed=2), structure_only)
    hires.apply(pipe, _config())
    generate(pipe, "sd15", 128, steps=4, seed=2)
    hires.remove(pipe)
    assert torch.equal(generate(pipe, "sd15", 128, steps=4, seed=2), plain)
    assert "step" not in pipe.scheduler.__dict__
