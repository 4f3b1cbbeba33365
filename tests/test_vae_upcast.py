"""`force_upcast`: where hires runs the VAE itself (structure guidance's decode/encode, the tiled
decode/encode), a float16 VAE whose config asks for float32 runs in float32, as diffusers' SDXL
pipeline does around its own decode. The VAE here overflows float16 by construction."""

import pytest
import torch

import hires
import tiny_models
from hires.families import LatentLayout
from hires.sampling import latent_space
from hires.sampling.latent_space import VAECodec


def overflowing_vae(force_upcast: bool):
    """A tiny float16 VAE whose first convolutions overflow float16 (|activations| > 65504)."""
    vae = tiny_models.make_vae(force_upcast=force_upcast)
    with torch.no_grad():
        for conv in (vae.decoder.conv_in, vae.encoder.conv_in):
            conv.weight.mul_(60000 / conv.weight.abs().max())  # still representable in float16
    return vae.half()


def latent_and_image():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 8, 8, generator=generator), torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1


class _Pipe:
    def __init__(self, vae):
        self.vae = vae


@pytest.mark.parametrize("force_upcast", [True, False])
def test_structure_guidance_codec_follows_force_upcast(force_upcast):
    vae = overflowing_vae(force_upcast)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    codec = VAECodec(_Pipe(vae), LatentLayout())
    z, image = latent_and_image()
    with torch.no_grad():
        finite = torch.isfinite(codec.decode(z)).all() and torch.isfinite(codec.encode(image)).all()
    assert bool(finite) == force_upcast  # without the flag the same VAE gives inf/NaN: the test can fail
    assert vae.dtype == torch.float16
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())


@pytest.mark.parametrize("force_upcast", [True, False])
def test_tiled_decode_and_encode_follow_force_upcast(force_upcast):
    pipe = tiny_models.build("sdxl")
    pipe.vae = overflowing_vae(force_upcast)
    hires.apply(pipe, hires.HiresConfig(vae_tiling=hires.VAETilingConfig(enabled=True, mode="always", tile_size=4)))
    z, image = latent_and_image()
    with torch.no_grad():
        decoded = pipe.vae.decode(z.half()).sample
        encoded = pipe.vae.encode(image.half()).latent_dist.mode()
    assert decoded.dtype == encoded.dtype == torch.float16
    assert bool(torch.isfinite(decoded).all() and torch.isfinite(encoded).all()) == force_upcast
    assert pipe.vae.dtype == torch.float16


def test_needs_upcast_only_for_float16_with_the_flag():
    assert latent_space.needs_upcast(overflowing_vae(True))
    assert not latent_space.needs_upcast(overflowing_vae(False))
    assert not latent_space.needs_upcast(overflowing_vae(True).float())


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_sdxl_pipeline_with_structure_guidance_and_tiling_stays_finite(space):
    """The whole call at 2x: the stages' pixel round trips, the tiled final decode (the pipeline
    upcasts that one itself, as plain diffusers does)."""
    pipe = tiny_models.build("sdxl")
    pipe.vae = overflowing_vae(True)
    plain = tiny_models.generate(pipe, "sdxl", size=64, steps=3)
    assert torch.isfinite(plain).all()  # diffusers' own upcast at the base size
    hires.apply(pipe, hires.HiresConfig(
        structure_guidance=hires.StructureGuidanceConfig(enabled=True, space=space),
        vae_tiling=hires.VAETilingConfig(enabled=True, mode="always", tile_size=8)))
    images = tiny_models.generate(pipe, "sdxl", size=128, steps=3)
    assert images.shape[-2:] == (128, 128) and torch.isfinite(images).all()
    assert pipe.vae.dtype == torch.float16
