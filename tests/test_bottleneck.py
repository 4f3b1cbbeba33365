"""Bottleneck sampling: its math against independent formulas, its stages inside tiny pipelines of all six
families (sizes, step counts, transitions), composition with structure guidance, errors, bit-identity."""

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hires
from hires.runtime import HOOK_PREFIX, get_attachment
from hires.sampling import latents, schedules, stages
from hires.sampling import resize as resize_math
from hires.techniques.bottleneck import slices as bottleneck
from hires.techniques.structure_guidance import guidance as progressive
from tiny_models import CFG_ARGUMENTS, IMAGE_CHANNELS, SEPARATE_CFG, build, generate

BN = hires.BottleneckConfig


def _call(pipe, family, size, steps=10, seed=0, output_type="pt", **extra):
    return generate(pipe, family, size, steps, seed, output_type=output_type, **extra)


def _apply(pipe, **options):
    hires.apply(pipe, hires.HiresConfig(bottleneck=BN(enabled=True, **options)))
    return pipe


class _Denoiser:
    """Every denoiser call: the size the runtime's call state sees and the timestep it got."""

    def __init__(self, pipe):
        attachment = get_attachment(pipe)
        self.sizes, self.timesteps = [], []
        family = attachment.info.family
        scale = family.timestep_input_scale
        signature = inspect.signature(type(attachment.denoiser).forward)

        def after(module, args, kwargs, output):  # after forward: the call state is built inside it
            state = attachment.state
            self.sizes.append((state.height, state.width))
            timestep = signature.bind_partial(module, *args, **kwargs).arguments[family.timestep_argument]
            if family.layout.frame_list:  # Z-Image's transformer takes 1 - sigma
                timestep = 1 - timestep
            self.timesteps.append(round(float(torch.as_tensor(timestep).flatten()[0]) / scale, 2))

        self.handle = attachment.denoiser.register_forward_hook(after, with_kwargs=True)


# -- math -----------------------------------------------------------------------------------------
def test_default_split_follows_the_documented_fractions():
    assert bottleneck.split_steps(50, (0.1, 0.7, 0.2)) == [5, 35, 10]
    assert bottleneck.split_steps(10, (0.1, 0.7, 0.2)) == [1, 7, 2]
    # 2.8 / 19.6 / 5.6: the tie between 0.6 and 0.6 goes to the earlier stage, not to float noise
    assert bottleneck.split_steps(28, (0.1, 0.7, 0.2)) == [3, 20, 5]
    for total in range(3, 60):
        for fractions in [(0.1, 0.7, 0.2), (0.1, 0.6, 0.3), (0.2, 0.2, 0.2, 0.2, 0.2), (0.9, 0.05, 0.05)]:
            if total < len(fractions):
                continue
            counts = bottleneck.split_steps(total, fractions)
            assert sum(counts) == total and min(counts) >= 1
            if all(f * total >= 1 for f in fractions):  # no stage needs the floor of one step
                assert all(abs(c - f * total) < 1 for c, f in zip(counts, fractions)), (total, fractions, counts)
    assert bottleneck.default_step_fractions(5) == pytest.approx((0.1, 0.7 / 3, 0.7 / 3, 0.7 / 3, 0.2))


def test_time_shift_equals_the_exponential_mu_shift():
    t = torch.linspace(1, 0.02, 50, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0, 6.0):
        mu = math.log(s)
        assert torch.allclose(schedules.time_shift(t, s), math.exp(mu) / (math.exp(mu) + (1 / t - 1)))


def _schedulers():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return {
        "ddim": DDIMScheduler(**betas, steps_offset=1, set_alpha_to_one=False),
        "ddim-v": DDIMScheduler(**betas, steps_offset=1, set_alpha_to_one=False, prediction_type="v_prediction"),
        "euler": EulerDiscreteScheduler(**betas, steps_offset=1, timestep_spacing="leading"),
        "flow": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


@pytest.mark.parametrize("name", ["ddim", "ddim-v", "euler", "flow"])
def test_clean_estimate_and_transition_follow_each_convention(name):
    scheduler = _schedulers()[name]
    scheduler.set_timesteps(20)
    gen = torch.Generator().manual_seed(1)
    sample, output = torch.randn(1, 4, 6, 6, generator=gen), torch.randn(1, 4, 6, 6, generator=gen)
    index = 7
    t = scheduler.timesteps[index]
    prediction = {"ddim": "epsilon", "ddim-v": "v_prediction", "euler": "epsilon", "flow": "flow"}[name]
    if name == "euler":
        scheduler._init_step_index(t)
    x0 = schedules.clean_estimate(scheduler, prediction, output, t, sample)
    if name == "flow":
        sigma = float(scheduler.sigmas[index])
        expected = sample - sigma * output
    elif name == "euler":  # Euler keeps x0 + sigma eps
        expected = sample - float(scheduler.sigmas[index]) * output
    else:
        a = float(scheduler.alphas_cumprod[int(t)])
        expected = (sample - math.sqrt(1 - a) * output) / math.sqrt(a) if prediction == "epsilon" \
            else math.sqrt(a) * sample - math.sqrt(1 - a) * output
    assert torch.allclose(x0, expected, atol=1e-4)

    # the transition: bicubic resize of x0, then the forward process to the next stage's first step
    noise = torch.randn(1, 4, 12, 12, generator=gen)
    start = scheduler.timesteps[3]
    if name == "euler":
        scheduler._step_index = None
    moved = bottleneck.transition(scheduler, x0, (12, 12), "bicubic", noise, start)
    up = F.interpolate(x0, size=(12, 12), mode="bicubic", align_corners=False)
    if name == "flow":
        sigma = float(start) / 1000
        reference = (1 - sigma) * up + sigma * noise
    else:
        a = float(scheduler.alphas_cumprod[int(start)])
        if name == "euler":
            reference = up + math.sqrt((1 - a) / a) * noise
        else:
            reference = math.sqrt(a) * up + math.sqrt(1 - a) * noise
    assert torch.allclose(moved, reference, atol=1e-4)


def test_keep_first_leaves_each_step_its_own_target_sigma():
    scheduler = _schedulers()["flow"]
    scheduler.set_timesteps(10)
    timesteps, sigmas = scheduler.timesteps.clone(), scheduler.sigmas.clone()
    bottleneck.keep_first(scheduler, 4)
    assert torch.equal(scheduler.timesteps, timesteps[:4]) and torch.equal(scheduler.sigmas, sigmas[:5])
    with pytest.raises(ValueError, match="count=5"):
        bottleneck.keep_first(scheduler, 5)


def test_plans_round_sizes_and_slice_the_schedule():
    info = hires.model_info(build("flux"))  # size multiple 16
    plan = bottleneck.plan_stages(info, BN(enabled=True), 200, 96, 20)
    assert [(p.height, p.width) for p in plan] == [(200, 96), (96, 48), (200, 96)]  # 100 -> 96, 48 -> 48
    assert [(p.start, p.end) for p in plan] == [(0, 2), (2, 16), (16, 20)]
    plan = bottleneck.plan_stages(info, BN(enabled=True, scales=(1, 0.5, 0.25, 0.5, 1),
                                           renoise=(0.9, 0.7, 0.5, 0.3)), 128, 128, 20)
    assert [p.height for p in plan] == [128, 64, 32, 64, 128]
    # renoise r restarts a stage where a fraction r of the schedule is still ahead
    assert [(p.start, p.end) for p in plan] == [(0, 2), (2, 7), (6, 12), (10, 16), (14, 20)]


# -- errors ---------------------------------------------------------------------------------------
def test_stages_that_do_not_return_to_the_request_are_errors():
    with pytest.raises(ValueError, match=r"scales=\(1.0, 0.5, 0.5\).*must start and end at 1.0"):
        BN(enabled=True, scales=(1.0, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"scales=\(0.5, 1.0, 1.0\)"):
        BN(enabled=True, scales=(0.5, 1.0, 1.0))
    with pytest.raises(ValueError, match="scales"):
        BN(enabled=True, scales=(1.0, 1.0))
    with pytest.raises(ValueError, match="step_fractions"):
        BN(enabled=True, step_fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="resample"):
        BN(enabled=True, resample="nearest")


def test_family_and_call_errors_name_the_option():
    with pytest.raises(ValueError, match=r"BottleneckConfig.shifts=.*Leave shifts=None"):
        _apply(build("sd15"), shifts=(3.0, 3.0, 3.0))
    pipe = _apply(build("sd3"))
    with pytest.raises(ValueError, match="num_inference_steps=2"):
        _call(pipe, "sd3", 64, steps=2)
    assert "set_timesteps" not in pipe.scheduler.__dict__ and "step" not in pipe.scheduler.__dict__
    hires.apply(pipe, hires.HiresConfig(bottleneck=BN(enabled=True, renoise=(0.95, 0.1))))
    with pytest.raises(ValueError, match=r"renoise\[1\]=0.1"):
        _call(pipe, "sd3", 64, steps=10)
    # nothing stays behind: a plain call after remove equals plain diffusers
    hires.remove(pipe)
    plain = build("sd3")
    assert torch.equal(_call(pipe, "sd3", 64), _call(plain, "sd3", 64))


# -- inside tiny pipelines ------------------------------------------------------------------------
def test_every_family_runs_its_stages_at_their_sizes_and_step_counts(family):
    pipe = _apply(build(family))
    seen = _Denoiser(pipe)
    image = _call(pipe, family, 64, steps=10)
    assert image.shape == (1, IMAGE_CHANNELS.get(family, 3), 64, 64)
    # one denoiser call per step (batched CFG; Flux is guidance-distilled), two with true CFG (Klein,
    # Chroma), at each stage's size
    calls = 2 if family in SEPARATE_CFG and family not in CFG_ARGUMENTS else 1

    def per_call(values):
        return [v for v in values for _ in range(calls)]

    assert seen.sizes == per_call([(64, 64)] * 1 + [(32, 32)] * 7 + [(64, 64)] * 2)
    run = bottleneck.last_run(pipe)
    assert [(r.height, r.width, r.steps) for r in run] == [(64, 64, 1), (32, 32, 7), (64, 64, 2)]
    assert seen.timesteps == per_call([round(t, 2) for r in run for t in r.timesteps])
    assert hires.last_call(pipe).height == 64 and hires.last_call(pipe).steps_seen == tuple(per_call((0, 1)))

    seen.sizes.clear()
    image = _call(pipe, family, (128, 64), steps=6)  # 2x the base side, another aspect ratio
    assert image.shape == (1, IMAGE_CHANNELS.get(family, 3), 128, 64)
    # 6 steps at 10/70/20: 0.6, 4.2, 1.2 -> 1, 4, 1
    assert seen.sizes == per_call([(128, 64)] + [(64, 32)] * 4 + [(128, 64)])
    seen.handle.remove()


def test_flux_slices_follow_the_pipeline_schedule_at_each_stage_size():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = _apply(build("flux"))
    _call(pipe, "flux", 64, steps=10)
    config = pipe.scheduler.config
    run = bottleneck.last_run(pipe)
    u = np.linspace(1.0, 1 / 10, 10)
    for stage, (start, end) in zip(run, [(0, 1), (1, 8), (8, 10)]):
        tokens = (stage.height // 16) * (stage.width // 16)
        mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len,
                             config.base_shift, config.max_shift)
        expected = math.exp(mu) / (math.exp(mu) + (1 / u - 1)) * 1000
        assert np.allclose(stage.timesteps, expected[start:end], atol=1e-2)


@pytest.mark.parametrize("family_name", ["sd3", "flux"])
def test_per_stage_shifts_reach_each_stage(family_name):
    shifts = (1.0, 3.0, 6.0)
    pipe = _apply(build(family_name), shifts=shifts)
    _call(pipe, family_name, 64, steps=10)
    scheduler = pipe.scheduler
    if family_name == "flux":
        u = np.linspace(1.0, 1 / 10, 10)  # the pipeline's own unshifted sigmas
    else:  # SD3: the scheduler spaces timesteps between its own sigma_max and sigma_min
        u = np.linspace(float(scheduler.sigma_max), float(scheduler.sigma_min), 10)
    run = bottleneck.last_run(pipe)
    for stage, s, (start, end) in zip(run, shifts, [(0, 1), (1, 8), (8, 10)]):
        assert stage.shift == s
        assert np.allclose(stage.timesteps, (s * u / (1 + (s - 1) * u) * 1000)[start:end], atol=1e-2)
    if family_name == "sd3":
        assert scheduler.shift == 3.0  # the scheduler's own shift is back


def _capture_steps(pipe, records):
    scheduler = pipe.scheduler
    original = scheduler.step

    def step(model_output, timestep, sample, *args, **kwargs):
        index = scheduler.step_index if scheduler.step_index is not None else scheduler.index_for_timestep(timestep)
        records.append((model_output.clone(), float(timestep), sample.clone(), float(scheduler.sigmas[index])))
        return original(model_output, timestep, sample, *args, **kwargs)

    scheduler.__dict__["step"] = step


@pytest.mark.parametrize("family_name", ["flux", "sdxl"])
def test_each_stage_starts_from_the_resized_clean_estimate_of_the_last(family_name, monkeypatch):
    """With the re-injected noise set to zero, a stage's first sample is the previous stage's last x0,
    resized (Lanczos): x0 = x - sigma v (flow), x - sigma eps (Euler's VP convention)."""
    monkeypatch.setattr(stages, "randn_tensor", lambda shape, **kw: torch.zeros(shape))
    pipe = _apply(build(family_name))
    records = []
    _capture_steps(pipe, records)
    _call(pipe, family_name, 64, steps=10)
    assert len(records) == 10
    packed = family_name == "flux"
    spatial = (lambda x, side: latents.unpack(x, side, side, 2)) if packed else (lambda x, side: x)
    for last, first, side, next_side in [(0, 1, 8, 4), (7, 8, 4, 8)]:
        output, _, sample, sigma = records[last]
        x0 = spatial(sample, side) - sigma * spatial(output, side)
        _, _, start, next_sigma = records[first]
        expected = resize_math.resize(x0, (next_side, next_side), "lanczos")
        if packed:  # flow: (1 - sigma) x0 + sigma * 0
            expected = (1 - next_sigma) * expected
        assert torch.allclose(spatial(start, next_side), expected, atol=1e-4)


def test_off_and_removed_are_bit_identical_and_leave_no_trace():
    pipe = build("flux")
    plain = _call(pipe, "flux", 64)
    pipe_keys, scheduler_keys = sorted(pipe.__dict__), sorted(pipe.scheduler.__dict__)
    hires.apply(pipe, hires.HiresConfig(bottleneck=BN(enabled=False)))
    assert torch.equal(_call(pipe, "flux", 64), plain)
    _apply(pipe)
    assert not torch.equal(_call(pipe, "flux", 64), plain)
    hires.remove(pipe)
    assert torch.equal(_call(pipe, "flux", 64), plain)
    assert sorted(pipe.__dict__) == pipe_keys and sorted(pipe.scheduler.__dict__) == scheduler_keys


def test_same_seed_same_image_and_noise_from_the_generator():
    pipe = _apply(build("sd15"))
    first = _call(pipe, "sd15", 64, seed=3)
    assert torch.equal(_call(pipe, "sd15", 64, seed=3), first)
    assert not torch.equal(_call(pipe, "sd15", 64, seed=4), first)


def test_inside_structure_guidance_base_stage_and_removed_cleanly():
    pipe = build("sd15")
    plain = _call(pipe, "sd15", 128, steps=10)
    pipe_keys, scheduler_keys = sorted(pipe.__dict__), sorted(pipe.scheduler.__dict__)
    hires.apply(pipe, hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True, renoise=0.3),
                                        bottleneck=BN(enabled=True)))
    seen = _Denoiser(pipe)
    image = _call(pipe, "sd15", 128, steps=10)
    assert image.shape == (1, 3, 128, 128)
    # the base stage (64) runs high-low-high; structure guidance's 128 stage re-runs its last 3 steps
    assert seen.sizes == [(64, 64)] + [(32, 32)] * 7 + [(64, 64)] * 2 + [(128, 128)] * 3
    assert [(r.height, r.steps) for r in bottleneck.last_run(pipe)] == [(64, 1), (32, 7), (64, 2)]
    assert [r.height for r in progressive.last_run(pipe)] == [64, 128]
    # at the base size structure guidance stays out and bottleneck runs on the user's call
    seen.sizes.clear()
    _call(pipe, "sd15", 64, steps=10)
    assert seen.sizes == [(64, 64)] + [(32, 32)] * 7 + [(64, 64)] * 2
    seen.handle.remove()
    hires.remove(pipe)
    assert torch.equal(_call(pipe, "sd15", 128, steps=10), plain)
    assert sorted(pipe.__dict__) == pipe_keys and sorted(pipe.scheduler.__dict__) == scheduler_keys
    for module in pipe.unet.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not any(n.startswith(HOOK_PREFIX) for n in registry.hooks)


def test_composes_with_attention_techniques_each_stage_at_its_size():
    pipe = build("flux")
    hires.apply(pipe, hires.HiresConfig(bottleneck=BN(enabled=True),
                                        entropy_scaling=hires.EntropyScalingConfig(enabled=True)))
    seen = _Denoiser(pipe)
    image = _call(pipe, "flux", 128, steps=10)
    assert image.shape == (1, 3, 128, 128)
    assert seen.sizes == [(128, 128)] + [(64, 64)] * 7 + [(128, 128)] * 2
    seen.handle.remove()


def test_a_call_that_fails_after_its_stages_leaves_nothing_after_the_next_call_or_remove(monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = build("sd3")
    plain = _call(pipe, "sd3", 64)
    scheduler_keys = sorted(pipe.scheduler.__dict__)
    _apply(pipe)
    real = FlowMatchEulerDiscreteScheduler.set_timesteps
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the user's own call, after the three stage calls
            raise RuntimeError("scheduler failed")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "set_timesteps", failing)
    with pytest.raises(RuntimeError, match="scheduler failed"):
        _call(pipe, "sd3", 64)
    assert "set_timesteps" in pipe.scheduler.__dict__  # the user's call never set its schedule
    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "set_timesteps", real)
    first = _call(pipe, "sd3", 64)  # the next call starts afresh
    assert [r.steps for r in bottleneck.last_run(pipe)] == [1, 7, 2]
    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "set_timesteps", failing)
    calls.clear()
    with pytest.raises(RuntimeError, match="scheduler failed"):
        _call(pipe, "sd3", 64)
    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "set_timesteps", real)
    hires.remove(pipe)
    assert sorted(pipe.scheduler.__dict__) == scheduler_keys
    assert torch.equal(_call(pipe, "sd3", 64), plain)
    assert not torch.equal(first, plain)


def test_five_stages_with_bicubic_resampling():
    pipe = _apply(build("sd3"), scales=(1.0, 0.5, 0.25, 0.5, 1.0), resample="bicubic")
    seen = _Denoiser(pipe)
    image = _call(pipe, "sd3", 64, steps=10)
    assert image.shape == (1, 3, 64, 64)
    # 10 steps at 10 / 23.3 / 23.3 / 23.3 / 20 %: 1, 3, 2, 2, 2 (largest remainder, ties to the earlier stage)
    assert seen.sizes == [(64, 64)] + [(32, 32)] * 3 + [(16, 16)] * 2 + [(32, 32)] * 2 + [(64, 64)] * 2
    seen.handle.remove()
