"""Windowed self-attention (HiDiffusion's MSW-MSA, FreeScale's local windows): image queries attend
within windows of the layer's token grid, shifted each step.

The default window holds as many tokens as the layer's grid has at the base size, at the call's
aspect ratio, so a call at or below the base area is untouched. A grid that does not divide evenly
is split into near-equal windows (sizes differ by at most one token per side): an exact partition
with no padding and no mask, so flash kernels stay usable. Shifting rolls the grid cyclically by
per-step offsets drawn from `state.generator("windows")` (as HiDiffusion's shifted windows do; tokens
of opposite edges may share a window at that step). In joint attention the text tokens stay global:
every window also sees all text keys and text queries see every key. Works for UNet self-attention
and the DiTs (PixArt self-attention, SD3/Flux joint attention, where the token order of the processor
is listed in `hires.families.PROCESSOR_FACTS`), through hires' attention wrapper
(hires.denoiser.attention): the layer's SDPA call is replaced by `windowed_attention`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
import torch.nn.functional as F

from ...denoiser.attention import AttentionChange, LayerCall, LayerRewrite, add_attention_change
from .config import WindowAttentionConfig

LOG_WINDOWS = "log.windows"
LOG_WINDOW_OFFSETS = "log.window_offsets"


def window_runs(length: int, window: int) -> list[tuple[int, int, int]]:
    """Split `length` tokens into ceil(length / window) near-equal windows.

    Returns runs (start, count, size): `count` consecutive windows of `size` tokens from `start`.
    Sizes differ by at most one, none exceeds `window`, and the windows cover every token once.
    """
    count = -(-length // window)
    size, larger = divmod(length, count)
    runs = [(0, larger, size + 1), (larger * (size + 1), count - larger, size)]
    return [run for run in runs if run[1] > 0]


def windowed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grid: tuple[int, int],
    window: tuple[int, int],
    offset: tuple[int, int] = (0, 0),
    image_start: int = 0,
    scale: float | None = None,
    dropout_p: float = 0.0,
    attend: Callable = F.scaled_dot_product_attention,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of (batch, heads, tokens, dim) tensors with image queries in windows.

    Tokens [image_start, image_start + rows*cols) are the image, row-major on `grid`; any other
    tokens (text) are global. The image grid is rolled by -offset, split into near-equal windows of
    at most `window`, each window's queries attend to that window's keys plus all text keys, and the
    result is rolled back. Text queries attend to all keys. One `attend` call per window shape.
    `attn_mask` (broadcastable to (batch, heads, tokens, tokens), boolean or additive; Chroma's text
    padding mask) is cut to each window's queries and keys.
    """
    batch, heads, tokens, _ = query.shape
    rows, cols = grid
    image_end = image_start + rows * cols
    has_text = image_start > 0 or image_end < tokens

    def image_grid(x):
        x = x[:, :, image_start:image_end].unflatten(2, (rows, cols))
        return torch.roll(x, shifts=(-offset[0], -offset[1]), dims=(2, 3)) if any(offset) else x

    q_grid, k_grid, v_grid = image_grid(query), image_grid(key), image_grid(value)
    text_index = torch.cat([torch.arange(image_start), torch.arange(image_end, tokens)]).to(query.device)
    if has_text:
        text_keys = torch.cat([key[:, :, :image_start], key[:, :, image_end:]], dim=2)
        text_values = torch.cat([value[:, :, :image_start], value[:, :, image_end:]], dim=2)
    if attn_mask is not None:
        attn_mask = attn_mask.expand(attn_mask.shape[0] if attn_mask.shape[0] != 1 else batch,
                                     *attn_mask.shape[1:-2], tokens, tokens)
        # each image token's sequence index, laid out (and rolled) like the image grid
        index_grid = image_grid(torch.arange(tokens, device=query.device)[None, None, :, None])
    out_grid = q_grid.new_empty((batch, heads, rows, cols, value.shape[-1]))

    for row0, n_rows, size_r in window_runs(rows, window[0]):
        for col0, n_cols, size_c in window_runs(cols, window[1]):
            area = (slice(None), slice(None), slice(row0, row0 + n_rows * size_r), slice(col0, col0 + n_cols * size_c))

            def to_windows(x):
                lead = x.shape[:2]  # (batch, heads); (1, 1) for the index grid
                x = x[area].reshape(*lead, n_rows, size_r, n_cols, size_c, x.shape[-1])
                return x.permute(0, 2, 4, 1, 3, 5, 6).reshape(lead[0] * n_rows * n_cols, lead[1],
                                                              size_r * size_c, x.shape[-1])

            q_w, k_w, v_w = to_windows(q_grid), to_windows(k_grid), to_windows(v_grid)
            if has_text:
                def per_window(x):
                    x = x[:, None].expand(batch, n_rows * n_cols, *x.shape[1:])
                    return x.reshape(batch * n_rows * n_cols, *x.shape[2:])

                k_w = torch.cat([k_w, per_window(text_keys)], dim=2)
                v_w = torch.cat([v_w, per_window(text_values)], dim=2)
            mask_w = None
            if attn_mask is not None:
                windows = n_rows * n_cols
                query_index = to_windows(index_grid)[:, 0, :, 0]  # (windows, window tokens)
                key_index = torch.cat([query_index, text_index[None].expand(windows, -1)], dim=1)
                mask_rows = attn_mask[:, :, query_index]  # (B, H', windows, window tokens, tokens)
                mask_w = mask_rows.gather(-1, key_index[None, None, :, None, :].expand(
                    *mask_rows.shape[:-1], key_index.shape[1]))
                mask_w = mask_w.transpose(1, 2)
                mask_w = mask_w.reshape(batch * windows, *mask_w.shape[2:])
            out = attend(q_w, k_w, v_w, dropout_p=dropout_p, scale=scale,
                         **({} if mask_w is None else {"attn_mask": mask_w}))
            out = out.reshape(batch, n_rows, n_cols, heads, size_r, size_c, out.shape[-1])
            out_grid[area] = out.permute(0, 3, 1, 4, 2, 5, 6).reshape(batch, heads, n_rows * size_r,
                                                                      n_cols * size_c, -1)

    if any(offset):
        out_grid = torch.roll(out_grid, shifts=offset, dims=(2, 3))
    out_image = out_grid.flatten(2, 3)
    if not has_text:
        return out_image
    def text_rows(start, end):
        return {} if attn_mask is None else {"attn_mask": attn_mask[:, :, start:end]}

    parts = []
    if image_start > 0:
        parts.append(attend(query[:, :, :image_start], key, value, dropout_p=dropout_p, scale=scale,
                            **text_rows(0, image_start)))
    parts.append(out_image)
    if image_end < tokens:
        parts.append(attend(query[:, :, image_end:], key, value, dropout_p=dropout_p, scale=scale,
                            **text_rows(image_end, tokens)))
    return torch.cat(parts, dim=2)


@dataclasses.dataclass
class _WindowCall:
    offsets: torch.Tensor | None = None


def _window_offsets(state) -> torch.Tensor:
    """Per-step window shifts as fractions of a window, drawn once per call from its generator."""
    slot = state.slot(_WindowCall)
    offsets = slot.offsets
    if offsets is None:
        steps = max(state.num_steps, 1)
        offsets = torch.rand((steps, 2), generator=state.generator("windows"), dtype=torch.float64)
        slot.offsets = offsets
        state.log[LOG_WINDOW_OFFSETS] = [tuple(row) for row in offsets.tolist()]
    return offsets


class WindowAttention(AttentionChange):
    owner = "WindowAttentionConfig"

    def __init__(self, config: WindowAttentionConfig):
        self.config = config

    def rewrite(self, call: LayerCall, rewrite: LayerRewrite, state, layer: str) -> LayerRewrite:
        size = (self.config.window,) * 2 if self.config.window is not None else call.window_grid
        if call.grid[0] <= size[0] and call.grid[1] <= size[1]:
            return rewrite
        image_start = call.image_position(self.owner, layer)
        runs = [window_runs(side, limit) for side, limit in zip(call.grid, size)]
        largest = tuple(r[0][2] for r in runs)
        counts = tuple(sum(n for _, n, _ in r) for r in runs)
        fractions = _window_offsets(state)[max(state.step_index, 0) % max(state.num_steps, 1)]
        offset = tuple(int(f * largest[axis]) if self.config.shift and counts[axis] > 1 else 0
                       for axis, f in enumerate(fractions.tolist()))
        state.log.setdefault(LOG_WINDOWS, {})[layer] = {
            "grid": call.grid, "window": largest, "windows": counts[0] * counts[1], "offset": offset}
        attend = functools.partial(windowed_attention, grid=call.grid, window=size, offset=offset,
                                   image_start=image_start)
        return rewrite.by(self.owner, attend=attend, image_keys=largest[0] * largest[1])


def install(attachment, config: WindowAttentionConfig) -> None:
    """Run image self-attention in (shifted) windows of the base-size token grid."""
    add_attention_change(attachment, WindowAttention(config))
