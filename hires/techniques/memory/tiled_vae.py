"""Tiled VAE decode and encode with whole-image GroupNorm statistics.

Why: diffusers' `vae.enable_tiling()` normalises every tile with that tile's own GroupNorm
statistics and blends overlaps, so flat areas change tone from tile to tile and seams show. Here
every GroupNorm uses the statistics of the whole image, so the tiled result equals the untiled one
up to float32 rounding.

How:
- The part of the network that runs at latent resolution (decoder: post-quant conv, conv_in and
  the mid block with its global attention; encoder: the mid block and what follows): its resnets
  and the encoder's output head run tiled like the rest; its attention runs on the whole latent
  with the queries in chunks (`lean_attention`, scaled-dot-product attention, so no N x N matrix
  is materialised and q, the attention output and its projection are never held whole).
- The high-resolution part is a chain of units (resnet blocks, up/downsamplers, the output head),
  grouped into segments. A segment's input is held whole; the segment runs tile by tile, each tile
  with a halo as wide as the receptive field of the segment's convolutions, so the tile's core is
  exact. GroupNorm is intercepted (`F.group_norm`, through a TorchFunctionMode, so no module is
  touched): a first pass over all tiles gathers float32 count / mean / M2 of the first GroupNorm's
  input over each tile's core, combined over tiles (Chan's parallel formula); the next pass
  normalises that GroupNorm with the combined statistics and gathers the next one; the last pass
  writes each tile's core into the segment's output. The cost is recomputing a segment's prefix
  once per GroupNorm in it; the memory is the segment's input and output plus one tile.

Holding the whole tensors in bfloat16 (`storage_dtype=torch.bfloat16`): the tensors held whole
between segments are the memory of a tiled pass (at 8192 px, SDXL's 256-channel 4096 px activation
is 17 GB in float32). A VAE that needs float32 (`needs_upcast`: float16 overflows) can keep float32
compute and store those tensors in bfloat16, which has float32's exponent range (so nothing
overflows) at half the bytes; each tile is cast back to the compute dtype before it runs, so only
the stored values are rounded (about 3 significant digits). The planner picks it only when the
float32-held pass does not fit.

`install(attachment, config)` shadows `vae._decode` / `vae._encode` with instance attributes set
by a named hook's initialise step and deleted by its de-initialise step, so `hires.remove` leaves
the VAE exactly as it was.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from fractions import Fraction
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch.overrides import TorchFunctionMode

from ...sampling.latent_space import vae_precision

HOOK_NAME = "hires.tiled_vae"
DEFAULT_TILE_LATENT = 64  # tile core side in latent pixels (512 px for a factor-8 VAE)


# -- units and segments ----------------------------------------------------------------------------
@dataclasses.dataclass
class Unit:
    """One local step of the high-resolution path: y = fn(x); y's side is x's side times `scale`."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    radius: int  # receptive-field radius in this unit's input pixels
    scale: Fraction
    store_output: bool = True  # False: fuse with the next unit (never hold this output whole)


@dataclasses.dataclass
class Segment:
    units: list[Unit]

    @property
    def scale(self) -> Fraction:
        return math.prod((u.scale for u in self.units), start=Fraction(1))

    @property
    def alignment(self) -> int:
        """Tile borders (segment input px) must be multiples of this so every level maps to whole pixels."""
        step, scale = 1, Fraction(1)
        for unit in self.units:
            scale *= unit.scale
            step = max(step, scale.denominator)
        return step

    @property
    def halo(self) -> int:
        total, scale = Fraction(0), Fraction(1)
        for unit in self.units:
            total += Fraction(unit.radius) / scale
            scale *= unit.scale
        align = self.alignment
        return math.ceil(math.ceil(total) / align) * align

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit.fn(x)
        return x


def _conv_radius(conv: torch.nn.Conv2d) -> int:
    return max((k - 1) // 2 * d for k, d in zip(conv.kernel_size, conv.dilation))


def _resnet_unit(name: str, resnet) -> Unit:
    radius = _conv_radius(resnet.conv1) + _conv_radius(resnet.conv2)
    if getattr(resnet, "conv_shortcut", None) is not None:
        radius = max(radius, _conv_radius(resnet.conv_shortcut))
    return Unit(name, lambda x: resnet(x, None), radius, Fraction(1))


def _upsampler_unit(name: str, upsampler) -> Unit:
    if getattr(upsampler, "use_conv_transpose", False) or not getattr(upsampler, "interpolate", True):
        raise TypeError(f"{name}: {type(upsampler).__name__} without nearest "
                        f"interpolation is not supported by tiled decode")
    conv = getattr(upsampler, "conv", None) if getattr(upsampler, "name", "conv") == "conv" else upsampler.Conv2d_0
    radius = math.ceil(_conv_radius(conv) / 2) if conv is not None else 0
    return Unit(name, lambda x: upsampler(x), radius, Fraction(2), store_output=False)


def _downsampler_unit(name: str, downsampler) -> Unit:
    conv = downsampler.conv
    if not isinstance(conv, torch.nn.Conv2d):
        return Unit(name, lambda x: downsampler(x), 1, Fraction(1, 2))
    # The stride-2 conv (after diffusers' asymmetric (0, 1) pad when padding == 0) reads up to k-1 px ahead.
    return Unit(name, lambda x: downsampler(x), conv.kernel_size[0] - 1, Fraction(1, 2))


def _check_group_norm_head(coder, what: str) -> None:
    if not isinstance(coder.conv_norm_out, torch.nn.GroupNorm):
        raise TypeError(
            f"tiled {what} supports VAEs whose output norm is GroupNorm (diffusers AutoencoderKL); "
            f"got {type(coder.conv_norm_out).__name__}"
        )


def decoder_plan(decoder) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[Unit]]:
    """The decoder as (whole-latent trunk, high-resolution units); together they equal `decoder(z)`."""
    _check_group_norm_head(decoder, "decode")

    def trunk(z):
        return decoder.mid_block(decoder.conv_in(z), None)

    units: list[Unit] = []
    for b, block in enumerate(decoder.up_blocks):
        if not hasattr(block, "resnets"):
            raise TypeError(f"decoder.up_blocks[{b}] ({type(block).__name__}) has no "
                            f"resnets; tiled decode needs UpDecoderBlock2D-like blocks")
        for r, resnet in enumerate(block.resnets):
            units.append(_resnet_unit(f"up_blocks.{b}.resnets.{r}", resnet))
        for u, upsampler in enumerate(block.upsamplers or []):
            units.append(_upsampler_unit(f"up_blocks.{b}.upsamplers.{u}", upsampler))

    def head(x):
        return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(x)))

    units.append(Unit("head", head, _conv_radius(decoder.conv_out), Fraction(1)))
    return trunk, units


def encoder_plan(encoder, quant_conv) -> tuple[list[Unit], Callable[[torch.Tensor], torch.Tensor]]:
    """The encoder as (high-resolution units, whole-latent trunk); together they equal `encoder(x)` (+ quant_conv)."""
    _check_group_norm_head(encoder, "encode")
    units = [Unit("conv_in", lambda x: encoder.conv_in(x), _conv_radius(encoder.conv_in), Fraction(1))]
    for b, block in enumerate(encoder.down_blocks):
        if not hasattr(block, "resnets"):
            raise TypeError(f"encoder.down_blocks[{b}] ({type(block).__name__}) has no "
                            f"resnets; tiled encode needs DownEncoderBlock2D-like blocks")
        for r, resnet in enumerate(block.resnets):
            units.append(_resnet_unit(f"down_blocks.{b}.resnets.{r}", resnet))
        for d, downsampler in enumerate(block.downsamplers or []):
            # Fuse into the previous unit: its full-resolution output is never held whole.
            units[-1].store_output = False
            units.append(_downsampler_unit(f"down_blocks.{b}.downsamplers.{d}", downsampler))

    def trunk(h):
        h = encoder.mid_block(h)
        h = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(h)))
        return quant_conv(h) if quant_conv is not None else h

    return units, trunk


def group_units(units: list[Unit], grouping: str = "unit") -> list[Segment]:
    """Segments of units. "unit": store every output except fused ones (least recompute);
    "level": store only at resolution changes' low side (least memory, more recompute)."""
    if grouping not in ("unit", "level"):
        raise ValueError(f"grouping={grouping!r} must be 'unit' or 'level'")
    segments, current = [], []
    for unit in units:
        if grouping == "level" and unit.scale > 1 and current:
            segments.append(Segment(current))  # store the upsampler's low-resolution input
            current = []
        current.append(unit)
        if (unit.store_output if grouping == "unit" else unit.scale < 1):
            segments.append(Segment(current))
            current = []
    if current:
        segments.append(Segment(current))
    return segments


# -- whole-image GroupNorm statistics --------------------------------------------------------------
class _StatisticsGathered(Exception):
    """Raised to stop a tile's forward once the GroupNorm being measured has been seen."""


class _TileStatistics:
    """count, mean and M2 per (batch, group), combined over tiles with Chan's formula (float64 accumulators)."""

    def __init__(self):
        self.count = None
        self.mean = None
        self.m2 = None

    def add(self, x: torch.Tensor, groups: int) -> None:
        # Per-channel var_mean reads the (strided) core crop in place; channels of a group have equal
        # counts, so the group's mean is their mean and its M2 adds their spread around it.
        b, channels = x.shape[:2]
        per_channel = math.prod(x.shape[2:])
        variance, mean = torch.var_mean(x.float(), dim=tuple(range(2, x.ndim)), correction=0)
        variance, mean = variance.double().reshape(b, groups, -1), mean.double().reshape(b, groups, -1)
        group_mean = mean.mean(-1)
        m2 = (variance.sum(-1) + ((mean - group_mean[..., None]) ** 2).sum(-1)) * per_channel
        mean, n = group_mean, per_channel * (channels // groups)
        if self.count is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) float32, variance biased like GroupNorm's."""
        return self.mean.float(), (self.m2 / self.count).float()


def group_norm_with_statistics(x, groups, mean, variance, weight, bias, eps) -> torch.Tensor:
    """GroupNorm of `x` with given per-(batch, group) mean and variance, in float32, cast back."""
    # As one per-channel affine map x * scale + shift: a single fused pass, no reshaped copy.
    b, channels = x.shape[:2]
    rstd = torch.rsqrt(variance + eps).repeat_interleave(channels // groups, dim=1)  # (B, C)
    scale = rstd * (weight.float() if weight is not None else 1.0)
    shift = (bias.float() if bias is not None else 0.0) - mean.repeat_interleave(channels // groups, dim=1) * scale
    view = (b, channels) + (1,) * (x.ndim - 2)
    values = torch.addcmul(shift.reshape(view), x.float(), scale.reshape(view))
    return values.to(x.dtype)


class _GlobalGroupNorm(TorchFunctionMode):
    """Inside one tile's forward: the first `len(known)` GroupNorms use whole-image statistics; the
    next one has its input's core measured into `gather`, then the forward stops."""

    def __init__(self, known, gather: _TileStatistics | None, core, input_size):
        super().__init__()
        self.known = known
        self.gather = gather
        self.core = core  # (top, left, height, width) of the tile's core in tile-input pixels
        self.input_size = input_size
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.group_norm:
            return func(*args, **kwargs)
        x, groups = args[0], args[1]
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        bias = args[3] if len(args) > 3 else kwargs.get("bias")
        eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
        index, self.calls = self.calls, self.calls + 1
        if index < len(self.known):
            mean, variance = self.known[index]
            return group_norm_with_statistics(x, groups, mean, variance, weight, bias, eps)
        if self.gather is None:
            raise RuntimeError("a GroupNorm appeared that the statistics passes did not see")
        scale_h = Fraction(x.shape[-2], self.input_size[0])
        scale_w = Fraction(x.shape[-1], self.input_size[1])
        top, left, height, width = self.core
        rows = slice(int(top * scale_h), int((top + height) * scale_h))
        cols = slice(int(left * scale_w), int((left + width) * scale_w))
        self.gather.add(x[..., rows, cols], groups)
        raise _StatisticsGathered


def _tiles(size: int, tile: int):
    return [(start, min(tile, size - start)) for start in range(0, size, tile)]


_ONE_TILE = contextvars.ContextVar("hires_tiled_vae_one_tile", default=False)


@contextlib.contextmanager
def one_tile_per_pass():
    """Run only the largest tile (twice) per pass: how the planner measures the tiled peak on the
    meta device without walking every tile."""
    token = _ONE_TILE.set(True)
    try:
        yield
    finally:
        _ONE_TILE.reset(token)


def run_segment(segment: Segment, x: torch.Tensor, tile: int, halo: int | None = None,
                compute_dtype: torch.dtype | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`segment(x)` computed tile by tile with whole-image GroupNorm statistics.

    `halo` (pixels of `x`) overrides the exact one, the segment's receptive-field radius. Each tile
    runs in `compute_dtype` (default: `x`'s); the output is held in `out_dtype` (default: `x`'s)."""
    height, width = x.shape[-2:]
    align = segment.alignment
    halo = segment.halo if halo is None else math.ceil(halo / align) * align
    tile = max(align, tile // align * align)
    if height % align or width % align:
        raise ValueError(f"tiled VAE: a {height}x{width} activation cannot be split on a {align}-pixel grid")
    rows, cols = _tiles(height, tile), _tiles(width, tile)
    if _ONE_TILE.get():
        # The tile with the largest haloed extent allocates the most; run twice, because from the
        # second tile on the segment's whole output is live while a tile runs.
        def extent(size):
            return lambda t: min(size, t[0] + t[1] + halo) - max(0, t[0] - halo)
        grid = [(max(rows, key=extent(height)), max(cols, key=extent(width)))] * 2
    else:
        grid = [(r, c) for r in rows for c in cols]
    known: list[tuple[torch.Tensor, torch.Tensor]] = []
    out = None
    scale = segment.scale
    while True:
        gather = _TileStatistics()
        finished = False
        for (top, tile_h), (left, tile_w) in grid:
            r0, r1 = max(0, top - halo), min(height, top + tile_h + halo)
            c0, c1 = max(0, left - halo), min(width, left + tile_w + halo)
            # Contiguous: convolution kernels copy a strided input anyway; done here the copy is
            # explicit, so the planner's meta-device count sees it too.
            piece = x[..., r0:r1, c0:c1].to(compute_dtype or x.dtype).contiguous()
            mode = _GlobalGroupNorm(known, gather, (top - r0, left - c0, tile_h, tile_w), (r1 - r0, c1 - c0))
            try:
                with mode:
                    y = segment(piece)
            except _StatisticsGathered:
                continue
            finished = True
            if out is None:
                out = y.new_empty(y.shape[:2] + (int(height * scale), int(width * scale)), dtype=out_dtype or x.dtype)
            oy, ox = int((top - r0) * scale), int((left - c0) * scale)
            oh, ow = int(tile_h * scale), int(tile_w * scale)
            out[..., int(top * scale): int(top * scale) + oh,
                int(left * scale): int(left * scale) + ow] = y[..., oy: oy + oh, ox: ox + ow]
            del y
        if finished:
            return out
        known.append(gather.finish())


def _in_pixels_of(x: torch.Tensor, latent_side: int, latent_pixels: int | None) -> int | None:
    """`latent_pixels` latent px expressed in pixels of activation `x`."""
    if latent_pixels is None:
        return None
    return max(1, math.ceil(latent_pixels * x.shape[-2] / latent_side))


ATTENTION_QUERY_CHUNK = 2**16  # query tokens per chunk of the mid block's attention


def lean_attention(attn, x: torch.Tensor, query_chunk: int | None = None) -> torch.Tensor:
    """A VAE mid-block `Attention` (diffusers' AttnProcessor2_0 path: GroupNorm, q/k/v projections,
    scaled-dot-product attention, output projection, residual, rescale) on (B, C, H, W), with the
    queries in chunks written into one output buffer.

    Why: the stock processor holds the normalised input, q, k, v, the attention output and its
    projection whole at once (at 8192 px, each is 2 GiB in float32 for SDXL's VAE); per query chunk
    only k, v, the normalised tokens and the output are whole. Row by row it is the same computation.
    """
    if getattr(attn, "spatial_norm", None) is not None or attn.group_norm is None or attn.is_cross_attention:
        raise TypeError("tiled VAE: the mid block's attention must be a GroupNorm self-attention (AutoencoderKL's)")
    b, c, h, w = x.shape
    n = h * w
    query_chunk = query_chunk or ATTENTION_QUERY_CHUNK
    tokens = attn.group_norm(x.view(b, c, n)).transpose(1, 2).contiguous()  # (B, N, C)
    heads = attn.heads

    def split(t):
        return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    key, value = split(attn.to_k(tokens)), split(attn.to_v(tokens))
    out = torch.empty_like(x)
    flat_out, flat_in = out.view(b, c, n), x.view(b, c, n)
    for start in range(0, n, query_chunk):
        stop = min(n, start + query_chunk)
        query = split(attn.to_q(tokens[:, start:stop]))
        mixed = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        mixed = attn.to_out[0](mixed.transpose(1, 2).reshape(b, stop - start, -1).to(query.dtype))
        mixed = mixed.transpose(1, 2)
        if attn.residual_connection:
            mixed = mixed + flat_in[:, :, start:stop]
        flat_out[:, :, start:stop] = mixed / attn.rescale_output_factor
        del query, mixed
    return out


def _mid_block(mid, h: torch.Tensor, tile: int) -> torch.Tensor:
    """`mid(h, None)` (UNetMidBlock2D) with its resnets tiled (whole-image GroupNorm statistics) and
    its attention whole but lean (`lean_attention`); `tile` in pixels of `h` (latent px)."""
    h = run_segment(Segment([_resnet_unit("mid_block.resnets.0", mid.resnets[0])]), h, tile)
    for index, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attn is not None:
            h = lean_attention(attn, h)
        h = run_segment(Segment([_resnet_unit(f"mid_block.resnets.{index + 1}", resnet)]), h, tile)
    return h


STORAGE_DTYPES = (None, torch.bfloat16)  # None: held in the compute dtype


def _check_storage(storage_dtype) -> None:
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage_dtype={storage_dtype!r} must be None (the compute dtype) or torch.bfloat16")


def tiled_decode(vae, z: torch.Tensor, tile_size: int | None = None, grouping: str = "unit", halo: int | None = None,
                 storage_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`vae.decoder(vae.post_quant_conv(z))` with whole-image GroupNorm statistics, tile by tile.

    `z` is what `vae.decode` receives (already unscaled by the pipeline); `tile_size` is the tile
    core side in latent pixels; `halo` (latent px) overrides the exact halo (for experiments);
    `storage_dtype` holds the tensors kept whole between segments in that dtype while every tile
    computes in `z`'s (see the module docstring). The result is in `z`'s dtype.
    """
    _check_storage(storage_dtype)
    tile_latent = tile_size or DEFAULT_TILE_LATENT
    compute = z.dtype
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    _, units = decoder_plan(vae.decoder)
    h = _mid_block(vae.decoder.mid_block, vae.decoder.conv_in(z), tile_latent)
    if storage_dtype is not None:
        h = h.to(storage_dtype)
    for segment in group_units(units, grouping):
        h = run_segment(segment, h, _in_pixels_of(h, z.shape[-2], tile_latent), _in_pixels_of(h, z.shape[-2], halo),
                        compute, storage_dtype)
    return h.to(compute)


def tiled_encode(vae, x: torch.Tensor, tile_size: int | None = None, grouping: str = "unit", halo: int | None = None,
                 storage_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The moments `vae._encode(x)` returns (encoder + quant_conv), tile by tile, whole-image GroupNorm
    statistics; `storage_dtype` as in `tiled_decode` (the image itself stays as given)."""
    _check_storage(storage_dtype)
    tile_latent = tile_size or DEFAULT_TILE_LATENT
    compute = x.dtype
    units, _ = encoder_plan(vae.encoder, getattr(vae, "quant_conv", None))
    factor = 2 ** sum(1 for u in units if u.scale < 1)
    latent_side = x.shape[-2] // factor
    h = x
    for segment in group_units(units, grouping):
        h = run_segment(segment, h, _in_pixels_of(h, latent_side, tile_latent), _in_pixels_of(h, latent_side, halo),
                        compute, storage_dtype)
    encoder, quant_conv = vae.encoder, getattr(vae, "quant_conv", None)
    h = _mid_block(encoder.mid_block, h.to(compute), tile_latent)

    def head(x):
        x = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(x)))
        return quant_conv(x) if quant_conv is not None else x

    return run_segment(Segment([Unit("head", head, _conv_radius(encoder.conv_out), Fraction(1))]), h, tile_latent)


# -- installing on a pipeline's VAE ----------------------------------------------------------------
class TiledVAEHook(ModelHook):
    """Shadows `vae._decode` / `vae._encode` while registered; the originals come back on removal."""

    def __init__(self, attachment, should_tile: Callable[[str, tuple[int, ...], torch.dtype], tuple | None],
                 halo: int | None = None):
        super().__init__()
        self.attachment = attachment
        # (kind, shape, dtype) -> (tile side in latent px, segment grouping, storage dtype), or None: don't tile.
        self.should_tile = should_tile
        self.halo = halo
        self._shadows: list = []

    def initialize_hook(self, module):
        from diffusers.models.autoencoders.vae import DecoderOutput

        original_decode, original_encode = module._decode, module._encode
        hook = self

        def _decode(z, return_dict: bool = True):
            choice = hook.should_tile("decode", tuple(z.shape), z.dtype)
            if choice is None:
                return original_decode(z, return_dict=return_dict)
            with vae_precision(module) as dtype:
                sample = tiled_decode(module, z.to(dtype), *choice[:2], hook.halo, *choice[2:]).to(z.dtype)
            return DecoderOutput(sample=sample) if return_dict else (sample,)

        def _encode(x):
            choice = hook.should_tile("encode", tuple(x.shape), x.dtype)
            if choice is None:
                return original_encode(x)
            with vae_precision(module) as dtype:
                return tiled_encode(module, x.to(dtype), *choice[:2], hook.halo, *choice[2:]).to(x.dtype)

        self._shadows = [self.attachment.shadow(module, name, fn) for name,
                         fn in (("_decode", _decode), ("_encode", _encode))]
        return module

    def deinitalize_hook(self, module):
        for entry in reversed(self._shadows):
            self.attachment.unshadow(entry)
        self._shadows = []
        return module


def install_tiling(attachment, mode: str, tile_size: int | None, decide: Callable | None = None,
                   halo: int | None = None) -> None:
    """Install the tiled VAE hook on `attachment.pipe.vae`. Mode "auto" tiles where
    `decide(vae, kind, shape, dtype, tile_size)` returns (tile size, grouping, storage dtype), and not where it
    returns None."""
    vae = getattr(attachment.pipe, "vae", None)
    if vae is None:
        raise ValueError("vae_tiling: the pipeline has no `vae` component to tile")
    if mode == "never":
        return
    if mode == "auto" and decide is None:
        raise ValueError("vae_tiling mode 'auto' needs a tiling decision (the memory planner's)")

    def should_tile(kind, shape, dtype):
        if mode == "always":
            return tile_size or DEFAULT_TILE_LATENT, "unit", None
        return decide(vae, kind, shape, dtype, tile_size)

    attachment.add_hook(vae, TiledVAEHook(attachment, should_tile, halo=halo), HOOK_NAME)
