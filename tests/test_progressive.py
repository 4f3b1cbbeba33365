"""Progressive structure guidance: its math against independent formulations, its stages inside tiny
pipelines of all six families, its errors, and bit-identity when off or removed."""

import math

import numpy as np
import pytest
import torch

import hires
from hires.runtime import HOOK_PREFIX, get_attachment
from hires.sampling import latent_space, schedules, wavelets
from hires.sampling import resize as resize_math
from hires.sampling.latents import pack, unpack
from hires.techniques.structure_guidance import guidance as progressive
from tiny_models import CFG_ARGUMENTS, IMAGE_CHANNELS, SEPARATE_CFG, build, generate

SG = hires.StructureGuidanceConfig


def _call(pipe, family, size, steps=6, seed=0, output_type="latent", **extra):
    return generate(pipe, family, size, steps, seed, output_type=output_type, **extra)


def _spatial(pipe, family, latents, size):
    """Flux returns packed latents for output_type='latent'; Flux.2 [klein] the VAE's own latent."""
    family_record = hires.model_info(pipe).family
    if family_record.layout.returns_vae_latent:
        return latent_space.from_vae(family_record.layout, pipe.vae, latents)
    if family_record.layout.packed:
        info = hires.model_info(pipe)
        return unpack(latents, size // info.latent_factor, size // info.latent_factor, info.patch_size)
    return latents


def _apply(pipe, **options):
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=True, **options)))
    return pipe


# -- math -----------------------------------------------------------------------------------------
def _reference_unsharp(x: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
    """(1 + a) x - a blur(x), blur by an explicit 3x3 Gaussian with mirror (reflect) padding, in loops."""
    w = np.array([math.exp(-(i * i) / (2 * sigma * sigma)) for i in (-1, 0, 1)])
    w2 = np.outer(w, w) / np.outer(w, w).sum()
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    blur = np.zeros_like(x)
    for i in range(x.shape[2]):
        for j in range(x.shape[3]):
            blur[:, :, i, j] = (padded[:, :, i:i + 3, j:j + 3] * w2).sum(axis=(2, 3))
    return (1 + alpha) * x - alpha * blur


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.1), (1.0, 1.3), (2.0, 2.0), (0.5, 0.7)])
def test_sharpening_equals_unsharp_mask_reference(alpha, sigma):
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    ours = resize_math.unsharp_mask(x, alpha, sigma)
    assert np.abs(ours.numpy() - _reference_unsharp(x.double().numpy(), alpha, sigma)).max() < 1e-5
    assert torch.equal(resize_math.unsharp_mask(x, 0.0, sigma), x)


def test_lanczos_resize_matches_pillow_in_the_interior():
    from PIL import Image

    x = torch.rand(1, 1, 12, 10, generator=torch.Generator().manual_seed(1))
    ours = resize_math.resize(x, (36, 30), "lanczos")[0, 0].numpy()
    ref = np.asarray(Image.fromarray(x[0, 0].numpy(), mode="F").resize((30, 36), Image.LANCZOS))
    # Pillow renormalises the taps that fall outside the image; hires repeats edge samples instead.
    assert np.abs(ours[9:-9, 9:-9] - ref[9:-9, 9:-9]).max() < 1e-4
    constant = torch.full((1, 2, 5, 6), 0.25)
    assert torch.allclose(resize_math.resize(constant, (17, 11), "lanczos"), torch.full((1, 2, 17, 11), 0.25))


def test_pack_and_unpack_equal_fluxs_own_layout():
    from diffusers import FluxPipeline

    z = torch.randn(2, 4, 6, 8)
    packed = pack(z, 2)
    assert torch.equal(packed, FluxPipeline._pack_latents(z, 2, 4, 6, 8))
    assert torch.equal(unpack(packed, 6, 8, 2), z)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "flow", "sample"])
def test_x0_conversions_match_the_forward_process(prediction):
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 5, 5, generator=gen), torch.randn(2, 4, 5, 5, generator=gen)
    level = torch.tensor(0.37)
    if prediction == "flow":
        x, output = (1 - level) * x0 + level * eps, eps - x0
    else:
        a, s = level.sqrt(), (1 - level).sqrt()
        x = a * x0 + s * eps
        output = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[prediction]
    assert torch.allclose(schedules.predicted_x0(output, x, prediction, level), x0, atol=1e-5)
    assert torch.allclose(schedules.output_from_x0(x0, x, prediction, level), output, atol=1e-5)


def _schedulers():
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler)

    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return {
        "ddim": DDIMScheduler(**betas, steps_offset=1, set_alpha_to_one=False),
        "euler": EulerDiscreteScheduler(**betas, steps_offset=1, timestep_spacing="leading"),
        "dpm": DPMSolverMultistepScheduler(**betas),
        "flow": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm", "flow"])
def test_renoise_and_truncated_schedules_follow_each_convention(name):
    scheduler = _schedulers()[name]
    scheduler.set_timesteps(50)
    full = scheduler.timesteps.clone()
    steps = schedules.stage_steps(50, 0.3)
    assert steps == 15
    schedules.truncate_schedule(scheduler, 50 - steps)
    assert torch.equal(scheduler.timesteps, full[-15:])
    t = scheduler.timesteps[0]
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, 4, 4, 4, generator=gen), torch.randn(1, 4, 4, 4, generator=gen)
    noisy = schedules.renoise(scheduler, x0, noise, t)
    if name == "flow":
        sigma = float(t) / 1000
        expected = (1 - sigma) * x0 + sigma * noise
    else:
        a = float(scheduler.alphas_cumprod[int(t)])
        if name == "euler":  # Euler keeps x0 + sigma eps (its model input is that / sqrt(sigma^2 + 1))
            expected = x0 + math.sqrt((1 - a) / a) * noise
        else:
            expected = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
    assert torch.allclose(noisy, expected, atol=1e-5)
    if name != "flow":  # alpha-bar at the first kept step; DiffuseHigh's t~281 for Euler leading
        assert abs(float(schedules.vp_alpha_bar(scheduler, t)) - float(scheduler.alphas_cumprod[int(t)])) < 1e-6
    if name == "euler":
        assert int(t) == 281


def test_vp_alpha_bar_interpolates_fractional_timesteps_in_log_sigma():
    scheduler = _schedulers()["euler"]
    alphas = scheduler.alphas_cumprod.double()
    def sigma(i):
        return float(((1 - alphas[i]) / alphas[i]).sqrt())

    expected_sigma = math.exp(0.5 * math.log(sigma(500)) + 0.5 * math.log(sigma(501)))
    assert abs(float(schedules.vp_alpha_bar(scheduler, 500.5)) - 1 / (1 + expected_sigma**2)) < 1e-6


def test_dynamic_shift_equals_diffusers_calculate_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config
    for tokens in (256, 4096, 65536):
        assert abs(schedules.scheduler_shift_mu(config, tokens) - calculate_shift(tokens)) < 1e-12


def test_truncation_refuses_higher_order_schedulers():
    from diffusers import HeunDiscreteScheduler

    scheduler = HeunDiscreteScheduler()
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="first-order scheduler.*HeunDiscreteScheduler has order 2"):
        schedules.truncate_schedule(scheduler, 5)


# -- the plan and its errors ------------------------------------------------------------------------
def test_stage_plans_follow_diffusehigh_and_explicit_lists():
    info = hires.model_info(build("sdxl"))  # base 64 px, multiple 8
    assert progressive.stage_sizes(info, SG(enabled=True), 256, 256) == [(64, 64), (128, 128), (192, 192), (256, 256)]
    assert progressive.stage_sizes(info, SG(enabled=True), 128, 128) == [(64, 64), (128, 128)]
    assert progressive.stage_sizes(info, SG(enabled=True), 96, 96) == [(64, 64), (96, 96)]
    assert progressive.stage_sizes(info, SG(enabled=True), 64, 64) == [(64, 64)]
    assert progressive.stage_sizes(info, SG(enabled=True, stages=(1.5, 160)), 256, 256) == [
        (64, 64), (96, 96), (160, 160), (256, 256)]
    # Non-square requests keep their aspect ratio from the base stage on.
    assert progressive.stage_sizes(info, SG(enabled=True), 128, 256) == [(48, 88), (96, 176), (128, 256)]
    # Where the base stage would not be smaller than the request (at or below the base area, as SDXL's
    # 832x1216 and 1024x768 buckets are, or rounded up to it) there is nothing to guide: a plain call.
    assert progressive.stage_sizes(info, SG(enabled=True), 56, 80) == [(56, 80)]
    assert progressive.stage_sizes(info, SG(enabled=True), 64, 48) == [(64, 48)]
    assert progressive.stage_sizes(info, SG(enabled=True, stages=(96,)), 48, 48) == [(48, 48)]
    # A ladder rung that would overshoot one side of the request is dropped, not an error.
    for height, width in ((136, 64), (200, 72), (72, 200), (128, 120)):
        sizes = progressive.stage_sizes(info, SG(enabled=True), height, width)
        assert sizes[-1] == (height, width)
        assert all(b[0] <= a[0] and b[1] <= a[1] and b[0] * b[1] < a[0] * a[1] for b, a in zip(sizes, sizes[1:]))
    # An input image is the origin, not a stage; only larger stages follow it.
    assert progressive.stage_sizes(info, SG(enabled=True), 256, 256, start=(100, 100)) == [
        (100, 100), (128, 128), (192, 192), (256, 256)]


def test_doubling_ladder_doubles_the_side_per_stage():
    info = hires.model_info(build("sdxl"))  # base 64 px
    doubling = SG(enabled=True, ladder="doubling")
    assert progressive.stage_sizes(info, doubling, 256, 256) == [(64, 64), (128, 128), (256, 256)]
    assert progressive.stage_sizes(info, doubling, 512, 512) == [(64, 64), (128, 128), (256, 256), (512, 512)]
    assert progressive.stage_sizes(info, doubling, 192, 192) == [(64, 64), (128, 128), (192, 192)]
    assert progressive.stage_sizes(info, doubling, 128, 128) == [(64, 64), (128, 128)]
    assert progressive.stage_sizes(info, doubling, 128, 256) == [(48, 88), (96, 176), (128, 256)]


def _reference_source_range_clamp(up: np.ndarray, src: np.ndarray) -> np.ndarray:
    """Loops: each output pixel's centre falls in one source pixel; clamp to that pixel's 3x3 range."""
    out = up.copy()
    sh, sw = src.shape[-2:]
    oh, ow = up.shape[-2:]
    for i in range(oh):
        for j in range(ow):
            si = min(sh - 1, int((i + 0.5) * sh / oh))
            sj = min(sw - 1, int((j + 0.5) * sw / ow))
            window = src[:, :, max(0, si - 1):si + 2, max(0, sj - 1):sj + 2]
            out[:, :, i, j] = np.clip(up[:, :, i, j], window.min(axis=(2, 3)), window.max(axis=(2, 3)))
    return out


def test_guide_weight_fades_linearly_over_the_guided_steps():
    """fade: 1 - k/g in guided step k (from 0) of g, 0 after; hard: 1 in every guided step, 0 after."""
    for g in (1, 3, 6):
        for k in range(g + 3):
            assert math.isclose(progressive.guide_weight(k, g, "fade"), (g - k) / g if k < g else 0.0)
            assert progressive.guide_weight(k, g, "hard") == (1.0 if k < g else 0.0)
    assert progressive.guide_weight(0, 0, "fade") == 0.0


def test_a_fading_step_moves_the_low_band_part_of_the_way(monkeypatch):
    """In periodization mode the swap is exact, so the faded prediction's LL band is the blend
    (1 - w) LL(x0) + w LL(guide) and its detail bands are x0's own, for a CFG pair as for one sample."""
    from types import SimpleNamespace

    monkeypatch.setattr(progressive, "WAVELET_MODE", "periodization")
    generator = torch.Generator().manual_seed(0)
    x0, target = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(1, 4, 16, 16, generator=generator)
    guide = wavelets.low_band(target, "db4", 1, "periodization")
    planner = progressive.StructureGuidance.__new__(progressive.StructureGuidance)
    planner.config = SG(enabled=True, space="latent", handover="fade")
    for k, weight in ((0, 1.0), (1, 2 / 3), (2, 1 / 3)):
        state = SimpleNamespace(step_index=k, stage=SimpleNamespace(data=SimpleNamespace(guide=guide, guided_steps=3)))
        out = planner._swap(x0, state)
        ll, details = wavelets.dwt2(out, "db4", "periodization")
        ll0, details0 = wavelets.dwt2(x0, "db4", "periodization")
        torch.testing.assert_close(ll, (1 - weight) * ll0 + weight * guide.expand_as(ll0), rtol=1e-5, atol=1e-5)
        for band, band0 in zip(details, details0):
            torch.testing.assert_close(band, band0, rtol=1e-5, atol=1e-5)


def test_anti_ringing_clamp_matches_loops_and_removes_bicubic_overshoot():
    src = torch.rand(1, 2, 7, 9, generator=torch.Generator().manual_seed(3))
    up = resize_math.unsharp_mask(resize_math.resize(src, (21, 27)), 1.0, 1.0)
    ours = resize_math.clamp_to_source_range(up, src)
    assert np.abs(ours.numpy() - _reference_source_range_clamp(up.numpy(), src.numpy())).max() < 1e-6
    # A step edge: bicubic plus sharpening ring past both levels; the clamp keeps the edge inside them.
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 1.0
    ringing = resize_math.unsharp_mask(resize_math.resize(edge, (32, 32)), 1.0, 1.0)
    assert ringing.max() > 1.05 and ringing.min() < -0.05
    clamped = resize_math.clamp_to_source_range(ringing, edge)
    assert clamped.max() <= 1.0 and clamped.min() >= 0.0
    assert torch.all(clamped[..., :, 20:] == 1) and torch.all(clamped[..., :, :12] == 0)  # flat sides stay flat
    assert torch.equal(clamped[..., :, 14:18], ringing[..., :, 14:18].clamp(0, 1))  # the edge itself keeps its slope


@pytest.mark.parametrize("upscale_space,decodes,encodes", [("pixel", 1, 1), ("latent", 0, 0)])
def test_latent_guidance_upscales_in_pixels_with_one_round_trip_per_stage(upscale_space, decodes,
                                                                          encodes, monkeypatch):
    calls = {"decode": 0, "encode": 0}
    stand_in = _InvertibleVAE()
    monkeypatch.setattr(latent_space.VAECodec, "decode", lambda self,
                        z: calls.__setitem__("decode", calls["decode"] + 1) or stand_in.decode(z))
    monkeypatch.setattr(latent_space.VAECodec, "encode", lambda self,
                        x: calls.__setitem__("encode", calls["encode"] + 1) or stand_in.encode(x))
    pipe = _apply(build("sd15"), guided_steps=2, renoise=0.5, space="latent", upscale_space=upscale_space)
    _call(pipe, "sd15", 192, steps=6)  # two stages after the base
    assert calls == {"decode": 2 * decodes, "encode": 2 * encodes}
    assert [r.guided_steps for r in progressive.last_run(pipe)] == [(), (0, 1), (0, 1)]


@pytest.mark.parametrize("options,message", [
    (dict(stages=(128, 96)), "must grow from stage to stage.*128x128 to 96x96"),
    (dict(stages=(56,)), "must grow from stage to stage.*64x64 to 56x56"),
    (dict(stages=(100,)), "100 is not a multiple of 8.*use 96 or 104"),
    (dict(stages=((128, 100),)), "100 is not a multiple of 8"),
    (dict(wavelet="sym4"), "wavelet='sym4' is not supported.*db4"),
    (dict(stages=(128,), renoise=(0.3, 0.3, 0.3)), "renoise=.*needs one value per stage after the base: 2"),
    (dict(space="pixel", upscale_space="latent"), "upscale_space='latent' cannot feed space='pixel'"),
    (dict(ladder="geometric"), "ladder='geometric' is not valid.*'doubling'"),
    (dict(handover="soft"), "handover='soft' is not valid.*'fade'"),
])
def test_bad_options_are_clear_errors_at_apply_time(options, message):
    pipe = build("sd15")
    with pytest.raises(ValueError, match=message):
        _apply(pipe, **options)
    assert not hires.is_applied(pipe)


def test_renoise_outside_the_unit_interval_is_an_error():
    for bad in (0, 1.5, -0.1, (0.3, 0)):
        with pytest.raises(ValueError, match="renoise"):
            SG(enabled=True, renoise=bad)
    SG(enabled=True, renoise=1.0)


def test_call_time_errors_name_the_option():
    pipe = _apply(build("sd15"), guided_steps=3, renoise=0.2)
    with pytest.raises(ValueError, match="guided_steps=3 exceeds the 2 steps of the 128x128 stage"):
        _call(pipe, "sd15", 128, steps=10)
    pipe = _apply(build("sd15"), renoise=(0.3, 0.3))
    with pytest.raises(ValueError, match="renoise=.*has 2 values but the plan has 1 stage"):
        _call(pipe, "sd15", 128)
    pipe = _apply(build("sd15"))
    with pytest.raises(ValueError, match="latents= cannot be combined"):
        _call(pipe, "sd15", 128, latents=torch.zeros(1, 4, 16, 16))
    # The failed calls left nothing behind: a plain call still runs its full schedule.
    assert "set_timesteps" not in pipe.scheduler.__dict__


# -- inside tiny pipelines --------------------------------------------------------------------------
class _CountCalls:
    def __init__(self, pipe):
        self.heights, self.steps = [], []
        attachment = get_attachment(pipe)
        denoiser = attachment.denoiser

        def after(module, args, output):  # after forward: the runtime's state is built inside it
            state = attachment.state
            self.heights.append(state.height if state is not None else None)

        self.handle = denoiser.register_forward_hook(after)


@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_two_and_three_stage_runs_have_the_right_sizes_and_exact_guided_steps(family, space, monkeypatch):
    pipe = _apply(build(family), guided_steps=2, renoise=0.5, space=space)
    swaps = []
    real_swap = wavelets.swap_low_band
    monkeypatch.setattr(wavelets, "swap_low_band", lambda *a, **k: swaps.append(1) or real_swap(*a, **k))
    counter = _CountCalls(pipe)
    sizes = {"two": 128, "three": 192}
    for name, size in sizes.items():
        counter.heights.clear()
        swaps.clear()
        image = _call(pipe, family, size, steps=6, output_type="pt")
        assert image.shape == (1, IMAGE_CHANNELS.get(family, 3), size, size)
        run = progressive.last_run(pipe)
        expected = [64, 128] if name == "two" else [64, 128, 192]
        assert [r.height for r in run] == expected and [r.width for r in run] == expected
        assert [r.steps for r in run] == [6] + [3] * (len(expected) - 1)
        assert [r.guided_steps for r in run] == [()] + [(0, 1)] * (len(expected) - 1)
        # One denoiser call per step (batched CFG; Flux is guidance-distilled here; two with Klein's and
        # Chroma's true CFG), each at its stage's size as the call state sees it; the user's own call
        # runs no step of its own.
        calls = 2 if family in SEPARATE_CFG and family not in CFG_ARGUMENTS else 1
        heights = [64] * 6 + sum(([h] * 3 for h in expected[1:]), [])
        assert counter.heights == [h for h in heights for _ in range(calls)]
        assert len(swaps) == calls * 2 * (len(expected) - 1)  # exactly the configured guided steps swap
        assert hires.last_call(pipe).height == size
    counter.handle.remove()


class _InvertibleVAE:
    """A VAE stand-in with encode(decode(z)) == z, so the pixel path's effect is measurable (the tiny
    models' random VAEs are not autoencoders): channels 0-2 as 8x8 blocks, channel 3 on a +-1 pattern."""

    @staticmethod
    def _pattern(h, w):
        i = torch.arange(8)
        return ((i[:, None] + i[None, :]) % 2 * 2 - 1).float().repeat(h, w)

    def decode(self, z):
        up = torch.nn.functional.interpolate(z.float(), scale_factor=8, mode="nearest")
        return up[:, :3] + up[:, 3:4] * self._pattern(*z.shape[-2:])

    def encode(self, image):
        pattern = self._pattern(image.shape[-2] // 8, image.shape[-1] // 8)
        pool = torch.nn.functional.avg_pool2d
        return torch.cat([pool(image, 8), pool((image * pattern).mean(1, keepdim=True), 8)], dim=1)


def test_the_invertible_stand_in_inverts():
    z = torch.randn(1, 4, 3, 5)
    assert torch.allclose(_InvertibleVAE().encode(_InvertibleVAE().decode(z)), z, atol=1e-5)


@pytest.mark.parametrize("space", ["latent", "pixel"])
def test_guidance_pulls_the_low_band_toward_the_upscaled_base(family, space, monkeypatch):
    stand_in = _InvertibleVAE()
    pipe = build(family)
    factor = pipe.vae_scale_factor
    if space == "pixel" and factor != 8:
        pytest.skip(f"the invertible stand-in VAE decodes 4-channel x8 latents; {family}'s latent is x{factor}")
    if space == "pixel":
        monkeypatch.setattr(latent_space.VAECodec, "decode", lambda self, z: stand_in.decode(z))
        monkeypatch.setattr(latent_space.VAECodec, "encode", lambda self, x: stand_in.encode(x))
    base = _spatial(pipe, family, _call(pipe, family, 64, steps=10), 64)
    distances = {}
    for guided, handover in ((0, "hard"), (3, "hard"), (3, "fade")):
        _apply(pipe, guided_steps=guided, renoise=0.5, sharpen_alpha=0.0, space=space, handover=handover)
        out = _spatial(pipe, family, _call(pipe, family, 128, steps=10), 128)
        hires.remove(pipe)
        if space == "latent":
            upscaled = resize_math.resize(base, (128 // factor, 128 // factor))
            ours, reference = out, resize_math.clamp_to_source_range(upscaled, base)
        else:
            ours = stand_in.decode(out)
            source = stand_in.decode(base)
            reference = resize_math.clamp_to_source_range(resize_math.resize(source, (128, 128)), source).clamp(-1, 1)
        low, ref_low = wavelets.low_band(ours), wavelets.low_band(reference)
        distances[guided, handover] = float((low - ref_low).norm() / ref_low.norm())
    # DiffuseHigh's hard swap pulls hardest; the fading hand-over pulls part of the way
    assert distances[3, "hard"] < 0.75 * distances[0, "hard"], distances
    assert distances[3, "hard"] < distances[3, "fade"] < 0.95 * distances[0, "hard"], distances


@pytest.mark.parametrize("family_name", ["sd15", "flux"])
def test_off_and_removed_are_bit_identical_and_leave_no_trace(family_name):
    pipe = build(family_name)
    plain = _call(pipe, family_name, 128, output_type="pt")
    plain_base = _call(pipe, family_name, 64, output_type="pt")
    pipe_keys, scheduler_keys = sorted(pipe.__dict__), sorted(pipe.scheduler.__dict__)
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=False)))
    assert torch.equal(_call(pipe, family_name, 128, output_type="pt"), plain)
    _apply(pipe)
    assert torch.equal(_call(pipe, family_name, 64, output_type="pt"), plain_base)  # base size: a plain call
    guided = _call(pipe, family_name, 128, output_type="pt")
    assert not torch.equal(guided, plain)
    hires.remove(pipe)
    assert torch.equal(_call(pipe, family_name, 128, output_type="pt"), plain)
    assert sorted(pipe.__dict__) == pipe_keys and sorted(pipe.scheduler.__dict__) == scheduler_keys
    for module in pipe.transformer.modules() if hasattr(pipe, "transformer") else pipe.unet.modules():
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or not any(n.startswith(HOOK_PREFIX) for n in registry.hooks)


@pytest.mark.parametrize("size", [(56, 80), (64, 48), (48, 64)])
def test_automatic_preset_at_or_below_the_base_area_is_plain_diffusers(size):
    """Like SDXL's standard buckets (832x1216, 1024x768: below its 1024² area), with the automatic preset."""
    pipe = build("sdxl")
    plain = generate(pipe, "sdxl", size, output_type="pt")
    hires.apply(pipe)
    assert torch.equal(generate(pipe, "sdxl", size, output_type="pt"), plain)


def test_same_seed_same_image_and_randomness_from_the_generator():
    pipe = _apply(build("sd15"), space="pixel")
    first = _call(pipe, "sd15", 128, seed=5)
    sigmas = [r.sharpen_sigma for r in progressive.last_run(pipe)]
    assert torch.equal(_call(pipe, "sd15", 128, seed=5), first)
    assert [r.sharpen_sigma for r in progressive.last_run(pipe)] == sigmas
    assert sigmas[0] is None and 0.1 <= sigmas[1] <= 2.0
    assert not torch.equal(_call(pipe, "sd15", 128, seed=6), first)
    assert [r.sharpen_sigma for r in progressive.last_run(pipe)] != sigmas


def test_flux_later_stages_keep_the_base_size_shift():
    pipe = _apply(build("flux"), renoise=0.5)
    _call(pipe, "flux", 192, steps=8)
    base, *later = progressive.last_run(pipe)
    for stage in later:  # the tail of the base-size schedule, not diffusers' larger dynamic shift
        assert stage.timesteps == base.timesteps[-4:]


def test_per_stage_guidance_scale_reaches_each_stage():
    pipe = _apply(build("sd15"), guidance_scale=(7.0, 9.0))
    seen = []
    attachment = get_attachment(pipe)
    handle = pipe.unet.register_forward_hook(lambda m, a, o: seen.append(attachment.state.guidance_scale))
    _call(pipe, "sd15", 192, steps=4)
    handle.remove()
    assert seen == [5.0] * 4 + [7.0] * 2 + [9.0] * 2  # a 4-step schedule: two steps per later stage
    assert [r.guidance_scale for r in progressive.last_run(pipe)] == [None, 7.0, 9.0]


def test_input_image_path_and_sdxl_size_conditioning():
    from PIL import Image

    pipe = _apply(build("sdxl"))
    time_ids = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda m, a, k: time_ids.append(k["added_cond_kwargs"]["time_ids"][-1].tolist()), with_kwargs=True)
    picture = Image.fromarray((np.random.default_rng(0).random((80, 72, 3)) * 255).astype(np.uint8))
    out = progressive.generate(pipe, "a red circle", 192, 192, image=picture, num_inference_steps=10,
                               generator=torch.Generator().manual_seed(0), output_type="pt")
    handle.remove()
    assert out.images.shape == (1, 3, 192, 192)
    assert [(r.height, r.width) for r in progressive.last_run(pipe)] == [(128, 128), (192, 192)]
    assert time_ids and all(t == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0] for t in time_ids)  # the base size
    with pytest.raises(ValueError, match="must be larger than the input image"):
        progressive.generate(pipe, "a red circle", 64, 64, image=picture)
    with pytest.raises(ValueError, match="structure guidance is not applied"):
        progressive.generate(build("sd15"), "a red circle", 128, 128)


def test_a_call_failing_after_its_stages_leaves_later_calls_plain(monkeypatch):
    from hires.sampling import stages

    pipe = build("flux")  # Flux prepares its latents before its schedule: the failure lands in between
    plain = _call(pipe, "flux", 128, output_type="pt")
    _apply(pipe)
    real_replace = stages.replace_latents

    def fail_for_the_users_call(result, tensor):
        if not get_attachment(pipe) or get_attachment(pipe).stages.running:
            return real_replace(result, tensor)
        raise RuntimeError("interrupted")

    monkeypatch.setattr(stages, "replace_latents", fail_for_the_users_call)
    with pytest.raises(RuntimeError, match="interrupted"):
        _call(pipe, "flux", 128, output_type="pt")
    monkeypatch.undo()
    hires.remove(pipe)
    assert "set_timesteps" not in pipe.scheduler.__dict__  # removal takes the failed call's shadow out
    assert torch.equal(_call(pipe, "flux", 128, output_type="pt"), plain)
    assert "set_timesteps" not in pipe.scheduler.__dict__
