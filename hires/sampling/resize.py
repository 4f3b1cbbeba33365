"""Resizing and sharpening latents and images: bicubic / bilinear / Lanczos-3, the unsharp mask, and the
anti-ringing clamp of an upscaled image to its source's local range (float32 math, cast back)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LANCZOS_TAPS = 3


def _lanczos_matrix(n_in: int, n_out: int, device) -> torch.Tensor:
    """(n_out, n_in) Lanczos-3 resampling weights (half-pixel centres, edge samples repeated)."""
    scale = n_in / n_out
    support = LANCZOS_TAPS * max(scale, 1.0)  # widen when shrinking, so it also antialiases
    centres = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5
    offsets = torch.arange(-math.ceil(support), math.ceil(support) + 1, dtype=torch.float64)
    taps = torch.floor(centres)[:, None] + offsets[None, :]
    x = (centres[:, None] - taps) / max(scale, 1.0)
    weights = torch.sinc(x) * torch.sinc(x / LANCZOS_TAPS) * (x.abs() < LANCZOS_TAPS)
    weights = weights / weights.sum(dim=1, keepdim=True)
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    matrix.scatter_add_(1, taps.clamp(0, n_in - 1).long(), weights)
    return matrix.to(device=device, dtype=torch.float32)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize (B, C, H, W) to `size` in float32 and cast back: bicubic / bilinear / lanczos."""
    work = x.float()
    if mode in ("bicubic", "bilinear"):
        out = F.interpolate(work, size=size, mode=mode, align_corners=False)
    elif mode == "lanczos":
        rows = _lanczos_matrix(x.shape[-2], size[0], x.device)
        cols = _lanczos_matrix(x.shape[-1], size[1], x.device)
        out = torch.einsum("oh,bchw,pw->bcop", rows, work, cols)
    else:
        raise ValueError(f"mode={mode!r} is not a resize mode; use 'bicubic', 'bilinear' or 'lanczos'")
    return out.to(x.dtype)


def clamp_to_source_range(upscaled: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Clamp each upscaled pixel to the min/max of the 3x3 source pixels around the one it falls in.

    Bicubic / Lanczos resampling and the unsharp mask overshoot at edges (a bright rim on the dark
    side, a dark one on the bright side); the guide then teaches the model a halo. Inside smooth
    regions the range is wide and nothing changes."""
    src = source.float()
    padded = F.pad(src, (1, 1, 1, 1), mode="replicate")
    high = F.max_pool2d(padded, 3, stride=1)
    low = -F.max_pool2d(-padded, 3, stride=1)
    size = upscaled.shape[-2:]
    high, low = F.interpolate(high, size=size,
                              mode="nearest-exact"), F.interpolate(low, size=size, mode="nearest-exact")
    return torch.minimum(torch.maximum(upscaled.float(), low), high).to(upscaled.dtype)


def gaussian_kernel(sigma: float, size: int = 3) -> torch.Tensor:
    half = (size - 1) / 2
    k = torch.exp(-((torch.arange(size, dtype=torch.float64) - half) ** 2) / (2 * sigma**2))
    return (k / k.sum()).float()


def unsharp_mask(x: torch.Tensor, alpha: float, sigma: float, size: int = 3) -> torch.Tensor:
    """(1 + alpha) x - alpha blur(x), blur a separable Gaussian with reflect padding (float32)."""
    if alpha == 0:
        return x
    work = x.float()
    channels = work.shape[1]
    k = gaussian_kernel(sigma, size).to(work.device)
    pad = size // 2
    blurred = F.pad(work, (pad, pad, pad, pad), mode="reflect")
    blurred = F.conv2d(blurred, k.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    blurred = F.conv2d(blurred, k.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
    return ((1 + alpha) * work - alpha * blurred).to(x.dtype)
