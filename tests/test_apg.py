"""APG: its math against an independent formulation and diffusers' guider, the x0 conversions, and
the prediction every CFG family's scheduler receives."""

import math

import pytest
import torch

import hires
from hires.runtime import get_attachment
from hires.techniques.apg.combiner import adaptive_projected_guidance, resolve, x0_coefficients
from hires.denoiser.guidance import ensure_guidance_hook
from test_guidance import TRUE_CFG, Recorder, cfg_kwargs
from tiny_models import build, generate

CFG_FAMILIES = ("sd15", "sd21", "sdxl", "pixart", "sd3", "flux")


def reference_apg(cond, uncond, w, eta, r, beta, previous, clipped=None):
    """The paper's update written per sample on flat float64 vectors (independent of hires)."""
    guided, running = [], []
    for i in range(cond.shape[0]):
        c = cond[i].double().flatten()
        d = c - uncond[i].double().flatten()
        if beta:
            if previous is not None:
                d = d + beta * previous[i].double().flatten()
            running.append(d.clone())
        n = torch.sqrt(torch.dot(d, d))
        if clipped is not None:
            clipped.append(bool(n > r))
        if n > r:
            d = d * (r / n)
        par = torch.dot(d, c) / torch.dot(c, c) * c
        guided.append((c + (w - 1) * ((d - par) + eta * par)).reshape(cond[i].shape))
    return torch.stack(guided).to(cond.dtype), (torch.stack(running).reshape(cond.shape) if beta else None)


SETTINGS = [
    dict(eta=0.0, r=math.inf, beta=0.0),
    dict(eta=0.0, r=3.0, beta=-0.5),
    dict(eta=0.35, r=10.0, beta=0.0),
    dict(eta=1.0, r=2.0, beta=-0.75),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("setting", SETTINGS)
def test_pure_function_equals_the_reference_over_several_steps(dtype, setting):
    g = torch.Generator().manual_seed(1)
    w = 7.5
    running = previous = None
    for step in range(4):
        cond = torch.randn(3, 4, 6, 5, generator=g).to(dtype)
        uncond = (cond.float() + 0.7 * torch.randn(3, 4, 6, 5, generator=g)).to(dtype)
        got, running = adaptive_projected_guidance(cond, uncond, w, eta=setting["eta"], norm_threshold=setting["r"],
                                                   momentum=setting["beta"], running_delta=running)
        want, previous = reference_apg(cond, uncond, w, setting["eta"], setting["r"], setting["beta"], previous)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want)
        if setting["beta"]:
            torch.testing.assert_close(running, previous)
        else:
            assert running is None


def test_the_reference_really_clips_projects_and_uses_momentum():
    # Guards the test above against settings that change nothing.
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    cfg = uncond + 5 * (cond - uncond)
    variants = [reference_apg(cond, uncond, 5, 1.0, math.inf, 0.0, None)[0]]
    variants += [reference_apg(cond, uncond, 5, *args)[0] for args in
                 [(0.0, math.inf, 0.0, None), (1.0, 2.0, 0.0, None), (1.0, math.inf, -0.5, cond - uncond)]]
    torch.testing.assert_close(variants[0], cfg)
    for variant in variants[1:]:
        assert (variant - cfg).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eta_one_no_clipping_no_momentum_is_plain_cfg(dtype):
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=g).to(dtype), torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    got, running = adaptive_projected_guidance(cond, uncond, 6.0, eta=1.0, norm_threshold=math.inf, momentum=0.0)
    cfg = (uncond.double() + 6.0 * (cond.double() - uncond.double())).to(dtype)
    assert running is None
    # Same value rounded once from float64: equal, or one rounding step apart where float64 differs in the last bits.
    torch.testing.assert_close(got, cfg, rtol=torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("setting", SETTINGS)
def test_matches_diffusers_original_formulation_with_scale_w_minus_one(setting):
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    g = torch.Generator().manual_seed(4)
    w = 9.0
    buffer = MomentumBuffer(setting["beta"]) if setting["beta"] else None
    running = None
    for step in range(4):
        cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        ours, running = adaptive_projected_guidance(cond, uncond, w, eta=setting["eta"], norm_threshold=setting["r"],
                                                    momentum=setting["beta"], running_delta=running)
        theirs = normalized_guidance(cond, uncond, w - 1, buffer, setting["eta"],
                                     0.0 if math.isinf(setting["r"]) else setting["r"], use_original_formulation=True)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_diffusers_default_formulation_coincides_only_without_changes_to_delta():
    from diffusers.guiders.adaptive_projected_guidance import normalized_guidance

    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ours = adaptive_projected_guidance(cond, uncond, 4.0, eta=1.0)[0]
    torch.testing.assert_close(ours, normalized_guidance(cond, uncond, 4.0, None, 1.0, 0.0), rtol=1e-5, atol=1e-5)
    ours_eta0 = adaptive_projected_guidance(cond, uncond, 4.0, eta=0.0)[0]
    assert (ours_eta0 - normalized_guidance(cond, uncond, 4.0, None, 0.0, 0.0)).abs().max() > 1e-2


# -- x0 conversion -----------------------------------------------------------------------------
def _vp_check(scheduler, prediction, step):
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    t = float(scheduler.timesteps[step])
    alpha_bar = float(scheduler.alphas_cumprod[int(round(t))])
    sample = math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * noise
    output = noise if prediction == "epsilon" else math.sqrt(alpha_bar) * noise - math.sqrt(1 - alpha_bar) * x0
    a, b = x0_coefficients(prediction, scheduler, step, t)
    torch.testing.assert_close(a * sample + b * output, x0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_x0_from_ddim_alphas(prediction):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type=prediction)
    scheduler.set_timesteps(10)
    for step in (0, 4, 9):
        _vp_check(scheduler, prediction, step)


@pytest.mark.parametrize("karras", [False, True])
def test_x0_from_euler_sigmas_of_the_scaled_model_input(karras):
    from diffusers import EulerDiscreteScheduler

    # "leading" spacing gives integer timesteps (as the tiny SDXL uses); Karras sigmas give fractional ones.
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       use_karras_sigmas=karras, timestep_spacing="linspace" if karras else "leading")
    scheduler.set_timesteps(8)
    g = torch.Generator().manual_seed(7)
    for step in (0, 3, 7):
        x0, noise = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
        sigma = float(scheduler.sigmas[step])
        t = scheduler.timesteps[step]
        scheduler._step_index = step
        model_input = scheduler.scale_model_input(x0 + sigma * noise, t)  # what the UNet receives
        a, b = x0_coefficients("epsilon", scheduler, step, float(t))
        torch.testing.assert_close(a * model_input + b * noise, x0, rtol=1e-4, atol=1e-4)
        if not karras:
            _vp_check(scheduler, "epsilon", step)  # integer timesteps: alphas_cumprod agrees


def test_x0_from_flow_sigmas():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(6)
    g = torch.Generator().manual_seed(8)
    for step in (0, 5):
        x0, noise = torch.randn(1, 16, 4, generator=g), torch.randn(1, 16, 4, generator=g)
        s = float(scheduler.sigmas[step])
        a, b = x0_coefficients("flow", scheduler, step, float(scheduler.timesteps[step]))
        torch.testing.assert_close(a * ((1 - s) * x0 + s * noise) + b * (noise - x0), x0, rtol=1e-5, atol=1e-5)


def test_x0_conversion_refuses_what_it_cannot_convert():
    from diffusers import DDIMScheduler, EDMEulerScheduler

    edm = EDMEulerScheduler()
    edm.set_timesteps(4)
    with pytest.raises(ValueError, match="sigma_data.*space='output'"):
        x0_coefficients("epsilon", edm, 0, float(edm.timesteps[0]))
    ddim = DDIMScheduler()
    ddim.set_timesteps(4)
    with pytest.raises(ValueError, match="prediction_type='sample'.*space='output'"):
        x0_coefficients("sample", ddim, 0, float(ddim.timesteps[0]))


# -- inside the tiny pipelines -----------------------------------------------------------------
def _sample(args, kwargs):
    return args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))


def _test_coefficients(pipe, family, step):
    """x0 = a x + b out from the test's own reading of the scheduler (not hires's)."""
    scheduler = pipe.scheduler
    if family in ("sd3", "flux"):
        return 1.0, -float(scheduler.sigmas[step])
    alpha_bar = float(scheduler.alphas_cumprod[int(round(float(scheduler.timesteps[step])))])
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if scheduler.config.prediction_type == "v_prediction":
        return alpha, -sigma
    return 1 / alpha, -sigma / alpha


def _expected_predictions(pipe, family, rec, scale, eta, r, beta, space, active=lambda step: True, clipped=None):
    """What the scheduler must receive at each step, from the raw denoiser outputs."""
    expected, previous = [], None
    for step, (uncond, cond) in enumerate(rec.raw_pairs()):
        if not active(step):
            expected.append(uncond + scale * (cond - uncond))
            continue
        if space == "x0":
            index = 2 * step if family == "flux" else step
            sample = _sample(*rec.calls[index])
            sample = sample if family == "flux" else sample[: sample.shape[0] // 2]
            sample = sample[:, : uncond.shape[1]]
            a, b = _test_coefficients(pipe, family, step)
            cond_x0, uncond_x0 = a * sample + b * cond, a * sample + b * uncond
        else:
            cond_x0, uncond_x0 = cond, uncond
        threshold = r(cond_x0) if callable(r) else r
        guided, previous = reference_apg(cond_x0, uncond_x0, scale, eta, threshold, beta, previous, clipped)
        expected.append((guided - a * sample) / b if space == "x0" else guided)
    return expected


def _scale(family):
    return TRUE_CFG["true_cfg_scale"] if family == "flux" else {"pixart": 4.5}.get(family, 5.0)


# Thresholds between the largest and smallest update norm of each tiny run (3 steps, seed 0), so
# clipping acts at some steps and not at others (the test checks that it does).
CLIP_AT_SOME_STEPS = {
    ("sd15", "x0"): 2.0, ("sd15", "output"): 0.7, ("sd21", "x0"): 0.6, ("sd21", "output"): 0.8,
    ("sdxl", "x0"): 2.0, ("sdxl", "output"): 0.8, ("pixart", "x0"): 180.0, ("pixart", "output"): 1.0,
    ("sd3", "x0"): 0.3, ("sd3", "output"): 0.4, ("flux", "x0"): 0.1, ("flux", "output"): 0.12,
}


@pytest.mark.parametrize("space", ["x0", "output"])
@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_the_scheduler_receives_the_apg_prediction(family, space):
    pipe = build(family)
    plain = generate(pipe, family, 64, steps=3, **cfg_kwargs(family))
    eta, beta = 0.2, -0.5
    r = CLIP_AT_SOME_STEPS[family, space]
    hires.apply(pipe,
                hires.HiresConfig(apg=hires.APGConfig(enabled=True, eta=eta, momentum=beta,
                                                      norm_threshold=r, space=space)))
    rec = Recorder(pipe, family)
    out = generate(pipe, family, 64, steps=3, **cfg_kwargs(family))
    rec.close()
    clipped = []
    expected = _expected_predictions(pipe, family, rec, _scale(family), eta, r, beta, space, clipped=clipped)
    assert len(expected) == len(rec.stepped) == 3
    assert any(clipped) and not all(clipped), clipped
    for want, got in zip(expected, rec.stepped):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-4)
    assert not torch.equal(out, plain)
    assert hires.last_call(pipe).notes["log.apg.steps"] == [0, 1, 2]
    hires.remove(pipe)
    assert torch.equal(generate(pipe, family, 64, steps=3, **cfg_kwargs(family)), plain)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_presets_scale_the_threshold_with_the_latent_size(family):
    pipe = build(family)
    config = hires.APGConfig(enabled=True)
    preset = hires.model_info(pipe).family.apg
    settings = resolve(config, get_attachment(hires.apply(pipe, hires.HiresConfig(apg=config))).info)
    assert (settings.eta, settings.momentum) == (preset.eta, preset.momentum)
    assert settings.threshold_for(torch.zeros(2, 4, 16, 16)) == pytest.approx(preset.rms_threshold_x0 * 32)
    rec = Recorder(pipe, family)
    generate(pipe, family, 128, steps=3, **cfg_kwargs(family))
    rec.close()
    rms = preset.rms_threshold_x0
    expected = _expected_predictions(pipe, family, rec, _scale(family), preset.eta,
                                     lambda t: rms * math.sqrt(t[0].numel()), preset.momentum, "x0")
    for want, got in zip(expected, rec.stepped):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-4, atol=1e-4)


def test_active_range_leaves_other_steps_as_plain_cfg():
    family = "sd15"
    pipe = build(family)
    rec_plain = Recorder(pipe, family)
    generate(pipe, family, 64, steps=4)
    rec_plain.close()
    hires.apply(pipe, hires.HiresConfig(apg=hires.APGConfig(enabled=True, start=0.25, stop=0.75)))
    rec = Recorder(pipe, family)
    generate(pipe, family, 64, steps=4)
    rec.close()
    assert hires.last_call(pipe).notes["log.apg.steps"] == [1, 2]
    assert torch.equal(rec.stepped[0], rec_plain.stepped[0])  # untouched before start
    assert not torch.equal(rec.stepped[1], rec_plain.stepped[1])
    preset = hires.model_info(pipe).family.apg
    expected = _expected_predictions(pipe, family, rec, 5.0, preset.eta,
                                     lambda t: preset.rms_threshold_x0 * math.sqrt(t[0].numel()),
                                     preset.momentum, "x0", active=lambda step: step in (1, 2))
    for want, got in zip(expected, rec.stepped):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_off_plain_cfg_settings_and_removal_are_bit_identical(family):
    pipe = build(family)
    plain = generate(pipe, family, 64, steps=3, **cfg_kwargs(family))
    hires.apply(pipe, hires.HiresConfig(apg=hires.APGConfig(enabled=False)))
    assert torch.equal(generate(pipe, family, 64, steps=3, **cfg_kwargs(family)), plain)
    # eta 1, no clipping, no momentum is CFG itself: the model's outputs pass through untouched
    hires.apply(pipe,
                hires.HiresConfig(apg=hires.APGConfig(enabled=True, eta=1.0, momentum=0.0, norm_threshold=math.inf)))
    assert torch.equal(generate(pipe, family, 64, steps=3, **cfg_kwargs(family)), plain)
    hires.apply(pipe, hires.HiresConfig(apg=hires.APGConfig(enabled=True)))
    assert not torch.equal(generate(pipe, family, 64, steps=3, **cfg_kwargs(family)), plain)
    hires.remove(pipe)
    assert torch.equal(generate(pipe, family, 64, steps=3, **cfg_kwargs(family)), plain)


def test_momentum_is_reset_every_call():
    pipe = build("sd15")
    hires.apply(pipe, hires.HiresConfig(apg=hires.APGConfig(enabled=True, momentum=-0.75)))
    first = generate(pipe, "sd15", 64, steps=3)
    assert torch.equal(generate(pipe, "sd15", 64, steps=3), first)


@pytest.mark.parametrize(
    "family, overrides, match",
    [
        ("flux", {}, r"APGConfig needs classifier-free guidance.*true_cfg_scale=1\.0.*negative_prompt"),
        ("flux", {"true_cfg_scale": 4.0}, r"APGConfig.*negative prompt given: False"),
        ("sd15", {"guidance_scale": 1.0}, r"APGConfig.*guidance_scale=1\.0.*guidance_scale > 1"),
        ("sd3", {"guidance_scale": 0.5}, r"APGConfig.*guidance_scale=0\.5"),
    ],
)
def test_apg_without_cfg_is_a_clear_error(family, overrides, match):
    pipe = build(family)
    hires.apply(pipe, hires.HiresConfig(apg=hires.APGConfig(enabled=True)))
    with pytest.raises(ValueError, match=match):
        generate(pipe, family, 64, steps=2, **overrides)


def test_composes_with_an_offset_added_after_apg():
    # Noise-damped guidance plugs in this way: G = APG(pair of the pipeline's pass) + offset.
    family = "sd15"
    pipe = build(family)
    eta, beta, r = 0.0, -0.5, CLIP_AT_SOME_STEPS["sd15", "x0"]
    hires.apply(pipe, hires.HiresConfig(apg=hires.APGConfig(enabled=True, eta=eta, momentum=beta, norm_threshold=r)))
    ensure_guidance_hook(get_attachment(pipe)).add_offset(
        "test.shift", lambda run, args, kwargs, uncond, cond, state: torch.full_like(uncond, 0.125))
    rec = Recorder(pipe, family)
    generate(pipe, family, 64, steps=3)
    rec.close()
    expected = _expected_predictions(pipe, family, rec, 5.0, eta, r, beta, "x0")
    for want, got in zip(expected, rec.stepped):
        torch.testing.assert_close(got, want + 0.125, rtol=1e-4, atol=1e-4)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="APGConfig.space='eps'"):
        hires.APGConfig(space="eps")
    with pytest.raises(ValueError, match="APGConfig.momentum=1.5"):
        hires.APGConfig(momentum=1.5)


def test_with_noise_damped_guidance_apg_acts_on_the_strong_pair():
    # At step 0 both runs see the same latent, so the same strong pair (u, c) and weak uncond; the
    # scheduler inputs then differ by exactly APG(u, c) - CFG(u, c).
    family, scale = "sd15", 5.0
    redilation = hires.RedilationConfig(enabled=True, noise_damped_guidance=True)
    eta, beta, r = 0.0, -0.5, 1.0
    received, pairs = {}, {}
    for name, config in {
        "redilation": hires.HiresConfig(redilation=redilation),
        "both": hires.HiresConfig(redilation=redilation,
                                  apg=hires.APGConfig(enabled=True, eta=eta, momentum=beta, norm_threshold=r)),
    }.items():
        pipe = build(family)
        hires.apply(pipe, config)
        seen = pairs.setdefault(name, [])
        ensure_guidance_hook(get_attachment(pipe)).add_offset(
            "test.spy", lambda run, args, kwargs, u, c, state, seen=seen: seen.append((u.clone(), c.clone())))
        rec = Recorder(pipe, family)
        generate(pipe, family, 128, steps=3)
        rec.close()
        received[name] = rec.stepped
        assert 0 in hires.last_call(pipe).notes["log.redilation.ndcfg_steps"]
    (u, c), (u_b, c_b) = pairs["redilation"][0], pairs["both"][0]
    assert torch.equal(u, u_b) and torch.equal(c, c_b)
    sample = _sample(*rec.calls[0])[:1]
    a, b = _test_coefficients(pipe, family, 0)
    guided_x0, _ = reference_apg(a * sample + b * c, a * sample + b * u, scale, eta, r, beta, None)
    apg_minus_cfg = (guided_x0 - a * sample) / b - (u + scale * (c - u))
    assert apg_minus_cfg.abs().max() > 1e-2
    torch.testing.assert_close(received["both"][0] - received["redilation"][0], apg_minus_cfg, rtol=1e-4, atol=1e-4)


def test_under_model_cpu_offload_apg_gives_the_same_prediction():
    family = "sd15"
    config = hires.HiresConfig(apg=hires.APGConfig(enabled=True, norm_threshold=CLIP_AT_SOME_STEPS["sd15", "x0"]))
    reference = build(family)
    hires.apply(reference, config)
    expected = generate(reference, family, 64, steps=3)
    pipe = build(family)
    hires.apply(pipe, config)
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(generate(pipe, family, 64, steps=3), expected)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_structure_guidance_stages_take_their_own_apg(family):
    from hires.techniques.structure_guidance import guidance as progressive

    eta, beta, r = 0.2, -0.5, CLIP_AT_SOME_STEPS[family, "output"]
    own = hires.APGConfig(enabled=True, eta=eta, momentum=beta, norm_threshold=r, space="output")
    off = hires.APGConfig(enabled=False)
    # guided_steps=0: no low-band swap, so the scheduler sees exactly the combined CFG pair
    cases = [
        (hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True, guided_steps=0, apg=own)),
         (False, True)),
        (hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True, guided_steps=0, apg=off),
                           apg=own), (True, False)),
    ]
    scale = _scale(family)
    for config, apg_in_stage in cases:
        pipe = build(family)
        hires.apply(pipe, config)
        rec = Recorder(pipe, family)
        generate(pipe, family, 128, steps=6, **cfg_kwargs(family))
        rec.close()
        stages = progressive.last_run(pipe)
        pairs = rec.raw_pairs()
        assert len(stages) == 2 and len(pairs) == len(rec.stepped) == sum(s.steps for s in stages)
        start = 0
        for stage, on in zip(stages, apg_in_stage):
            previous = None  # every stage is a call of its own: momentum starts afresh
            for k in range(start, start + stage.steps):
                uncond, cond = pairs[k]
                if on:
                    want, previous = reference_apg(cond, uncond, scale, eta, r, beta, previous)
                else:
                    want = uncond + scale * (cond - uncond)
                torch.testing.assert_close(rec.stepped[k], want.to(rec.stepped[k].dtype), rtol=1e-4, atol=1e-4)
            start += stage.steps
        hires.remove(pipe)


def test_stage_apg_needs_cfg_only_in_its_stages():
    pipe = build("sd15")
    stage_only = hires.StructureGuidanceConfig(enabled=True, apg=hires.APGConfig(enabled=True), guidance_scale=1.0)
    hires.apply(pipe, hires.HiresConfig(structure_guidance=stage_only))
    with pytest.raises(ValueError,
                       match=r"StructureGuidanceConfig\.apg needs classifier-free guidance.*guidance_scale=1\.0"):
        generate(pipe, "sd15", 128, steps=4)
    # off in the later stage: that stage may run without CFG, the base stage keeps the call's APG
    base_only = hires.StructureGuidanceConfig(enabled=True, apg=hires.APGConfig(enabled=False), guidance_scale=1.0)
    hires.apply(pipe, hires.HiresConfig(structure_guidance=base_only, apg=hires.APGConfig(enabled=True)))
    generate(pipe, "sd15", 128, steps=4)
    with pytest.raises(ValueError, match=r"StructureGuidanceConfig\.apg=.*hires\.APGConfig"):
        hires.StructureGuidanceConfig(enabled=True, apg=0.5)
    with pytest.raises(ValueError, match=r"StructureGuidanceConfig\.apg=.*needs one value per stage"):
        hires.apply(pipe, hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(
            enabled=True, stages=(96,), apg=(hires.APGConfig(enabled=True),))))
    config = hires.HiresConfig.from_dict({"structure_guidance": {"enabled": True,
                                                                 "apg": [None, {"enabled": True, "eta": 0.5}]}})
    assert config.structure_guidance.apg == (None, hires.APGConfig(enabled=True, eta=0.5))
    assert hires.HiresConfig.from_dict(config.to_dict()) == config


def test_with_structure_guidance_the_guided_steps_keep_the_guides_low_band():
    """The swap acts on what the scheduler receives: APG's combined x0 carries the guide's low band."""
    from hires.sampling import wavelets
    from hires.techniques.structure_guidance import guidance as progressive

    pipe = build("sd15")
    structure = hires.StructureGuidanceConfig(enabled=True, space="latent", guided_steps=2,
                                              renoise=0.5, sharpen_alpha=0.0,
                                              handover="hard")  # whole swaps: the low band is exactly the guide's
    hires.apply(pipe, hires.HiresConfig(structure_guidance=structure,
                                        apg=hires.APGConfig(enabled=True, eta=0.2, momentum=-0.5)))
    attachment, seen = get_attachment(pipe), []
    step = pipe.scheduler.step

    def record(model_output, timestep, sample, *args, **kwargs):
        stage = attachment.stages.current
        guide = getattr(stage, "data", None)
        if guide is not None and guide.guide is not None:
            alpha_bar = float(pipe.scheduler.alphas_cumprod[int(timestep)])
            x0 = (sample - math.sqrt(1 - alpha_bar) * model_output) / math.sqrt(alpha_bar)  # DDIM, eps prediction
            seen.append((wavelets.low_band(x0.float(), structure.wavelet, 1, progressive.WAVELET_MODE), guide.guide))
        return step(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = record
    generate(pipe, "sd15", 128, steps=6)
    del pipe.scheduler.step
    assert hires.last_call(pipe).notes["log.apg.steps"] and len(seen) == 3
    inner = (..., slice(3, -3), slice(3, -3))  # the symmetric extension blends both near the borders
    for index, (low, guide) in enumerate(seen):
        close = torch.allclose(low[inner], guide[inner], atol=1e-4)
        assert close == (index < 2), (index, float((low - guide)[inner].abs().max()))
