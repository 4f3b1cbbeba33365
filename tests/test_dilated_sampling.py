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
from hires.runtime import get_attachment
from hires.sampling import schedules, stages
from hires.techniques import dilated_sampling as ds
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
    assert torch.equal(ds.grid_ids(template, 4, 6, (None, "height", "width")), expected)


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
    spatial = stages.unpack(sample, lat, lat, 2) if flux else sample
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
                x = stages.pack(x, 2)
                kwargs["img_ids"] = FluxPipeline._prepare_latent_image_ids(1, sub // 2, sub // 2, "cpu", torch.float32)
            out = forward(denoiser, **{name: x}, **kwargs)
            out = out[0] if isinstance(out, tuple) else out.sample
            pieces[(i, j)] = stages.unpack(out, sub, sub, 2) if flux else out
    channels = pieces[(0, 0)].shape[1]
    merged = torch.zeros(sample.shape[0], channels, padded, padded)
    for (i, j), out in pieces.items():
        merged[:, :, i::strides[0], j::strides[1]] = out.float()
    merged = merged[:, :, :lat, :lat]
    return stages.pack(merged, 2) if flux else merged


class _FirstCall:
    """The arguments and (hooked) output of the denoiser's first call."""

    def __init__(self, pipe):
        self.arguments = None
        self.output = None
        denoiser = get_attachment(pipe).denoiser
        signature = inspect.signature(type(denoiser).forward)

        def after(module, args, kwargs, output):
            if self.arguments is None:
                bound = signature.bind_partial(module, *args, **kwargs).arguments
                bound.pop("self")
                self.arguments = dict(bound)
                self.output = (output[0] if isinstance(output, tuple) else output.sample).clone()

        self.handle = denoiser.register_forward_hook(after, with_kwargs=True)


@pytest.mark.parametrize("size", [128, 112])
def test_hooked_prediction_equals_the_sub_lattice_loop(family, size):
    if size == 112 and family not in ("sd15", "flux"):
        pytest.skip("the padded side is checked on one UNet and the packed DiT")
    pipe = build(family)
    hires.apply(pipe, hires.HiresConfig(dilated_sampling=DS(enabled=True, sigma=0.8)))
    first = _FirstCall(pipe)
    generate(pipe, family, size, steps=3, seed=0)
    first.handle.remove()
    notes = hires.last_call(pipe).notes["log.dilated_sampling"]
    assert notes["strides"] == (2, 2)
    arguments = first.arguments
    timestep = float(torch.as_tensor(arguments["timestep"]).flatten()[0])
    cosine = _reference_weight(pipe, family, timestep)
    assert notes["weights"][0] == pytest.approx(cosine, abs=1e-6)
    denoiser = get_attachment(pipe).denoiser
    with torch.no_grad():
        raw = type(denoiser).forward(denoiser, **arguments)
        full = (raw[0] if isinstance(raw, tuple) else raw.sample).float()
        dilated = _loop_prediction(pipe, family, arguments, size, (2, 2), 0.8 * (0.99 * cosine + 0.01))
    expected = cosine * dilated + (1 - cosine) * full
    assert first.output.shape == expected.shape
    assert torch.allclose(first.output.float(), expected, atol=1e-4), float((first.output - expected).abs().max())
    assert cosine > 0.5 and not torch.allclose(full, expected, atol=1e-3)  # the dilated pass weighed in


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
    from hires.sampling import progressive, skip_residual

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
    no_axes = dataclasses.replace(info, family=dataclasses.replace(info.family, rope_axis_sides=()))
    with pytest.raises(ValueError, match="rope_axis_sides"):
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
