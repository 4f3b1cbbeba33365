"""Dispersed convolution (ScaleCrafter): enlarge a pretrained small kernel by a fixed linear map.

A 3x3 kernel k becomes a 5x5 kernel K = R k, with one R (25 x 9) for every layer and channel. R is
the least-squares solution of two wishes, written for a symbolic input x of side `input_size`:

- structure level: convolving the input upsampled bilinearly by `scale` (corner-aligned, side
  scale*(n-1)+1) with K should give the upsampled output of k on x;
- pixel level: K and k applied to x itself should agree, weighted by `eta` (the rows are multiplied
  by eta, so the effective weight of the squared residual is eta**2, as in the official solver).

Both sides are linear in the kernels for every input pixel, so asking them to hold for every input
gives one stacked linear system in K per entry of k; its least-squares solution column by column is
R. With the official call (3, 5, 3, 2, eta=0.05) an all-ones 3x3 kernel maps to a 5x5 kernel summing
to 9.752, as the released `R20to1_new` does.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _one_hot_kernels(side: int) -> torch.Tensor:
    return torch.eye(side * side, dtype=torch.float64).reshape(side * side, 1, side, side)


def _as_rows(maps: torch.Tensor) -> torch.Tensor:
    """(input basis j, kernel basis p, h, w) -> rows (j, h, w), one column per kernel entry p."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def dispersion_system(small: int = 3, large: int = 5, input_size: int = 3, scale: int = 2,
                      eta: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked system A K = B k (float64): A is (rows, large**2), B is (rows, small**2)."""
    upsampled_side = scale * (input_size - 1) + 1
    inputs = _one_hot_kernels(input_size)  # every input pixel on its own

    def upsample(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, size=(upsampled_side, upsampled_side), mode="bilinear", align_corners=True)

    def convolve(t: torch.Tensor, side: int) -> torch.Tensor:  # zero-padded "same" output
        return F.conv2d(t, _one_hot_kernels(side), padding=side // 2)

    structure_large = _as_rows(convolve(upsample(inputs), large))
    structure_small = _as_rows(upsample(convolve(inputs, small)))
    pixel_large = _as_rows(convolve(inputs, large))
    pixel_small = _as_rows(convolve(inputs, small))
    a = torch.cat([structure_large, eta * pixel_large])
    b = torch.cat([structure_small, eta * pixel_small])
    return a, b


@functools.lru_cache(maxsize=None)
def _dispersion_map(small: int, large: int, input_size: int, scale: int, eta: float) -> torch.Tensor:
    a, b = dispersion_system(small, large, input_size, scale, eta)
    return torch.linalg.pinv(a) @ b


def dispersion_map(small: int = 3, large: int = 5, input_size: int = 3, scale: int = 2,
                   eta: float = 0.05) -> torch.Tensor:
    """R (large**2 x small**2, float64): the 5x5 kernel is R @ (3x3 kernel flattened). Cached per shape."""
    for name, value, low in (("small", small, 1), ("large", large, small), ("input_size", input_size, 1),
                             ("scale", scale, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"dispersion_map {name}={value!r} must be an int >= {low}")
    for name, value in (("small", small), ("large", large)):
        if value % 2 == 0:
            raise ValueError(f"dispersion_map {name}={value} must be odd (a centred kernel)")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta < 0:
        raise ValueError(f"dispersion_map eta={eta!r} must be a number >= 0 (weight of the pixel-level term)")
    return _dispersion_map(small, large, input_size, scale, float(eta)).clone()


def disperse_kernel(weight: torch.Tensor, eta: float = 0.05, large: int = 5) -> torch.Tensor:
    """Map conv weights (out, in, k, k) to (out, in, large, large), in float32, cast back."""
    if weight.ndim != 4 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"disperse_kernel weight of shape {tuple(weight.shape)} must be (out, in, k, k)")
    small = weight.shape[-1]
    transform = _dispersion_map(small, large, 3, 2, float(eta)).to(device=weight.device, dtype=torch.float32)
    flat = weight.reshape(-1, small * small).float()
    return (flat @ transform.T).reshape(*weight.shape[:2], large, large).to(weight.dtype)
