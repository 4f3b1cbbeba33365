"""hires' latent codec follows what each family's pipeline does with its VAE, not what the VAE config
holds: SD 1.x/2.x, SDXL and PixArt pipelines never read `shift_factor`, SD3 / Flux / Chroma / Z-Image
do, SDXL reads per-channel statistics when its VAE has them, Qwen-Image reads them unscaled, Flux.2
denormalises 2x2 patches by batch-norm statistics. Each case is checked against the pipeline itself:
the latent its decode receives for the final denoised latents."""

import pytest
import torch

import tiny_models
from hires.families import read_model_info
from hires.sampling import latent_space
from hires.sampling.latents import unpack

SIZE = 64
SHIFT = 0.37  # a shift the pipelines that ignore it must not see


def _with_statistics(pipe, channels: int):
    generator = torch.Generator().manual_seed(3)
    mean = (torch.rand(channels, generator=generator) - 0.5).tolist()
    std = (0.5 + torch.rand(channels, generator=generator)).tolist()
    pipe.vae.register_to_config(latents_mean=mean, latents_std=std)


def _pipeline(family: str, statistics: bool):
    pipe = tiny_models.build(family)
    config = pipe.vae.config
    if "shift_factor" in config:
        pipe.vae.register_to_config(shift_factor=SHIFT)
    if statistics:
        _with_statistics(pipe, config.latent_channels)
    return pipe


def _final_and_decoded(pipe, family: str):
    """The denoised latents as (B, C, h, w) and what the pipeline handed its VAE's decode."""
    final, decoded = [], []
    original = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: (decoded.append(z.detach().clone()), original(z, *a, **k))[1]
    try:
        if family == "pixart":
            calls = {"callback": lambda step, t, latents: final.append(latents.clone()), "callback_steps": 1}
        else:
            def modern(p, step, timestep, kwargs):
                final.append(kwargs["latents"].clone())
                return {}

            calls = {"callback_on_step_end": modern}
        tiny_models.generate(pipe, family, SIZE, steps=2, **calls)
    finally:
        del pipe.vae.decode
    info = read_model_info(pipe)
    latents = final[-1]
    if latents.ndim == 3:  # packed tokens (Flux, Flux.2, Chroma, Qwen-Image)
        side = SIZE // info.latent_factor
        latents = unpack(latents, side, side, info.patch_size)
    vae_latent = decoded[0]
    if vae_latent.ndim == 5:  # Qwen-Image's video VAE: one frame
        vae_latent = vae_latent[:, :, 0]
    return info, latents, vae_latent


CASES = [(family, False) for family in tiny_models.FAMILY_NAMES] + [("sdxl", True), ("sd15", True)]


@pytest.mark.parametrize("family,statistics", CASES)
def test_codec_equals_the_pipelines_own_decode(family, statistics):
    pipe = _pipeline(family, statistics)
    info, z, vae_latent = _final_and_decoded(pipe, family)
    convention = info.family.layout
    torch.testing.assert_close(latent_space.to_vae(convention, pipe.vae, z), vae_latent.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent_space.from_vae(convention, pipe.vae, vae_latent),
                               z.float(), rtol=1e-4, atol=1e-5)


def test_sd_codec_ignores_the_shift_and_sdxl_reads_statistics_with_the_scale():
    """Independent formulation, by hand: SD 1.5's pipeline multiplies by scaling_factor only; SDXL's maps
    v to (v - mean) * scaling / std; the Flux pipeline to (v - shift) * scaling."""
    v = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sd = _pipeline("sd15", statistics=False)
    s = sd.vae.config.scaling_factor
    assert sd.vae.config.shift_factor == SHIFT
    torch.testing.assert_close(latent_space.from_vae(read_model_info(sd).family.layout, sd.vae, v), v * s)

    xl = _pipeline("sdxl", statistics=True)
    mean = torch.tensor(xl.vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(xl.vae.config.latents_std).view(1, -1, 1, 1)
    s = xl.vae.config.scaling_factor
    torch.testing.assert_close(latent_space.from_vae(read_model_info(xl).family.layout, xl.vae, v),
                               (v - mean) * s / std)

    flux = _pipeline("flux", statistics=False)
    s = flux.vae.config.scaling_factor
    torch.testing.assert_close(latent_space.from_vae(read_model_info(flux).family.layout, flux.vae, v),
                               (v - SHIFT) * s)
