"""Dilated sampling (DemoFusion): sub-lattices, blur and ids against explicit formulations; the hooked
prediction against a per-sub-lattice loop over the unhooked denoiser on all six families (Flux packed,
base-grid positions; padded sides); its effect; errors; bit-identity when off, at the base size, removed."""

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline

import hires
import hires.families
import tiny_models
from hires.runtime import get_attachment
from hires.sampling import schedules
from hires.families import read_model_info
from hires.sampling import latents
from hires.sampling.latents import adapter_for
from hires.techniques.dilated_sampling import lattices as ds
from tiny_models import build, generate

DS = hires.DilatedSamplingConfig


def _cosf(t: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * (1000 - t) / 1000))


# -- math ---------------------------------------------------------------------------------------------
def test_split_and_merge_are_the_strided_sub_lattices():
    x = torch.randn(2, 3, 12, 8)
    for strides in ((2, 2), (3, 2), (2, 1), (1, 4)):
        sh, sw = strides
        y = ds.split_lattices(x, strides)
        assert y.shape == (2 * sh * sw, 3, 12 // sh, 8 // sw)
        for b in range(2):
            for i in range(sh):
                for j in range(sw):
                    assert torch.equal(y[b * sh * sw + i * sw + j], x[b, :, i::sh, j::sw])
        assert torch.equal(ds.merge_lattices(y, strides), x)


def test_strides_round_each_side_and_padding_fits_the_multiple():
    assert ds.lattice_strides(2048, 2048, 1024, 1024) == (2, 2)
    assert ds.lattice_strides(4096, 2048, 1024, 1024) == (4, 2)  # non-square: per side
    assert ds.lattice_strides(1536, 1536, 1024, 1024) == (2, 2)  # 1.5 rounds half up
    assert ds.lattice_strides(1408, 1024, 1024, 1024) == (1, 1)  # 1.375 -> not split
    assert ds.lattice_strides(512, 512, 1024, 1024) == (1, 1)
    assert ds.padded_size(14, 2, 2) == 16 and ds.padded_size(16, 2, 2) == 16 and ds.padded_size(12, 3, 1) == 12
    assert ds.padded_size(13, 3, 1) == 15


def _blur_2d(x, strides, sigma):
    """A full 2-D kernel as the outer product of two Gaussians, zero padding, renormalised per sample."""
    kh, kw = 2 * strides[0] - 1, 2 * strides[1] - 1

    def g(n):
        c = (n - 1) / 2
        v = torch.tensor([math.exp(-((i - c) ** 2) / (2 * sigma**2)) for i in range(n)], dtype=torch.float64)
        return v / v.sum()

    kernel = (g(kh)[:, None] * g(kw)[None, :]).float()
    channels = x.shape[1]
    out = F.conv2d(x, kernel.expand(channels, 1, kh, kw), padding=(kh // 2, kw // 2), groups=channels)
    flat_x, flat_o = x.flatten(1), out.flatten(1)
    return ((flat_o - flat_o.mean(1, keepdim=True)) / flat_o.std(1, keepdim=True) * flat_x.std(1, keepdim=True)
            + flat_x.mean(1, keepdim=True)).view_as(x)


@pytest.mark.parametrize("strides,sigma", [((2, 2), 1.0), ((3, 2), 0.6), ((4, 4), 0.01), ((2, 1), 0.8)])
def test_blur_is_demofusions_gaussian_renormalised(strides, sigma):
    x = torch.randn(2, 4, 12, 10) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    assert torch.allclose(ds.gaussian_blur(x, strides, sigma), _blur_2d(x, strides, sigma), atol=1e-5)
    assert torch.equal(ds.gaussian_blur(x, strides, 0.0), x)
    # DemoFusion's sigma * (0.99 cosf ** e3 + 0.01): 1 at pure noise, 0.01 sigma at the clean end
    assert ds.blur_sigma(1.0, 0.8, 1.0) == pytest.approx(0.8)
    assert ds.blur_sigma(0.0, 0.8, 1.0) == pytest.approx(0.008)
    assert ds.blur_sigma(0.5, 1.0, 2.0) == pytest.approx(0.99 * 0.25 + 0.01)


def test_flux_ids_are_the_base_grid_of_the_pipeline():
    expected = FluxPipeline._prepare_latent_image_ids(1, 4, 6, "cpu", torch.float32)
    template = FluxPipeline._prepare_latent_image_ids(1, 8, 12, "cpu", torch.float32)
    flux = read_model_info(build("flux"))
    assert torch.equal(adapter_for(flux).ids_for_grid(template, 4, 6), expected)


def test_fusion_is_the_convex_combination():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(ds.fuse(a, b, 0.25), 0.75 * a + 0.25 * b)


# -- inside the pipelines: the hooked prediction equals a loop over sub-lattices --------------------------
def _reference_weight(pipe, family_name, timestep) -> float:
    info = get_attachment(pipe).info
    t = float(timestep) / info.family.timestep_input_scale
    if family_name in ("sd15", "sd21", "sdxl"):  # SD's own betas: DemoFusion's t as it is
        return _cosf(t)
    return schedules.cosine_factor(pipe.scheduler, info.prediction_type, t)  # SNR match (test_skip_residual)


def _loop_prediction(pipe, family_name, arguments, size, strides, sigma):
    """Each sub-lattice on its own through the class's unhooked forward, with base-grid Flux ids."""
    denoiser = get_attachment(pipe).denoiser
    forward = type(denoiser).forward
    flux = family_name == "flux"
    name = "hidden_states" if "hidden_states" in arguments else "sample"
    lat = size // 8
    sample = arguments[name]
    spatial = latents.unpack(sample, lat, lat, 2) if flux else sample
    blurred = _blur_2d(spatial.float(), strides, sigma)
    multiple = 2 if family_name in ("flux", "sd3", "pixart") else 1
    padded = math.ceil(lat / (strides[0] * multiple)) * strides[0] * multiple
    blurred = F.pad(blurred, (0, padded - lat, 0, padded - lat), mode="replicate")
    pieces = {}
    sub = padded // strides[0]
    for i in range(strides[0]):
        for j in range(strides[1]):
            x = blurred[:, :, i::strides[0], j::strides[1]]
            kwargs = {k: v for k, v in arguments.items() if k != name}
            if flux:
                x = latents.pack(x, 2)
                kwargs["img_ids"] = FluxPipeline._prepare_latent_image_ids(1, sub // 2, sub // 2, "cpu", torch.float32)
            out = forward(denoiser, **{name: x}, **kwargs)
            out = out[0] if isinstance(out, tuple) else out.sample
            pieces[(i, j)] = latents.unpack(out, sub, sub, 2) if flux else out
    channels = pieces[(0, 0)].shape[1]
    merged = torch.zeros(sample.shape[0], channels, padded, padded)
    for (i, j), out in pieces.items():
        merged[:, :, i::strides[0], j::strides[1]] = out.float()
    merged = merged[:, :, :lat, :lat]
    return latents.pack(merged, 2) if flux else merged


class _Calls:
    """The arguments and (hooked) output of every denoiser call."""

    def __init__(self, pipe):
        self.calls = []
        denoiser = get_attachment(pipe).denoiser
        signature = inspect.signature(type(denoiser).forward)

        def after(module, args, kwargs, output):
            bound = signature.bind_partial(module, *args, **kwargs).arguments
            bound.pop("self")
            self.calls.append((dict(bound), (output[0] if isinstance(output, tuple) else output.sample).clone()))

        self.handle = denoiser.register_forward_hook(after, with_kwargs=True)


def _unhooked(pipe, arguments) -> torch.Tensor:
    denoiser = get_attachment(pipe).denoiser
    raw = type(denoiser).forward(denoiser, **arguments)
    return (raw[0] if isinstance(raw, tuple) else raw.sample).float()


def _splittable(name: str) -> bool:
    family = next(f for f in hires.families.FAMILIES if f.name == name)
    return family.layout.sub_grids_refused is None and not family.attention_masked


SPLITTABLE = [f for f in tiny_models.FAMILY_NAMES if _splittable(f)]
# The loop reference below builds Flux.1's 3-axis ids and expects one denoiser call a step: Flux.2's
# 4-axis ids and Klein's true CFG (two calls a step) are covered by the surface tests only.
LOOP_CHECKED = [f for f in SPLITTABLE if f not in ("flux2", "flux2_klein")]
REFUSED = [f for f in tiny_models.FAMILY_NAMES if not _splittable(f)]


@pytest.mark.parametrize("name", REFUSED)
def test_families_without_splittable_positions_are_refused_by_name(name):
    pipe = tiny_models.build(name)
    with pytest.raises(ValueError, match=f"DilatedSamplingConfig: {name}.*disable dilated_sampling"):
        hires.apply(pipe, hires.HiresConfig(dilated_sampling=hires.DilatedSamplingConfig(enabled=True)))
    assert not hires.is_applied(pipe)


@pytest.mark.parametrize("size", [128, 112])
@pytest.mark.parametrize("family", LOOP_CHECKED)
def test_hooked_prediction_equals_the_sub_lattice_loop(family, size):
    if size == 112 and family not in ("sd15", "flux"):
        pytest.skip("the padded side is checked on one UNet and the packed DiT")
    pipe = build(family)
    hires.apply(pipe, hires.HiresConfig(dilated_sampling=DS(enabled=True, sigma=0.8)))
    recorded = _Calls(pipe)
    generate(pipe, family, size, steps=3, seed=0)
    recorded.handle.remove()
    notes = hires.last_call(pipe).notes["log.dilated_sampling"]
    assert notes["strides"] == (2, 2) and len(recorded.calls) == 3 == len(notes["weights"])
    moved = 0
    for (arguments, output), weight in zip(recorded.calls, notes["weights"]):
        cosine = _reference_weight(pipe, family, float(torch.as_tensor(arguments["timestep"]).flatten()[0]))
        assert weight == pytest.approx(cosine, abs=1e-6)
        with torch.no_grad():
            full = _unhooked(pipe, arguments)
            dilated = _loop_prediction(pipe, family, arguments, size, (2, 2), 0.8 * (0.99 * cosine + 0.01))
        expected = cosine * dilated + (1 - cosine) * full
        assert output.shape == expected.shape
        assert torch.allclose(output.float(), expected, atol=1e-4), float((output - expected).abs().max())
        moved += not torch.allclose(full, expected, atol=1e-3)
    assert moved  # the dilated pass weighed in


@pytest.mark.parametrize("family", SPLITTABLE)
def test_every_family_changes_the_image_above_the_base_and_is_seeded(family):
    pipe = build(family)
    plain = generate(pipe, family, 128, steps=3, seed=1)
    hires.apply(pipe, hires.HiresConfig(dilated_sampling=DS(enabled=True)))
    image = generate(pipe, family, 128, steps=3, seed=1)
    assert not torch.equal(image, plain)
    assert torch.equal(generate(pipe, family, 128, steps=3, seed=1), image)
    assert len(hires.last_call(pipe).notes["log.dilated_sampling"]["weights"]) >= 3


def test_non_square_request_splits_one_side_and_max_batch_splits_the_call():
    pipe = build("sd15")
    hires.apply(pipe, hires.HiresConfig(dilated_sampling=DS(enabled=True)))
    one = generate(pipe, "sd15", (128, 64), steps=3, seed=0)
    assert hires.last_call(pipe).notes["log.dilated_sampling"]["strides"] == (2, 1)
    hires.apply(pipe, hires.HiresConfig(dilated_sampling=DS(enabled=True, max_batch=1)))
    chunked = generate(pipe, "sd15", (128, 64), steps=3, seed=0)
    assert torch.allclose(one, chunked, atol=1e-5)


def test_composes_with_structure_guidance_and_skip_residual():
    pipe = build("flux")
    config = hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True, renoise=0.7),
                               skip_residual=hires.SkipResidualConfig(enabled=True, exponent=2.0),
                               dilated_sampling=DS(enabled=True))
    hires.apply(pipe, config)
    image = generate(pipe, "flux", 128, steps=4, seed=0)
    assert hires.last_call(pipe).notes["log.dilated_sampling"]["strides"] == (2, 2)  # the 128 px stage
    from hires.techniques.structure_guidance import guidance as progressive
    from hires.techniques.skip_residual import blend as skip_residual

    assert len(progressive.last_run(pipe)) == 2 and skip_residual.last_run(pipe)
    assert torch.isfinite(image).all()


# -- errors and bit-identity ------------------------------------------------------------------------------
def test_errors_name_the_option():
    with pytest.raises(ValueError, match="fusion_exponent=0"):
        DS(enabled=True, fusion_exponent=0)
    with pytest.raises(ValueError, match="sigma=-1"):
        DS(enabled=True, sigma=-1)
    with pytest.raises(ValueError, match="max_batch=0"):
        DS(enabled=True, max_batch=0)
    with pytest.raises(TypeError, match="max_batch"):
        DS(enabled=True, max_batch=2.5)
    info = hires.model_info(build("flux"))
    no_axes = dataclasses.replace(info, family=dataclasses.replace(
        info.family, layout=dataclasses.replace(info.family.layout, id_axes=())))
    with pytest.raises(ValueError, match="id_axes"):
        DS(enabled=True).validate_for(no_axes)


def test_control_residuals_are_refused(monkeypatch):
    pipe = build("sd15")
    hires.apply(pipe, hires.HiresConfig(dilated_sampling=DS(enabled=True)))
    unet = pipe.unet
    forward = unet.forward

    def with_residuals(sample, timestep, encoder_hidden_states, **kwargs):
        kwargs["mid_block_additional_residual"] = torch.zeros(sample.shape[0], 32, 8, 8)
        return forward(sample, timestep, encoder_hidden_states, **kwargs)

    monkeypatch.setattr(unet, "forward", with_residuals)
    with pytest.raises(ValueError, match="ControlNet"):
        generate(pipe, "sd15", 128, steps=1, seed=0)


@pytest.mark.parametrize("family", SPLITTABLE)
def test_off_at_base_size_and_removed_are_bit_identical(family):
    pipe = build(family)
    plain_base = generate(pipe, family, 64, steps=3, seed=4)
    plain = generate(pipe, family, 128, steps=3, seed=4)
    hires.apply(pipe, hires.HiresConfig(dilated_sampling=DS(enabled=False)))
    assert torch.equal(generate(pipe, family, 128, steps=3, seed=4), plain)
    hires.apply(pipe, hires.HiresConfig(dilated_sampling=DS(enabled=True)))
    assert torch.equal(generate(pipe, family, 64, steps=3, seed=4), plain_base)  # strides (1, 1): nothing to do
    generate(pipe, family, 128, steps=3, seed=4)
    hires.remove(pipe)
    assert torch.equal(generate(pipe, family, 128, steps=3, seed=4), plain)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    registry = getattr(denoiser, "_diffusers_hook", None)
    assert registry is None or not any(name.startswith("hires.") for name in registry.hooks)


# -- local windows (MultiDiffusion) ---------------------------------------------------------------------
def test_windows_cover_the_latent_with_bounded_jitter():
    generator = torch.Generator().manual_seed(0)
    for size, window, fraction in (((32, 32), (8, 8), 0.5), ((24, 40), (8, 8), 0.25), ((10, 16), (8, 8), 0.5),
                                   ((8, 20), (8, 8), 1.0)):
        boxes = ds.window_boxes(size, window, fraction, generator)
        cover = torch.zeros(size)
        for top, left in boxes:
            assert 0 <= top <= size[0] - window[0] and 0 <= left <= size[1] - window[1]
            cover[top:top + window[0], left:left + window[1]] += 1
        assert cover.min() >= 1, (size, boxes)
    for length, window, stride in ((32, 8, 4), (40, 8, 2), (10, 8, 4), (20, 8, 8), (8, 8, 4)):
        plain = ds._axis_starts(length, window, stride, 0, generator)
        assert plain == sorted({min(k * stride, length - window) for k in range(64)})
        jitter = (window - stride) // 4
        jittered = ds._axis_starts(length, window, stride, jitter, generator)
        assert len(jittered) == len(plain) and jittered[0] == 0 and jittered[-1] == length - window
        assert all(abs(a - b) <= jitter for a, b in zip(jittered, plain))
    assert ds.window_boxes((8, 8), (8, 8), 0.5, generator) == ((0, 0),)


def test_window_average_is_the_mean_of_covering_windows():
    x = torch.randn(2, 3, 12, 14)
    boxes = ((0, 0), (0, 6), (4, 0), (4, 6), (2, 3))
    crops = ds.gather_windows(x, boxes, (8, 8))
    assert torch.equal(crops[1 * 5 + 4], x[1, :, 2:10, 3:11])
    assert torch.allclose(ds.average_windows(crops, boxes, (8, 8), (12, 14)), x, atol=1e-6)
    predictions = torch.randn_like(crops)
    expected = torch.zeros_like(x)
    for b in range(2):
        for i in range(12):
            for j in range(14):
                values = [predictions[b * 5 + k, :, i - t, j - c] for k, (t, c) in enumerate(boxes)
                          if t <= i < t + 8 and c <= j < c + 8]
                expected[b, :, i, j] = torch.stack(values).mean(0)
    assert torch.allclose(ds.average_windows(predictions, boxes, (8, 8), (12, 14)), expected, atol=1e-6)


def _loop_windows(pipe, family_name, arguments, size, boxes):
    denoiser = get_attachment(pipe).denoiser
    forward = type(denoiser).forward
    flux = family_name == "flux"
    name = "hidden_states" if "hidden_states" in arguments else "sample"
    lat = size // 8
    sample = arguments[name]
    spatial = latents.unpack(sample, lat, lat, 2) if flux else sample
    value, cover = None, torch.zeros(1, 1, lat, lat)
    for top, left in boxes:
        x = spatial[:, :, top:top + 8, left:left + 8]
        kwargs = {k: v for k, v in arguments.items() if k != name}
        if flux:
            x = latents.pack(x, 2)
            kwargs["img_ids"] = FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
        out = forward(denoiser, **{name: x}, **kwargs)
        out = (out[0] if isinstance(out, tuple) else out.sample).float()
        out = latents.unpack(out, 8, 8, 2) if flux else out
        if value is None:
            value = torch.zeros(out.shape[0], out.shape[1], lat, lat)
        value[:, :, top:top + 8, left:left + 8] += out
        cover[:, :, top:top + 8, left:left + 8] += 1
    merged = value / cover
    return latents.pack(merged, 2) if flux else merged


@pytest.mark.parametrize("family_name", ["sd15", "sdxl", "sd3", "flux"])
def test_local_windows_equal_the_window_loop_fused_with_the_sub_lattices(family_name):
    pipe = build(family_name)
    hires.apply(pipe, hires.HiresConfig(dilated_sampling=DS(enabled=True, local_windows=True, sigma=0.8)))
    recorded = _Calls(pipe)
    generate(pipe, family_name, 128, steps=3, seed=0)
    recorded.handle.remove()
    notes = hires.last_call(pipe).notes["log.dilated_sampling"]
    windows = notes["windows"]
    assert len(windows) == 3 and len(windows[0]) == 9  # 16 latent, windows of 8 at stride 4: 3 x 3
    assert len(set(windows)) > 1  # the jitter moves between steps
    local_weighed = 0
    for (arguments, output), boxes in zip(recorded.calls, windows):
        cosine = _reference_weight(pipe, family_name, float(torch.as_tensor(arguments["timestep"]).flatten()[0]))
        with torch.no_grad():
            local = _loop_windows(pipe, family_name, arguments, 128, boxes)
            dilated = _loop_prediction(pipe, family_name, arguments, 128, (2, 2), 0.8 * (0.99 * cosine + 0.01))
        expected = cosine * dilated + (1 - cosine) * local
        assert torch.allclose(output.float(), expected, atol=1e-4), float((output - expected).abs().max())
        local_weighed += cosine < 0.9
    assert local_weighed


def test_local_windows_run_between_strides_and_are_seeded():
    pipe = build("sd15")
    plain = generate(pipe, "sd15", 80, steps=3, seed=5)  # 1.25x per side: stride 1, 2 x 2 windows
    hires.apply(pipe, hires.HiresConfig(dilated_sampling=DS(enabled=True)))
    assert torch.equal(generate(pipe, "sd15", 80, steps=3, seed=5), plain)
    hires.apply(pipe, hires.HiresConfig(dilated_sampling=DS(enabled=True, local_windows=True)))
    image = generate(pipe, "sd15", 80, steps=3, seed=5)
    notes = hires.last_call(pipe).notes["log.dilated_sampling"]
    assert notes["strides"] == (1, 1) and notes["weights"] == () and notes["windows"]
    assert not torch.equal(image, plain)
    assert torch.equal(generate(pipe, "sd15", 80, steps=3, seed=5), image)
    with pytest.raises(ValueError, match="window_stride=0"):
        DS(enabled=True, window_stride=0)


def test_hooks_that_read_the_call_size_see_the_sub_lattice_size():
    pipe = build("flux")
    hires.apply(pipe, hires.HiresConfig(dilated_sampling=DS(enabled=True),
                                        positions=hires.PositionConfig(enabled=True)))
    attachment = get_attachment(pipe)
    seen = []
    handle = pipe.transformer.pos_embed.register_forward_pre_hook(
        lambda module, args: seen.append((attachment.state.height, attachment.state.width, args[0].shape[0])))
    image = generate(pipe, "flux", 128, steps=2, seed=0)
    handle.remove()
    # per step: the full-size call (8 x 8 tokens, YaRN-scaled) and the sub-lattice call (4 x 4, the base)
    assert seen == [(128, 128, 16 + 64), (64, 64, 16 + 16)] * 2  # 16 text tokens first
    assert hires.last_call(pipe).notes["log.positions.rope"]  # the full-size call still got its RoPE scaling
    assert (hires.last_call(pipe).height, hires.last_call(pipe).width) == (128, 128)
    assert torch.isfinite(image).all()
