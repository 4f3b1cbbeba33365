"""Structure guidance's `step_fraction`: a stage's renoised depth kept in fewer steps. Its schedule math against
independent formulations, its stages inside tiny pipelines of every family, its errors, and identity when off."""

import math

import numpy as np
import pytest
import torch

import hires
from hires.runtime import StageRequest, stage_plan
from hires.sampling import schedules
from hires.techniques.structure_guidance import guidance as progressive
from tiny_models import build, generate

SG = hires.StructureGuidanceConfig


def _apply(pipe, **options):
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=True, **options)))
    return pipe


# -- math -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("total,renoise,fraction,expected", [
    (20, 0.7, 0.3, 6), (50, 0.7, 0.25, 13), (28, 0.5, 0.3, 8),
    (20, 0.3, 0.5, 6),  # a fraction above renoise's share runs renoise's steps
    (8, 0.7, 0.25, 4),  # the few-step floor: half of an 8-step schedule
    (20, 0.7, None, 14),
])
def test_stage_step_count(total, renoise, fraction, expected):
    assert progressive.stage_step_count(total, renoise, fraction) == expected


def test_a_given_sigma_list_is_resampled_over_its_index_and_step_counts_are_replaced():
    sigmas = np.linspace(1.0, 1 / 28, 28)
    _, kwargs = schedules.schedule_call_of((), {"sigmas": sigmas, "mu": 0.7, "device": "cpu"}, 11)
    assert np.allclose(kwargs["sigmas"], np.linspace(1.0, 1 / 28, 11), atol=1e-12)  # linear in, linear out
    assert kwargs["mu"] == 0.7 and kwargs["device"] == "cpu"
    bent = [1.0, 0.9, 0.5, 0.1]
    _, kwargs = schedules.schedule_call_of((), {"sigmas": bent}, 7)  # points at index 0, 0.5, 1, ... 3
    assert np.allclose(kwargs["sigmas"], [1.0, 0.95, 0.9, 0.7, 0.5, 0.3, 0.1])
    assert schedules.schedule_call_of((50,), {"device": "cpu"}, 19) == ((19,), {"device": "cpu"})
    assert schedules.schedule_call_of((), {"num_inference_steps": 50}, 19) == ((), {"num_inference_steps": 19})
    with pytest.raises(ValueError, match="step_fraction cannot respace.*timesteps"):
        schedules.schedule_call_of((), {"timesteps": [999, 500, 1]}, 2)


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                         set_alpha_to_one=False)


def _ddim_leading(n: int) -> np.ndarray:
    """DDIM's leading spacing written out: every 1000 // n-th timestep from the top, offset 1."""
    return (np.arange(n) * (1000 // n))[::-1] + 1


def test_respacing_a_ddim_schedule_starts_nearest_to_the_renoised_depth():
    scheduler = _ddim()
    scheduler.set_timesteps(50)
    start = float(scheduler.timesteps[50 - 35])  # renoise 0.7 of 50 steps
    length = schedules.respace_schedule(scheduler, scheduler.set_timesteps, (50,), {}, 13, start, 50)
    candidates = {n: _ddim_leading(n)[n - 13] for n in range(13, 51)}
    best = min(candidates, key=lambda n: (abs(candidates[n] - start), n))
    assert length == best and scheduler.num_inference_steps == best
    assert np.array_equal(scheduler.timesteps.numpy(), _ddim_leading(best))
    assert abs(candidates[best] - start) <= 1000 // best  # within one of its steps of the 35-step tail's start
    schedules.truncate_schedule(scheduler, length - 13)
    assert np.array_equal(scheduler.timesteps.numpy(), _ddim_leading(best)[-13:])


def test_respacing_a_flow_schedule_keeps_its_shift_and_last_sigma():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sigmas, mu = np.linspace(1.0, 1 / 28, 28), 0.9
    kwargs = {"sigmas": sigmas, "mu": mu}
    scheduler.set_timesteps(**kwargs)
    start = float(scheduler.timesteps[28 - 14])  # renoise 0.5
    length = schedules.respace_schedule(scheduler, scheduler.set_timesteps, (), kwargs, 8, start, 28)

    def shifted(s):  # diffusers' exponential time shift, written out
        return math.exp(mu) / (math.exp(mu) + (1 / s - 1))

    expected = np.array([shifted(s) for s in np.linspace(1.0, 1 / 28, length)])
    assert np.allclose(scheduler.sigmas[:-1].numpy(), expected, atol=1e-6)
    assert abs(float(scheduler.sigmas[-2]) - shifted(1 / 28)) < 1e-6  # the same last sigma as the full schedule
    tails = {n: 1000 * shifted(np.linspace(1.0, 1 / 28, n)[n - 8]) for n in range(8, 29)}
    assert length == min(tails, key=lambda n: (abs(tails[n] - start), n))


# -- inside tiny pipelines --------------------------------------------------------------------------
def test_each_stage_runs_its_fraction_of_the_steps_from_renoises_depth(family):
    deep = _apply(build(family), renoise=0.75, step_fraction=0.25)
    image = generate(deep, family, 128, 12, 0, output_type="pt")
    base, stage = progressive.last_run(deep)
    assert base.steps == 12 and stage.steps == 3 and len(stage.timesteps) == 3
    own = _apply(build(family), renoise=0.75)
    full = generate(own, family, 128, 12, 0, output_type="pt")
    _, full_stage = progressive.last_run(own)
    shallow = _apply(build(family), renoise=0.25)
    generate(shallow, family, 128, 12, 0, output_type="latent")
    _, shallow_stage = progressive.last_run(shallow)
    assert shallow_stage.steps == 3
    assert stage.timesteps[0] > shallow_stage.timesteps[0]  # deeper than the renoise of the same steps
    nearer = abs(stage.timesteps[0] - full_stage.timesteps[0])
    assert nearer < abs(shallow_stage.timesteps[0] - full_stage.timesteps[0])
    assert not torch.equal(image, full)
    assert torch.isfinite(image).all()


def test_the_plan_counts_the_stages_steps():
    info = hires.model_info(build("sd15"))
    config = hires.HiresConfig(structure_guidance=SG(enabled=True, ladder="doubling", renoise=0.7,
                                                     step_fraction=(0.3, 0.15)))
    plan = stage_plan(info, config, StageRequest(256, 256, 20))
    assert [(s.height, s.planned_steps) for s in plan] == [(64, 20), (128, 6), (256, 3)]


def test_a_fraction_at_or_above_renoise_is_renoises_own_schedule_bit_for_bit():
    plain = generate(_apply(build("sd15"), renoise=0.5), "sd15", 128, 8, 0, output_type="latent")
    same = generate(_apply(build("sd15"), renoise=0.5, step_fraction=0.5), "sd15", 128, 8, 0, output_type="latent")
    above = generate(_apply(build("sd15"), renoise=0.5, step_fraction=0.9), "sd15", 128, 8, 0, output_type="latent")
    assert torch.equal(plain, same) and torch.equal(plain, above)


def test_removed_after_a_respaced_call_is_plain_diffusers():
    pipe = build("sd15")
    plain = generate(pipe, "sd15", 128, 6, 0, output_type="latent")
    _apply(pipe, renoise=0.7, step_fraction=0.2)
    generate(pipe, "sd15", 128, 6, 0, output_type="latent")
    hires.remove(pipe)
    assert torch.equal(generate(pipe, "sd15", 128, 6, 0, output_type="latent"), plain)


@pytest.mark.parametrize("bad", [0, 1.5, -0.2, True, "half", (0.3, 0)])
def test_bad_step_fractions_are_errors_naming_the_option(bad):
    with pytest.raises(ValueError, match="step_fraction=.*fraction of the call's steps in \\(0, 1\\]"):
        SG(enabled=True, step_fraction=bad)


def test_a_step_fraction_per_stage_needs_one_value_per_stage():
    with pytest.raises(ValueError, match="step_fraction=.*needs one value per stage after the base: 2"):
        _apply(build("sd15"), stages=(128,), step_fraction=(0.3, 0.3, 0.3))
    pipe = _apply(build("sd15"), step_fraction=(0.3, 0.3))
    with pytest.raises(ValueError, match="step_fraction=.*has 2 values but the plan has 1 stage"):
        generate(pipe, "sd15", 128, 6, 0)


def test_a_calls_strength_runs_its_own_share_of_the_steps_as_diffusers_img2img():
    pipe = _apply(build("sd15"), renoise=0.7, step_fraction=0.2)
    picture = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    progressive.generate(pipe, "x", 128, 128, image=picture, strength=0.5, num_inference_steps=10,
                         generator=torch.Generator().manual_seed(0), output_type="latent")
    assert [(r.height, r.steps) for r in progressive.last_run(pipe)] == [(128, 5)]
    generate(pipe, "sd15", 128, 10, 0, output_type="latent")  # without a strength: 0.2 of 10 steps from 0.7 deep
    assert [r.steps for r in progressive.last_run(pipe)] == [10, 2]
