"""Between a pipeline's latent space (what its denoiser sees, unpacked to (B, C, h, w)) and what its
VAE decodes, as the family's pipeline converts (`hires.families.LatentLayout`'s convention fields): a
VAE config field counts only where the pipeline's own code reads it.

- scaling only (SD 1.x/2.x, PixArt; SDXL without per-channel statistics): z = v * scaling_factor;
- with the shift (SD3, Flux, Chroma, Z-Image): z = (v - shift_factor) * scaling_factor;
- per-channel statistics: z = (v - mean) * scaling_factor / std (SDXL, when the VAE config has
  latents_mean / latents_std) or z = (v - mean) / std (Qwen-Image's AutoencoderKLQwenImage);
- Flux.2 (AutoencoderKLFlux2): the pipeline patchifies the VAE latent 2x2 (channel c*4 + 2*row + col,
  the order `hires.sampling.stages.pack` uses) and normalises each of those channels by the VAE's
  batch-norm running statistics; z is that normalised latent, un-patchified.
"""

from __future__ import annotations

import contextlib

import torch

from ..families import vae_kind


def _patchify(z: torch.Tensor, patch: int) -> torch.Tensor:
    b, c, h, w = z.shape
    z = z.view(b, c, h // patch, patch, w // patch, patch).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * patch * patch, h // patch, w // patch)


def _unpatchify(z: torch.Tensor, patch: int) -> torch.Tensor:
    b, c, h, w = z.shape
    z = z.view(b, c // (patch * patch), patch, patch, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c // (patch * patch), h * patch, w * patch)


def _batch_norm_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bn = vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, torch.float32)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).to(like.device, torch.float32) + vae.config.batch_norm_eps)
    return mean, std


def _patch(vae) -> int:
    side = vae.config.get("patch_size", (2, 2))
    return int(side[0]) if isinstance(side, (tuple, list)) else int(side)


def _channel_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is None or std is None:
        return None
    mean = torch.tensor(mean, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)
    return mean, std


def _affine(convention, vae, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(offset, gain) with v = z * gain + offset, for the conventions that are affine per channel."""
    config = vae.config
    scaling = 1.0 if convention.channel_statistics and not convention.statistics_scaled else config.scaling_factor
    channels = _channel_statistics(vae, like) if convention.channel_statistics else None
    if channels is not None:
        mean, std = channels
        return mean, std / scaling
    shift = (config.get("shift_factor", None) or 0.0) if convention.shift else 0.0
    return shift, 1.0 / scaling


def to_vae(convention, vae, z: torch.Tensor) -> torch.Tensor:
    """The VAE's own latent (float32) of a pipeline latent `z` (`convention`: the family's LatentLayout)."""
    z = z.float()
    if convention.batch_norm_patches:
        patch = _patch(vae)
        mean, std = _batch_norm_statistics(vae, z)
        return _unpatchify(_patchify(z, patch) * std + mean, patch)
    offset, gain = _affine(convention, vae, z)
    return z * gain + offset


def from_vae(convention, vae, latent: torch.Tensor) -> torch.Tensor:
    """The pipeline latent (float32) of the VAE's own latent (inverse of `to_vae`)."""
    latent = latent.float()
    if convention.batch_norm_patches:
        patch = _patch(vae)
        mean, std = _batch_norm_statistics(vae, latent)
        return _unpatchify((_patchify(latent, patch) - mean) / std, patch)
    offset, gain = _affine(convention, vae, latent)
    return (latent - offset) / gain


# -- running the VAE as the pipeline does ------------------------------------------------------------
def needs_upcast(vae) -> bool:
    """True where the VAE asks to run in float32 (`config.force_upcast`) but sits in float16: the
    stock SDXL VAE overflows to NaN in float16, which is why diffusers' pipelines upcast it."""
    return bool(getattr(vae.config, "force_upcast", False)) and vae.dtype == torch.float16


@contextlib.contextmanager
def vae_precision(vae):
    """Run the VAE in float32 inside the block where `needs_upcast(vae)`, as diffusers' pipelines do
    around their decode, and put it back in float16 after (exact: float16 values survive float32)."""
    if not needs_upcast(vae):
        yield vae.dtype
        return
    vae.to(torch.float32)
    try:
        yield torch.float32
    finally:
        vae.to(torch.float16)


class VAECodec:
    """Decode / encode between the denoiser's latent space and pixels in [-1, 1], in float32 out, in the
    latent convention of the family's pipeline (`convention`: its `hires.families.LatentLayout`); a VAE with
    a frame axis (`hires.families.vae_kind`) gets and gives one frame."""

    def __init__(self, pipe, convention):
        self.pipe = pipe
        self.convention = convention

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        with vae_precision(vae) as dtype:
            x = to_vae(self.convention, vae, z).to(dtype)
            if vae_kind(vae).frame_axis:
                return vae.decode(x[:, :, None], return_dict=False)[0][:, :, 0].float()
            return vae.decode(x, return_dict=False)[0].float()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        with vae_precision(vae) as dtype:
            if vae_kind(vae).frame_axis:
                x = vae.encode(image.to(dtype)[:, :, None]).latent_dist.mode()[:, :, 0]
            else:
                x = vae.encode(image.to(dtype)).latent_dist.mode()
        return from_vae(self.convention, vae, x)
