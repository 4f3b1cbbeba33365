"""Scale fusion (FreeScale): image self-attention above the base size as two branches, fused per layer.

- Local branch: overlapping windows of the layer's base-size token grid, stride half a window; the
  interior windows are shifted by up to 1/8 window (drawn per layer and step from the call's
  generator), the first and last window of each axis stay on the edges so every token is covered;
  each window's queries attend to that window's keys (and all text keys), and outputs are averaged
  where windows overlap. FreeScale pads the grid with zero tokens instead, which then take part in
  the edge windows as keys.
- Global branch: the layer's own full attention ("full"), or FreeScale's fast mode ("dilated"): the
  s_h x s_w interleaved sub-grids (s the layer's integer scale per axis) each attend separately.
- Fusion: out = G(local) + (global - G(global)) over the image tokens, computed as
  global + G(local - global) (G is linear). G is a Gaussian blur over the token grid with kernel side
  2 * ceil(scale) - 1 and sigma 1 (FreeScale's values) and zero padding like FreeScale's conv. FreeScale
  blurs with a 3D kernel that also mixes neighbouring channels; here it blurs the grid only (channel
  order carries no geometry), so the fusion commutes with the layer's output projection and can run
  on the attention call itself.
Text tokens of joint attention (SD3, Flux) keep their global outputs and are keys of every window.

It runs inside hires' attention-processor wrapper (hires.denoiser.attention): the layer's one
torch SDPA call is replaced by the fused computation, so the processors stay the user's own, entropy
scaling composes (its factor scales both branches), and no N x N map is built: every branch is
torch SDPA on the full sequence, on windows or on sub-grids. Active only where a layer's grid
exceeds its base-size grid, so the base size and, with structure guidance, the base stage are untouched.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from ...denoiser.attention import AttentionChange, LayerCall, LayerRewrite, add_attention_change
from .config import ScaleFusionConfig

LOG_FUSION = "log.scale_fusion"


# -- math: pure functions of tensors ------------------------------------------------------------------

def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Normalised 1D Gaussian taps of odd length `size` (float64)."""
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-offsets**2 / (2 * sigma**2))
    return taps / taps.sum()


def blur_kernel_size(grid: tuple[int, int], base_grid: tuple[int, int]) -> int:
    """FreeScale's kernel side 2s - 1, s the layer's scale over its base grid rounded up."""
    scale = max(grid[0] / base_grid[0], grid[1] / base_grid[1])
    return 2 * math.ceil(scale - 1e-9) - 1


def blur_grid(tokens: torch.Tensor, grid: tuple[int, int], size: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of (..., rows*cols, dim) tokens over their row-major grid, zero padding."""
    if size <= 1:
        return tokens
    rows, cols = grid
    lead, dim = tokens.shape[:-2], tokens.shape[-1]
    maps = tokens.reshape(-1, rows, cols, dim).permute(0, 3, 1, 2).reshape(-1, 1, rows, cols)
    taps = gaussian_kernel(size, sigma).to(maps.dtype if maps.is_floating_point() else torch.float32).to(maps.device)
    maps = F.conv2d(maps, taps.view(1, 1, size, 1), padding=(size // 2, 0))
    maps = F.conv2d(maps, taps.view(1, 1, 1, size), padding=(0, size // 2))
    return maps.reshape(-1, dim, rows, cols).permute(0, 2, 3, 1).reshape(*lead, rows * cols, dim)


def window_starts(length: int, window: int, jitter: int = 0, generator: torch.Generator | None = None) -> list[int]:
    """Starts of overlapping windows covering `length` tokens with stride window // 2 (FreeScale's
    layout), interior ones shifted by a draw in [-jitter, jitter] and kept inside the grid."""
    if length <= window:
        return [0]
    stride = max(window // 2, 1)
    count = -(-(length - window) // stride) + 1
    starts = [min(i * stride, length - window) for i in range(count)]
    if jitter > 0 and count > 2:
        shifts = torch.randint(-jitter, jitter + 1, (count - 2,), generator=generator).tolist()
        for i, shift in enumerate(shifts, start=1):
            starts[i] = min(max(starts[i] + shift, 0), length - window)
    return starts


def _image_grid(x: torch.Tensor, start: int, grid: tuple[int, int]) -> torch.Tensor:
    return x[:, :, start:start + grid[0] * grid[1]].unflatten(2, grid)


def _text_part(x: torch.Tensor, start: int, end: int) -> torch.Tensor:
    return torch.cat([x[:, :, :start], x[:, :, end:]], dim=2)


def local_attention(query, key, value, grid, window, row_starts, col_starts, image_start: int = 0,
                    scale: float | None = None, dropout_p: float = 0.0,
                    attend: Callable = F.scaled_dot_product_attention) -> torch.Tensor:
    """Image queries attend within each window (plus every text key); outputs averaged over the
    windows covering a token. Returns the image tokens' outputs, (batch, heads, rows*cols, dim)."""
    batch, heads = query.shape[:2]
    rows, cols = grid
    end = image_start + rows * cols
    q_grid, k_grid, v_grid = (_image_grid(x, image_start, grid) for x in (query, key, value))
    text_k, text_v = _text_part(key, image_start, end), _text_part(value, image_start, end)
    total = value.new_zeros((batch, heads, rows, cols, value.shape[-1]))
    count = value.new_zeros((1, 1, rows, cols, 1))
    wh, ww = window
    for r0 in row_starts:  # one row of windows per attention call bounds the memory
        def windows(x):
            parts = [x[:, :, r0:r0 + wh, c0:c0 + ww].flatten(2, 3) for c0 in col_starts]
            return torch.cat(parts, dim=0)  # (windows * batch, heads, wh * ww, dim)

        q_w, k_w, v_w = windows(q_grid), windows(k_grid), windows(v_grid)
        if text_k.shape[2]:
            repeat = len(col_starts)
            k_w = torch.cat([k_w, text_k.repeat(repeat, 1, 1, 1)], dim=2)
            v_w = torch.cat([v_w, text_v.repeat(repeat, 1, 1, 1)], dim=2)
        out = attend(q_w, k_w, v_w, dropout_p=dropout_p, scale=scale)
        for i, c0 in enumerate(col_starts):
            total[:, :, r0:r0 + wh, c0:c0 + ww] += out[i * batch:(i + 1) * batch].unflatten(2, (wh, ww))
            count[:, :, r0:r0 + wh, c0:c0 + ww] += 1
    return (total / count).flatten(2, 3)


def dilated_attention(query, key, value, grid, dilation, image_start: int = 0, scale: float | None = None,
                      dropout_p: float = 0.0, attend: Callable = F.scaled_dot_product_attention) -> torch.Tensor:
    """FreeScale's fast global branch: each of the s_h x s_w interleaved sub-grids attends to itself
    (plus every text key). Returns the image tokens' outputs."""
    rows, cols = grid
    end = image_start + rows * cols
    q_grid, k_grid, v_grid = (_image_grid(x, image_start, grid) for x in (query, key, value))
    text_k, text_v = _text_part(key, image_start, end), _text_part(value, image_start, end)
    out_grid = value.new_empty((*query.shape[:2], rows, cols, value.shape[-1]))
    for i in range(dilation[0]):
        for j in range(dilation[1]):
            sub = (slice(None), slice(None), slice(i, None, dilation[0]), slice(j, None, dilation[1]))
            q, k, v = (x[sub] for x in (q_grid, k_grid, v_grid))
            shape = q.shape[2:4]
            k = torch.cat([k.flatten(2, 3), text_k], dim=2)
            v = torch.cat([v.flatten(2, 3), text_v], dim=2)
            out_grid[sub] = attend(q.flatten(2, 3), k, v, dropout_p=dropout_p, scale=scale).unflatten(2, shape)
    return out_grid.flatten(2, 3)


def fused_attention(query, key, value, grid, window, row_starts, col_starts, kernel_size: int, sigma: float,
                    dilation: tuple[int, int] | None = None, image_start: int = 0, scale: float | None = None,
                    dropout_p: float = 0.0, attend: Callable = F.scaled_dot_product_attention) -> torch.Tensor:
    """The scale-fused attention of (batch, heads, tokens, dim) tensors (see the module doc)."""
    end = image_start + grid[0] * grid[1]
    full = None
    if dilation is None or image_start > 0 or end < query.shape[2]:
        full = attend(query, key, value, dropout_p=dropout_p, scale=scale)  # text queries stay global
    if dilation is None:
        global_image = full[:, :, image_start:end]
    else:
        global_image = dilated_attention(query, key, value, grid, dilation, image_start, scale, dropout_p, attend)
    local_image = local_attention(query, key, value, grid, window, row_starts, col_starts, image_start, scale,
                                  dropout_p, attend)
    # the low band in float32: fp16 / bf16 attention outputs lose the small local-minus-global difference
    low_band = blur_grid(local_image.float() - global_image.float(), grid, kernel_size, sigma)
    fused = (global_image.float() + low_band).to(global_image.dtype)
    if full is None:
        return fused
    return torch.cat([full[:, :, :image_start], fused, full[:, :, end:]], dim=2)


# -- the layer plan --------------------------------------------------------------------------------

class ScaleFusion(AttentionChange):
    """Plans each self-attention layer's fused call above its base-size grid."""

    owner = "ScaleFusionConfig"

    def __init__(self, config: ScaleFusionConfig):
        self.config = config

    def rewrite(self, call: LayerCall, rewrite: LayerRewrite, state, layer: str) -> LayerRewrite:
        fused = self.plan(call, state, layer)
        return rewrite if fused is None else rewrite.by(self.owner, attend=fused)

    def plan(self, call: LayerCall, state, layer: str) -> Callable | None:
        """The fused attention for this layer and step, or None where its grid fits its base grid."""
        grid, base = call.grid, call.base_grid
        if grid[0] <= base[0] and grid[1] <= base[1]:
            return None
        image_start = call.image_position(self.owner, layer)
        config = self.config
        window = tuple(min(config.window or b, g) for g, b in zip(grid, base))
        generator = state.generator(f"scale_fusion.{layer}.{max(state.step_index, 0)}")
        jitter = [w // 8 if config.jitter else 0 for w in window]
        row_starts = window_starts(grid[0], window[0], jitter[0], generator)
        col_starts = window_starts(grid[1], window[1], jitter[1], generator)
        kernel = blur_kernel_size(grid, base)
        dilation = None
        if config.global_branch == "dilated":
            dilation = (max(grid[0] // base[0], 1), max(grid[1] // base[1], 1))
        state.log.setdefault(LOG_FUSION, {})[layer] = {
            "grid": grid, "window": window, "windows": len(row_starts) * len(col_starts), "kernel": kernel,
            "dilation": dilation}
        fused = functools.partial(fused_attention, grid=grid, window=window, row_starts=row_starts,
                                  col_starts=col_starts, kernel_size=kernel, sigma=config.blur_sigma,
                                  dilation=dilation, image_start=image_start)

        def attend(query, key, value, scale=None, dropout_p=0.0, attn_mask=None):
            if attn_mask is not None:
                raise ValueError(
                    f"scale fusion on layer {layer!r}: its attention call has a mask (Chroma's text padding "
                    "mask), which scale fusion's branches cannot honour; turn ScaleFusionConfig off for this model")
            return fused(query, key, value, scale=scale, dropout_p=dropout_p)

        return attend


def install(attachment, config: ScaleFusionConfig) -> None:
    add_attention_change(attachment, ScaleFusion(config))
