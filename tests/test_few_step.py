"""Few-step models (SDXL-Turbo / Lightning style at 4 steps without CFG, Flux-schnell style without a
guidance embedding): the automatic preset's stages get steps that make sense at 4 steps."""

import pytest
import torch

import hires
import tiny_models
from hires.sampling import schedules
from hires.techniques.structure_guidance import guidance as progressive

STEPS = 4


def turbo_sdxl():
    """The tiny SDXL with a Lightning-style schedule (Euler, trailing spacing); called without CFG."""
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_models.build("sdxl")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    return pipe


def schnell_flux():
    """The tiny Flux without a guidance embedding and with schnell's static shift of 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    pipe = tiny_models.build("flux")
    config = dict(pipe.transformer.config)
    config["guidance_embeds"] = False
    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel.from_config(config).eval()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    return pipe


FEW_STEP = {"sdxl": (turbo_sdxl, {"guidance_scale": 0.0}), "flux": (schnell_flux, {})}


def _call(pipe, family, size, **extra):
    overrides = dict(FEW_STEP[family][1], **extra)
    return tiny_models.generate(pipe, family, size, steps=STEPS, seed=3, **overrides)


def test_few_step_schedules_rerun_at_least_half_the_schedule_per_stage():
    assert progressive.stage_renoise(None, 4) == progressive.FEW_STEP_RENOISE == 0.5
    assert progressive.stage_renoise(0.25, 8) == 0.5  # SDXL's preset value, on a few-step schedule
    assert progressive.stage_renoise(0.8, 4) == 0.8
    assert progressive.stage_renoise(None, 9) == progressive.DEFAULT_RENOISE == 0.3
    assert progressive.stage_renoise(0.25, 50) == 0.25
    assert schedules.stage_steps(4, progressive.stage_renoise(None, 4)) == 2  # 0.3 would give 1
    assert schedules.stage_steps(50, progressive.stage_renoise(None, 50)) == 15


@pytest.mark.parametrize("family", list(FEW_STEP))
def test_automatic_preset_on_a_few_step_model_at_4x_area(family):
    pipe = FEW_STEP[family][0]()
    plain_base, plain = _call(pipe, family, 64), _call(pipe, family, 128)
    hires.apply(pipe)
    assert torch.equal(_call(pipe, family, 64), plain_base)  # the base size stays plain diffusers
    image = _call(pipe, family, 128)
    assert image.shape[-2:] == (128, 128) and torch.isfinite(image).all()
    assert not torch.equal(image, plain)
    run = progressive.last_run(pipe)
    assert [(r.height, r.steps) for r in run] == [(64, STEPS), (128, 2)]
    assert run[1].guided_steps == (0, 1)  # the preset guides every step, the guide's weight fading 1, 1/2
    hires.remove(pipe)
    assert torch.equal(_call(pipe, family, 128), plain)
