"""Between a pipeline's latent space (what its denoiser sees, unpacked to (B, C, h, w)) and what its
VAE decodes, for every supported family.

- AutoencoderKL families: z = (vae latent - shift_factor) * scaling_factor.
- VAEs with per-channel latents_mean / latents_std (Qwen-Image's AutoencoderKLQwenImage):
  z = (vae latent - mean) / std.
- Flux.2 (AutoencoderKLFlux2): the pipeline patchifies the VAE latent 2x2 (channel c*4 + 2*row + col,
  the order `hires.sampling.stages.pack` uses) and normalises each of those channels by the VAE's
  batch-norm running statistics; z is that normalised latent, un-patchified.
"""

from __future__ import annotations

import torch


def _batch_norm(vae):
    bn = getattr(vae, "bn", None)
    return bn if isinstance(bn, torch.nn.BatchNorm2d) and bn.running_mean is not None else None


def _patchify(z: torch.Tensor, patch: int) -> torch.Tensor:
    b, c, h, w = z.shape
    z = z.view(b, c, h // patch, patch, w // patch, patch).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * patch * patch, h // patch, w // patch)


def _unpatchify(z: torch.Tensor, patch: int) -> torch.Tensor:
    b, c, h, w = z.shape
    z = z.view(b, c // (patch * patch), patch, patch, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c // (patch * patch), h * patch, w * patch)


def _statistics(vae, bn, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def to_vae(vae, z: torch.Tensor) -> torch.Tensor:
    """The VAE's own latent (float32) of a pipeline latent `z`."""
    z = z.float()
    bn = _batch_norm(vae)
    if bn is not None:
        patch = _patch(vae)
        mean, std = _statistics(vae, bn, z)
        return _unpatchify(_patchify(z, patch) * std + mean, patch)
    channels = _channel_statistics(vae, z)
    if channels is not None:
        mean, std = channels
        return z * std + mean
    config = vae.config
    return z / config.scaling_factor + (config.get("shift_factor", None) or 0.0)


def from_vae(vae, latent: torch.Tensor) -> torch.Tensor:
    """The pipeline latent (float32) of the VAE's own latent."""
    latent = latent.float()
    bn = _batch_norm(vae)
    if bn is not None:
        patch = _patch(vae)
        mean, std = _statistics(vae, bn, latent)
        return _unpatchify((_patchify(latent, patch) - mean) / std, patch)
    channels = _channel_statistics(vae, latent)
    if channels is not None:
        mean, std = channels
        return (latent - mean) / std
    config = vae.config
    return (latent - (config.get("shift_factor", None) or 0.0)) * config.scaling_factor
