"""Positional extrapolation for diffusion transformers, and the timestep-shift policy of flow models.

Each family encodes positions differently (shared/references/dit_positions.md):

- PixArt-Sigma (`sincos_interpolated`): a 2D sin-cos table rebuilt for every grid, positions
  `i * base / N / interpolation_scale`, so every size spans the same range (built-in position
  interpolation). hires exposes the scale used off the native grid. The pipeline's
  `use_resolution_binning=True` (its default) snaps a large request to a bin near the base size and
  resizes afterwards; hires cannot change a call's defaults, so a call that was snapped raises a
  ValueError asking for `use_resolution_binning=False` instead of silently denoising at the bin.
- SD3 (`sincos_cropped_table`): a stored max x max table cropped around its centre, which refuses
  grids past `pos_embed_max_size`. Past it, "interpolate" (default) resamples the table bilinearly
  so the grid spans the whole table at a finer step: it works for any stored table (learned or not),
  never leaves the values the model was trained with, and meets diffusers' crop exactly at the table
  edge. "extrapolate" continues the sin-cos formula past the table's ends at the table's own step;
  it needs a table that is that formula, which is checked when hires is applied. Either table is
  built once per call and reused at every step.
- Flux (`rope`): 3-axis RoPE on integer ids. The row and column axes are rescaled per call by the
  call's scale on that side, s = size / base size; axis 0 (zero for text and image) is untouched.
  "interpolation" divides positions by s (PI); "ntk" raises the base to theta * s^(d/(d-2));
  "yarn" (default, DyPE's default method) interpolates the frequencies that turn less than
  `yarn_beta_slow` times over the base grid, keeps those turning more than `yarn_beta_fast` times,
  ramps linearly in between (YaRN's NTK-by-parts, linear in rotations as in its paper), and
  multiplies cos and sin by mscale = 0.1 ln s + 1. Both queries and keys pass through RoPE, so the
  logits of those dimensions grow by mscale^2, which is YaRN's 1/t. Default ramp ends: 1.25 and 0.75
  rotations, the ends DyPE's Flux code uses (LLM YaRN's 32 and 1 would interpolate every Flux
  frequency: the fastest turns 10.2 times over 64 positions). The rotary tables are computed once
  per call and reused every step. EntropyScalingConfig also sharpens attention; with both, the two
  factors multiply. Flux.2 and Chroma use the same layout: Flux.2's ids have four axes (time, row,
  column, layer; only row and column are rescaled) and its transformer embeds image and text ids in
  two calls, so the call keeps one table per id set.
- DyPE (`timestep_dependent=True`, RoPE families): the extrapolation follows the noise level sigma of
  each step, kappa = sigma^2, as guyyariv/DyPE's Flux code does. "yarn" is then DyPE's vision YaRN:
  the PI frequencies ramp to the NTK ones between `yarn_beta_fast` and `yarn_beta_slow` rotations,
  then toward the original ones between 16 and 2 rotations (the ramp ends found as dimension indices,
  floored and ceiled, over the base grid), every rotation count multiplied by kappa; mscale as above.
  At sigma = 1 this is DyPE's static YaRN, and as sigma -> 0 every frequency returns to the model's
  own. "ntk" multiplies theta by (s^(d/(d-2)))^(2 kappa), at least 1. sigma is the scheduler's
  sigma of the step the denoiser is called at (its timestep / num_train_timesteps), so the tables are
  rebuilt each step. Only RoPE families, which are all flow-matching, take it: SD3's learned table and
  PixArt's sin-cos table have no frequencies to ramp, and asking for it there is an error. DyPE caps
  the flow shift at the base size's mu, which is this technique's default `timestep_shift="clamp"`.
- Qwen-Image (`rope_centred`): QwenEmbedRope builds complex rotations from positions centred on the
  image (a side of n tokens spans -(n - n//2) .. n//2 - 1) and places the text after the image,
  at max(rows//2, cols//2) onwards on every axis. The row and column axes are rescaled the same
  way as Flux's, for the image and the text positions alike (so under "interpolation" the text
  sits where it sat at the base size); the frame axis keeps the model's own frequencies, and
  mscale multiplies the complex rotation (its modulus), which scales queries and keys as Flux's
  cos and sin do.
- Z-Image (`rope_id_tables`): its RopeEmbedder (a plain object, not a module) looks rotations up in
  per-axis tables of `axes_lens` integer positions: axis 0 the sequence (caption 1..L, image at
  L + 1), axes 1 and 2 the row and column from 0. The row and column axes are rescaled as Flux's;
  the rotations are computed from the ids, so grids past the tables' ends (plain diffusers fails
  there: 512 tokens, 8192 px) work too. The embedder is shadowed on the transformer through the
  attachment's ledger.
- Flow families' timestep shift (`timestep_shift`): "dynamic" keeps diffusers' mu, linear in the
  token count and unbounded (at 4096 px Flux sits at sigma > 0.9 for all but the last step);
  "clamp" (default) caps mu at its value for the base size's token count, as DyPE does (computed by
  the family's own rule: Flux.2's empirical mu depends on the step count too); "static"
  uses a fixed shift (`shift`; None: the scheduler's own shift at the base size). With a scheduler
  that shifts statically (SD3's default) nothing grows with size, so "clamp" changes nothing there.
  FluxPipeline has no `mu` argument: the policy wraps the scheduler's `set_timesteps` through an
  instance attribute saved and restored by a hook, so `hires.remove` takes it out.

Every change acts only inside a pipeline call and only above the base size (per side for positions,
by token count for the shift): at the base size, and with the technique off or removed, outputs are
bit-identical to plain diffusers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import sys
from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from diffusers.models.embeddings import PatchEmbed, get_1d_rotary_pos_embed

from ...sampling.schedules import base_size_mu, clamped_mu, flow_sigma, static_shift, static_shift_mu
from .config import PositionConfig

HOOK = "hires.positions"

# Family defaults of PositionConfig's `None` fields (documented in the module docstring).
DEFAULTS = {
    "rope": "yarn",
    "timestep_dependent": False,
    "yarn_beta_fast": 1.25,
    "yarn_beta_slow": 0.75,
    "table": "interpolate",
    "timestep_shift": "clamp",
}

# Which PositionConfig options act on which position encoding (the family's `position_encoding`).
_ENCODING_OPTIONS = {
    "sincos_interpolated": ("interpolation_scale",),
    "sincos_cropped_table": ("table",),
    "rope": ("rope", "yarn_beta_fast", "yarn_beta_slow", "timestep_dependent"),
    "rope_centred": ("rope", "yarn_beta_fast", "yarn_beta_slow"),
    "rope_id_tables": ("rope", "yarn_beta_fast", "yarn_beta_slow"),
}
# DyPE's second YaRN ramp (toward the original frequencies), in rotations over the base grid.
DYPE_GAMMA_FAST, DYPE_GAMMA_SLOW = 16.0, 2.0
_FLOW_OPTIONS = ("timestep_shift", "shift")



# -- math: sin-cos tables ------------------------------------------------------------------------

def sincos_positions(count: int, base: int, scale: float) -> torch.Tensor:
    """Positions of a grid axis of `count` tokens as diffusers builds them: i * base / count / scale."""
    return torch.arange(count, dtype=torch.float64) / (count / base) / scale


def table_window_positions(side: int, base: int, scale: float, count: int) -> torch.Tensor:
    """Positions of a centred window of `count` indices of a `side`-long sin-cos table (index j sits at
    j * base / side / scale); indices run below 0 and past side - 1 when count > side."""
    start = table_crop_start(side, count)
    return torch.arange(start, start + count, dtype=torch.float64) / (side / base) / scale


def sincos_2d_embedding(dim: int, row_positions: torch.Tensor, col_positions: torch.Tensor) -> torch.Tensor:
    """(rows * cols, dim) float32 table in diffusers' layout: [sin, cos of the column; sin, cos of the row].

    Frequencies 10000^(-k / (dim/4)) for k < dim/4; tokens in row-major order.
    """
    if dim % 4:
        raise ValueError(f"dim={dim} must be divisible by 4 for a 2D sin-cos table")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(positions: torch.Tensor) -> torch.Tensor:  # float64 angles, float32 result: the 2D table stays small
        angles = positions.double()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1).float()

    rows, cols = axis(row_positions), axis(col_positions)
    table = torch.cat(
        [cols[None, :, :].expand(len(rows), -1, -1), rows[:, None, :].expand(-1, len(cols), -1)], dim=-1
    )
    return table.reshape(-1, dim)


def table_crop_start(table_side: int, count: int) -> int:
    """First table index of a centred window of `count` (negative past the table), as diffusers crops."""
    return (table_side - count) // 2


def _resample_axis(grid: torch.Tensor, axis: int, count: int) -> torch.Tensor:
    """`count` entries along `axis` of a table side: the centred crop if it fits, else linear resampling
    of the whole side at (i + 0.5) * side / count - 0.5 (align_corners=False, ends clamped)."""
    side = grid.shape[axis]
    if count <= side:
        return grid.narrow(axis, table_crop_start(side, count), count)
    coords = ((torch.arange(count, dtype=torch.float64) + 0.5) * side / count - 0.5).clamp(0, side - 1)
    low = coords.floor().long()
    high = (low + 1).clamp(max=side - 1)
    shape = [1] * grid.ndim
    shape[axis] = count
    weight = (coords - low).to(grid.dtype).reshape(shape).to(grid.device)
    low, high = low.to(grid.device), high.to(grid.device)
    return grid.index_select(axis, low).lerp_(grid.index_select(axis, high), weight)


def interpolate_table(table: torch.Tensor, side: int, rows: int, cols: int) -> torch.Tensor:
    """(1, rows*cols, D) from a (1, side*side, D) table: a centred crop on sides that fit, bilinear
    resampling over the whole table on sides that do not (separable, float32)."""
    dim = table.shape[-1]
    grid = table.reshape(side, side, dim).float()
    grid = _resample_axis(_resample_axis(grid, 0, rows), 1, cols)
    return grid.reshape(1, rows * cols, dim).to(table.dtype)


def extrapolate_table(dim: int, side: int, base: int, scale: float, rows: int, cols: int) -> torch.Tensor:
    """(1, rows*cols, D): the sin-cos table of a side x side grid, continued past its ends at its own step."""
    return sincos_2d_embedding(dim, table_window_positions(side, base, scale, rows),
                               table_window_positions(side, base, scale, cols))[None]


# -- math: RoPE ----------------------------------------------------------------------------------

def rope_frequencies(dim: int, theta: float) -> torch.Tensor:
    """The dim/2 angular frequencies theta^(-2k/dim) of one RoPE axis (float64)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def ntk_base(theta: float, scale: float, dim: int) -> float:
    """NTK-aware base theta * s^(d/(d-2)). With d = 2 the only frequency is theta^0 = 1: base unchanged."""
    return theta if dim <= 2 else theta * scale ** (dim / (dim - 2))


def yarn_ramp(rotations: torch.Tensor, beta_fast: float, beta_slow: float) -> torch.Tensor:
    """Share kept at the original frequency: 0 below beta_slow rotations, 1 above beta_fast, linear between."""
    return ((rotations - beta_slow) / (beta_fast - beta_slow)).clamp(0.0, 1.0)


def yarn_frequencies(dim: int, theta: float, scale: float, base_length: int,
                     beta_fast: float, beta_slow: float) -> torch.Tensor:
    """NTK-by-parts: f * (ramp + (1 - ramp) / s), ramp over the rotations L f / 2pi in the base grid."""
    freqs = rope_frequencies(dim, theta)
    keep = yarn_ramp(base_length * freqs / (2 * math.pi), beta_fast, beta_slow)
    return freqs * (keep + (1 - keep) / scale)


def yarn_attention_factor(scale: float) -> float:
    """YaRN's mscale = 0.1 ln s + 1 on queries and keys (logits x mscale^2); 1 at s <= 1."""
    return 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0


def noise_kappa(sigma: float) -> float:
    """DyPE's extrapolation strength at noise level sigma: kappa = sigma^2 (1 at pure noise, 0 when clean)."""
    return float(sigma) ** 2


def correction_index(rotations: float, dim: int, theta: float, base_length: int) -> float:
    """The (fractional) index k of the RoPE frequency theta^(-2k/dim) that turns `rotations` times over
    `base_length` positions: dim ln(L / (2 pi r)) / (2 ln theta); infinite for r <= 0."""
    if rotations <= 0:
        return math.inf
    return dim * math.log(base_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def correction_range(fast: float, slow: float, dim: int, theta: float, base_length: int) -> tuple[float, float]:
    """Indices where a YaRN ramp from `fast` down to `slow` rotations starts (floored) and ends (ceiled),
    clamped to the dim/2 frequencies. DyPE's code clamps only the end there, so at kappa below ~1e-3
    (sigma < 0.03 for Flux, below any step of its schedules) its start passes the end and the ramp
    inverts; clamping both keeps the limit DyPE describes: every frequency back to the original."""
    half = dim // 2
    start, end = correction_index(fast, dim, theta, base_length), correction_index(slow, dim, theta, base_length)
    start = min(max(math.floor(start), 0), half) if math.isfinite(start) else half
    end = min(math.ceil(end), dim - 1, half) if math.isfinite(end) else min(dim - 1, half)
    return float(start), float(end)


def index_ramp(low: float, high: float, count: int) -> torch.Tensor:
    """0 up to index `low`, 1 from `high` on, linear between (a zero-width ramp gets width 0.001)."""
    if high == low:
        high = low + 0.001
    return ((torch.arange(count, dtype=torch.float64) - low) / (high - low)).clamp(0.0, 1.0)


def dype_yarn_frequencies(dim: int, theta: float, scale: float, base_length: int, kappa: float,
                          beta_fast: float, beta_slow: float,
                          gamma_fast: float = DYPE_GAMMA_FAST, gamma_slow: float = DYPE_GAMMA_SLOW) -> torch.Tensor:
    """DyPE's vision YaRN: PI -> NTK over the beta ramp, then -> the original frequencies over the gamma
    ramp, every ramp end (in rotations) multiplied by kappa."""
    original = rope_frequencies(dim, theta)
    interpolated = original / scale
    ntk = rope_frequencies(dim, ntk_base(theta, scale, dim))
    half = dim // 2
    to_ntk = 1 - index_ramp(*correction_range(beta_fast * kappa, beta_slow * kappa, dim, theta, base_length), half)
    freqs = interpolated * (1 - to_ntk) + ntk * to_ntk
    to_original = 1 - index_ramp(*correction_range(gamma_fast * kappa, gamma_slow * kappa,
                                                   dim, theta, base_length), half)
    return freqs * (1 - to_original) + original * to_original


def dype_ntk_factor(scale: float, dim: int, kappa: float) -> float:
    """DyPE's NTK: theta is multiplied by (s^(d/(d-2)))^(2 kappa), never below 1."""
    base = scale ** (dim / (dim - 2)) if dim > 2 else 1.0
    return max(1.0, base ** (2.0 * kappa))


def dype_axis_frequencies(method: str, dim: int, theta: float, scale: float, base_length: int, kappa: float,
                          beta_fast: float, beta_slow: float) -> tuple[torch.Tensor, float]:
    """(frequencies, cos/sin multiplier) of one RoPE axis under DyPE at strength `kappa`."""
    if method == "yarn":
        return (dype_yarn_frequencies(dim, theta, scale, base_length, kappa, beta_fast, beta_slow),
                yarn_attention_factor(scale))
    if method == "ntk":
        return rope_frequencies(dim, theta * dype_ntk_factor(scale, dim, kappa)), 1.0
    raise ValueError(f"timestep-dependent rope method={method!r}; use 'yarn' or 'ntk'")


def axis_frequencies(method: str, dim: int, theta: float, scale: float, base_length: int,
                     beta_fast: float, beta_slow: float) -> tuple[torch.Tensor, float]:
    """(frequencies, cos/sin multiplier) of one RoPE axis whose extent grew by `scale`."""
    if method == "interpolation":
        return rope_frequencies(dim, theta) / scale, 1.0
    if method == "ntk":
        return rope_frequencies(dim, ntk_base(theta, scale, dim)), 1.0
    if method == "yarn":
        return yarn_frequencies(dim, theta, scale, base_length, beta_fast, beta_slow), yarn_attention_factor(scale)
    raise ValueError(f"rope method={method!r}; use 'interpolation', 'ntk' or 'yarn'")


def rotary_cos_sin(positions: torch.Tensor, freqs: torch.Tensor,
                   mscale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, dim) float32 cos and sin, each frequency repeated for its pair of channels (Flux's layout)."""
    angles = torch.outer(positions.to(freqs.dtype), freqs.to(positions.device))
    cos = angles.cos().repeat_interleave(2, dim=1) * mscale
    sin = angles.sin().repeat_interleave(2, dim=1) * mscale
    return cos.float(), sin.float()


# -- resolving a config for one model --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ResolvedPositions:
    """PositionConfig with family defaults filled in, for one model."""

    rope: str | None
    yarn_beta_fast: float | None
    yarn_beta_slow: float | None
    table: str | None
    interpolation_scale: float | None  # None: the model's own
    timestep_shift: str | None
    shift: float | None
    timestep_dependent: bool = False


def resolve(config: PositionConfig, info) -> ResolvedPositions:
    """Fill `None` fields with the family defaults; options that do nothing on this family are errors."""
    encoding = info.family.position_encoding
    if encoding not in _ENCODING_OPTIONS:
        raise ValueError(f"PositionConfig: family {info.name!r} has position encoding {encoding!r}, which hires "
                         f"cannot rescale; supported encodings: {', '.join(_ENCODING_OPTIONS)}")
    valid = _ENCODING_OPTIONS[encoding] + (_FLOW_OPTIONS if info.prediction_type == "flow" else ())
    for field in dataclasses.fields(PositionConfig):
        if field.name == "enabled" or getattr(config, field.name) is None or field.name in valid:
            continue
        users = [name for name, options in _ENCODING_OPTIONS.items() if field.name in options]
        where = f"families encoding positions as {users[0]!r}" if users else "flow-matching families (SD3, Flux)"
        raise ValueError(f"PositionConfig.{field.name}={getattr(config, field.name)!r} does not apply to family "
                         f"{info.name!r}; it acts on {where}. Options for {info.name!r}: {', '.join(valid)}")

    def pick(name):
        if name not in valid:
            return None
        value = getattr(config, name)
        return DEFAULTS.get(name) if value is None else value

    resolved = ResolvedPositions(
        rope=pick("rope"), yarn_beta_fast=pick("yarn_beta_fast"), yarn_beta_slow=pick("yarn_beta_slow"),
        table=pick("table"), interpolation_scale=pick("interpolation_scale"),
        timestep_shift=pick("timestep_shift") if config.shift is None else "static", shift=pick("shift"),
        timestep_dependent=bool(pick("timestep_dependent")),
    )
    if resolved.timestep_dependent and resolved.rope not in ("yarn", "ntk"):
        raise ValueError(f"PositionConfig.timestep_dependent=True (DyPE) needs rope='yarn' or 'ntk', got "
                         f"rope={resolved.rope!r}")
    if resolved.timestep_dependent and info.prediction_type != "flow":
        raise ValueError(f"PositionConfig.timestep_dependent=True (DyPE) "
                         f"follows a flow-matching model's sigma; family "
                         f"{info.name!r} predicts {info.prediction_type!r}")
    if resolved.rope is not None and resolved.rope != "yarn" and (config.yarn_beta_fast,
                                                                  config.yarn_beta_slow) != (None, None):
        raise ValueError(f"PositionConfig.yarn_beta_fast/yarn_beta_slow=({config.yarn_beta_fast}, "
                         f"{config.yarn_beta_slow}) "
                         f"set with rope={resolved.rope!r}; the ramp ends act only with rope='yarn'")
    if resolved.rope == "yarn":
        fast, slow = resolved.yarn_beta_fast, resolved.yarn_beta_slow
        if not (isinstance(fast, (int, float)) and isinstance(slow, (int, float)) and fast > slow > 0):
            raise ValueError(f"PositionConfig.yarn_beta_fast={fast!r}, yarn_beta_slow={slow!r}: need "
                             "yarn_beta_fast > yarn_beta_slow > 0 (rotations over the base grid), e.g. 1.25 and 0.75")
    return resolved


# -- hooks -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class _PositionsCall:
    binning_checked: bool = False
    shift_checked: bool = False
    tables: dict = dataclasses.field(default_factory=dict)  # extended SD3 tables, by grid, device and dtype
    rope: list = dataclasses.field(default_factory=list)  # (ids, (cos, sin), kappa) of this call's id sets

def _pipeline_call_locals(attachment) -> dict[str, Any] | None:
    """Locals of the running pipeline call (its resolved arguments), or None outside a call."""
    call = attachment.calls.current(sys._getframe(2))
    return call.locals if call is not None else None


def _find_module(denoiser: torch.nn.Module, kind: type | tuple[type, ...], what: str) -> torch.nn.Module:
    found = [m for m in denoiser.modules() if isinstance(m, kind)]
    if len(found) != 1:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"PositionConfig: expected one {what} ({names}) in {type(denoiser).__name__}, "
                         f"found {len(found)}; hires cannot place positions in this model")
    return found[0]


class _ResolutionBinningCheck(ModelHook):
    """Refuses a call the pipeline snapped to a resolution bin: it would denoise at the bin size."""

    def __init__(self, attachment):
        super().__init__()
        self.attachment = attachment

    def pre_forward(self, module, *args, **kwargs):
        state = self.attachment.state
        if state is not None and not state.slot(_PositionsCall).binning_checked:
            state.slot(_PositionsCall).binning_checked = True
            values = _pipeline_call_locals(self.attachment) or {}
            requested = (values.get("orig_height"), values.get("orig_width"))
            if values.get("use_resolution_binning") and requested != (state.height, state.width):
                raise ValueError(
                    f"use_resolution_binning=True (the {type(self.attachment.pipe).__name__} default) snapped the "
                    f"requested {requested[0]}x{requested[1]} to the bin {state.height}x{state.width}, so the model "
                    f"would denoise near its base size and resize the result. Pass use_resolution_binning=False to "
                    f"denoise at {requested[0]}x{requested[1]} with hires"
                )
        return args, kwargs


class _SincosScaleHook(ModelHook):
    """PixArt's PatchEmbed: the sin-cos scale used off the native grid, set only for the forward call."""

    def __init__(self, attachment, scale: float):
        super().__init__()
        self.attachment = attachment
        self.scale = scale

    def new_forward(self, module, *args, **kwargs):
        if self.attachment.state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        saved = module.interpolation_scale
        module.interpolation_scale = self.scale
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            module.interpolation_scale = saved


class _TableExtensionHook(ModelHook):
    """SD3's PatchEmbed: `cropped_pos_embed` extended past the table, shadowed only during the forward call."""

    def __init__(self, attachment, mode: str):
        super().__init__()
        self.attachment = attachment
        self.mode = mode

    def new_forward(self, module, *args, **kwargs):
        if self.attachment.state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        original = module.cropped_pos_embed

        def cropped_pos_embed(height, width):
            rows, cols = height // module.patch_size, width // module.patch_size
            side = module.pos_embed_max_size
            if rows <= side and cols <= side:
                return original(height, width)
            # the same grid every step: build the extended table once per call
            state = self.attachment.state
            tables = state.slot(_PositionsCall).tables
            key = (rows, cols, module.pos_embed.device, module.pos_embed.dtype)
            if key not in tables:
                tables[key] = extended_table(module, self.mode, rows, cols)
                state.log["log.positions.table"] = (self.mode, rows, cols, side)
            return tables[key]

        entry = self.attachment.shadow(module, "cropped_pos_embed", cropped_pos_embed)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.attachment.unshadow(entry)


def extended_table(module: PatchEmbed, mode: str, rows: int, cols: int) -> torch.Tensor:
    """(1, rows*cols, D) positions of a grid past `module`'s table, interpolated or extrapolated (`mode`), on
    the table's device and in its dtype."""
    side = module.pos_embed_max_size
    if mode == "interpolate":
        table = interpolate_table(module.pos_embed, side, rows, cols)
    else:
        table = extrapolate_table(module.pos_embed.shape[-1], side, module.base_size, module.interpolation_scale,
                                  rows, cols)
    return table.to(device=module.pos_embed.device, dtype=module.pos_embed.dtype)


@dataclasses.dataclass(frozen=True)
class TableExtension:
    """What the memory planner's meta-device copy of an SD3 transformer must do to follow this technique:
    take grids past the table, as `_TableExtensionHook` lets the real one."""

    mode: str

    @contextlib.contextmanager
    def __call__(self, model: torch.nn.Module):
        patched = [m for m in model.modules() if isinstance(m, PatchEmbed) and m.pos_embed_max_size]
        for module in patched:
            original = module.cropped_pos_embed

            def cropped_pos_embed(height, width, module=module, original=original):
                rows, cols = height // module.patch_size, width // module.patch_size
                if rows <= module.pos_embed_max_size and cols <= module.pos_embed_max_size:
                    return original(height, width)
                return extended_table(module, self.mode, rows, cols)

            module.cropped_pos_embed = cropped_pos_embed
        try:
            yield model
        finally:
            for module in patched:
                del module.cropped_pos_embed


def estimate_adaptation(info, config: PositionConfig):
    """The record's `adapts_estimate`: what the memory planner's meta-device denoiser must do to follow
    `config` on `info`'s family (None: nothing, its positions change no shape)."""
    make = _ESTIMATE_ADAPTATIONS.get(info.family.position_encoding)
    return None if make is None else make(resolve(config, info))


def check_sincos_table(module: PatchEmbed) -> None:
    """`table='extrapolate'` continues a formula: the stored table must be it (checked on a row, a column
    and the diagonal of the grid, which covers both halves of every table entry's channels)."""
    side, dim = module.pos_embed_max_size, module.pos_embed.shape[-1]
    table = module.pos_embed.detach().float().cpu().reshape(side, side, dim)
    positions = sincos_positions(side, module.base_size, module.interpolation_scale)
    index = torch.arange(side)
    samples = {"first row": (torch.zeros_like(index), index), "first column": (index, torch.zeros_like(index)),
               "diagonal": (index, index)}
    tolerance = 1e-4 if module.pos_embed.dtype == torch.float32 else 1e-2
    for name, (rows, cols) in samples.items():
        expected = torch.stack([sincos_2d_embedding(dim, positions[r : r + 1], positions[c : c + 1])[0]
                                for r, c in zip(rows.tolist(), cols.tolist())])
        error = (table[rows, cols] - expected).abs().max().item()
        if error > tolerance:
            raise ValueError(
                f"PositionConfig.table='extrapolate' continues the sin-cos formula past the table, but this "
                f"model's stored pos_embed differs from it (max error {error:.3g} on the {name}); use "
                f"table='interpolate', which resamples any stored table"
            )


def axis_scales(axis_sides, state) -> list[float | None]:
    """Per RoPE axis, the call's scale on the side it counts where that side grew (else None)."""
    side_scale = {"height": state.scale_height, "width": state.scale_width}
    scales = []
    for side in axis_sides:
        scale = side_scale.get(side) if side else None
        scales.append(scale if scale is not None and scale > 1 else None)
    return scales


class _RopeHook(ModelHook):
    """Flux's FluxPosEmbed: row and column axes rescaled by the call's scale on that side."""

    def __init__(self, attachment, settings: ResolvedPositions):
        super().__init__()
        self.attachment = attachment
        self.settings = settings
        unit = attachment.info.token_side
        self.base_lengths = {"height": attachment.info.base_height // unit,
                             "width": attachment.info.base_width // unit}
        self.axis_sides = attachment.info.family.layout.id_axes

    def axis_scales(self, state) -> list[float | None]:
        return axis_scales(self.axis_sides, state)

    def new_forward(self, module, ids, *args, **kwargs):
        state = self.attachment.state
        scales = self.axis_scales(state) if state is not None else []
        if not any(scales):
            return self.fn_ref.original_forward(ids, *args, **kwargs)
        # every step of a call passes the same ids: compute once per call (DyPE: once per noise level);
        # Flux.2 embeds its image ids and its text ids in two calls: one entry each
        kappa = self.step_kappa(state) if self.settings.timestep_dependent else None
        cache = state.slot(_PositionsCall).rope
        for cached_ids, cached, cached_kappa in cache:
            if (cached_ids.shape == ids.shape and cached_ids.device == ids.device and cached_kappa == kappa
                    and torch.equal(cached_ids, ids)):
                return cached
        positions = ids.float()
        freqs_dtype = torch.float32 if ids.device.type in ("mps", "npu") else torch.float64
        cos_parts, sin_parts, used = [], [], []
        for axis, dim in enumerate(module.axes_dim):
            scale = scales[axis] if axis < len(scales) else None
            if scale is None:
                cos, sin = get_1d_rotary_pos_embed(dim, positions[:, axis], theta=module.theta,
                                                   repeat_interleave_real=True, use_real=True, freqs_dtype=freqs_dtype)
            else:
                side = self.axis_sides[axis]
                if kappa is None:
                    freqs, mscale = axis_frequencies(self.settings.rope, dim, module.theta,
                                                     scale, self.base_lengths[side],
                                                     self.settings.yarn_beta_fast, self.settings.yarn_beta_slow)
                else:
                    freqs, mscale = dype_axis_frequencies(self.settings.rope, dim, module.theta, scale,
                                                          self.base_lengths[side], kappa,
                                                          self.settings.yarn_beta_fast, self.settings.yarn_beta_slow)
                cos, sin = rotary_cos_sin(positions[:, axis], freqs.to(freqs_dtype), mscale)
                used.append((axis, scale, mscale))
            cos_parts.append(cos)
            sin_parts.append(sin)
        state.log["log.positions.rope"] = (self.settings.rope, tuple(used))
        if kappa is not None:
            state.log.setdefault("log.positions.dype", []).append((state.step_index, kappa))
        result = torch.cat(cos_parts, dim=-1).to(ids.device), torch.cat(sin_parts, dim=-1).to(ids.device)
        cache[:] = [entry for entry in cache if entry[2] == kappa]  # DyPE: older noise levels are done
        cache.append((ids.clone(), result, kappa))
        return result

    def step_kappa(self, state) -> float:
        """kappa = sigma^2 of the step the denoiser runs (the call-state hook, outermost, set the index)."""
        if not state.num_steps:
            raise RuntimeError("PositionConfig.timestep_dependent=True (DyPE) needs the call's schedule, but the "
                               "scheduler had no timesteps when the denoising loop started")
        timestep = state.timesteps[min(max(state.step_index, 0), state.num_steps - 1)]
        return noise_kappa(float(flow_sigma(self.attachment.pipe.scheduler, timestep)))


def centred_positions(count: int) -> torch.Tensor:
    """QwenEmbedRope's positions along a side of `count` tokens (scale_rope=True): -(n - n//2) .. n//2 - 1."""
    return torch.arange(count, dtype=torch.float64) - (count - count // 2)


class _CentredRopeHook(_RopeHook):
    """Qwen-Image's QwenEmbedRope: the row and column axes of image and text rescaled by the call's scale."""

    def new_forward(self, module, video_fhw, *args, **kwargs):
        state = self.attachment.state
        scales = self.axis_scales(state) if state is not None else []
        if not any(scales) or not module.scale_rope:
            return self.fn_ref.original_forward(video_fhw, *args, **kwargs)
        device = kwargs.get("device", args[0] if args else None)
        text_length = kwargs.get("max_txt_seq_len", args[1] if len(args) > 1 else None)
        shapes = video_fhw[0] if isinstance(video_fhw, list) else video_fhw
        shapes = shapes if isinstance(shapes, list) else [shapes]
        key = (tuple(tuple(int(v) for v in fhw) for fhw in shapes), int(text_length), str(device))
        cache = state.slot(_PositionsCall).rope  # (key, result, None) entries, beside Flux-style (ids, result, kappa)
        for cached_key, cached, _ in cache:
            if cached_key == key:
                return cached
        if len(shapes) != 1 or int(shapes[0][0]) != 1:
            raise ValueError(f"PositionConfig on {type(self.attachment.denoiser).__name__}: "
                             f"image shapes {shapes} hold "
                             "more than one image or frame; hires rescales the positions of one image")
        _, rows, cols = (int(v) for v in shapes[0])
        text_start = max(rows // 2, cols // 2)
        text_positions = torch.arange(text_start, text_start + int(text_length), dtype=torch.float64)
        own = module.pos_freqs.split([d // 2 for d in module.axes_dim], dim=1)
        own_negative = module.neg_freqs.split([d // 2 for d in module.axes_dim], dim=1)
        counts = {"height": rows, "width": cols}
        image_parts, text_parts, used = [], [], []
        for axis, dim in enumerate(module.axes_dim):
            scale = scales[axis] if axis < len(scales) else None
            side = self.axis_sides[axis] if axis < len(self.axis_sides) else None
            if scale is None:
                if side is None:  # the frame axis: frame 0 for every image token
                    image = own[axis][:1].expand(rows * cols, -1)
                else:  # the model's own rotations, from its tables of negative and positive positions
                    count = counts[side]
                    image = torch.cat([own_negative[axis][len(own_negative[axis]) - (count - count // 2):],
                                       own[axis][: count // 2]], dim=0)
                    image = _grid_axis(image, side, rows, cols)
                text = own[axis][text_start : text_start + int(text_length)]
            else:
                freqs, mscale = axis_frequencies(self.settings.rope, dim, module.theta, scale, self.base_lengths[side],
                                                 self.settings.yarn_beta_fast, self.settings.yarn_beta_slow)
                image = _grid_axis(_rotations(centred_positions(counts[side]), freqs, mscale), side, rows, cols)
                text = _rotations(text_positions, freqs, mscale)
                used.append((axis, scale, mscale))
            image_parts.append(image)
            text_parts.append(text)
        state.log["log.positions.rope"] = (self.settings.rope, tuple(used))
        result = (torch.cat(image_parts, dim=-1).to(device), torch.cat(text_parts, dim=-1).to(device))
        cache.append((key, result, None))
        return result


class _RopeTables:
    """Stands in for Z-Image's RopeEmbedder: rotations of the row and column axes rescaled by the call's
    scale on that side; the sequence axis, and every call outside a pipeline call or at the base
    size, the model's own."""

    def __init__(self, attachment, settings: ResolvedPositions, original):
        self.attachment = attachment
        self.settings = settings
        self.original = original
        unit = attachment.info.token_side
        self.base_lengths = {"height": attachment.info.base_height // unit,
                             "width": attachment.info.base_width // unit}
        self.axis_sides = attachment.info.family.layout.id_axes

    def __getattr__(self, name):  # theta, axes_dims, axes_lens, freqs_cis: the model's own
        if name == "original":
            raise AttributeError(name)
        return getattr(self.original, name)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        state = self.attachment.state
        scales = axis_scales(self.axis_sides, state) if state is not None else []
        if not any(scales):
            return self.original(ids)
        parts, used = [], []
        theta = float(self.original.theta)
        for axis, dim in enumerate(self.original.axes_dims):
            scale = scales[axis] if axis < len(scales) else None
            positions = ids[:, axis].to(torch.float64).cpu()
            if scale is None:  # as the model's table holds it: float64 angles cast to float32
                angles = torch.outer(positions, rope_frequencies(dim, theta)).float()
                parts.append(torch.polar(torch.ones_like(angles), angles))
            else:
                side = self.axis_sides[axis]
                freqs, mscale = axis_frequencies(self.settings.rope, dim, theta, scale, self.base_lengths[side],
                                                 self.settings.yarn_beta_fast, self.settings.yarn_beta_slow)
                parts.append(_rotations(positions, freqs, mscale))
                used.append((axis, scale, mscale))
        state.log["log.positions.rope"] = (self.settings.rope, tuple(used))
        return torch.cat(parts, dim=-1).to(ids.device)


def _rotations(positions: torch.Tensor, freqs: torch.Tensor, mscale: float) -> torch.Tensor:
    """(len(positions), len(freqs)) complex64 rotations exp(i p f), of modulus `mscale`."""
    angles = torch.outer(positions, freqs)
    return torch.polar(torch.full_like(angles, mscale), angles).to(torch.complex64)


def _grid_axis(values: torch.Tensor, side: str, rows: int, cols: int) -> torch.Tensor:
    """Per-row (side "height") or per-column values spread over the row-major token grid."""
    grid = values[:, None, :].expand(rows, cols, -1) if side == "height" else values[None, :, :].expand(rows, cols, -1)
    return grid.reshape(rows * cols, -1)


class _TimestepShiftHook(ModelHook):
    """Owns the wrapper on the scheduler's `set_timesteps` (installed at registration, restored at removal)."""

    def __init__(self, attachment, policy: str, shift: float | None):
        super().__init__()
        self.attachment = attachment
        self.policy = policy
        self.shift = shift
        self.scheduler = attachment.pipe.scheduler
        self.decision: dict[str, Any] | None = None
        config = self.scheduler.config
        self.dynamic = bool(config.get("use_dynamic_shifting", False))
        if self.dynamic and "mu" not in inspect.signature(self.scheduler.set_timesteps).parameters:
            raise ValueError(f"PositionConfig.timestep_shift={policy!r} needs a scheduler whose set_timesteps takes "
                             f"mu; {type(self.scheduler).__name__} does not (FlowMatchEulerDiscreteScheduler does)")
        if not self.dynamic and policy == "static" and shift is not None and not hasattr(self.scheduler, "set_shift"):
            raise ValueError(f"PositionConfig.timestep_shift='static' needs a scheduler with set_shift; "
                             f"{type(self.scheduler).__name__} has none (FlowMatchEulerDiscreteScheduler has)")

    def initialize_hook(self, module):
        self.attachment.wrap_method(self.scheduler, "set_timesteps", self._wrap)
        return module

    def _wrap(self, original: Callable) -> Callable:
        signature = inspect.signature(original)
        info = self.attachment.info

        def set_timesteps(*args, **kwargs):
            self.decision = None
            values = _pipeline_call_locals(self.attachment)
            if values is None or values.get("height") is None or values.get("width") is None:
                return original(*args, **kwargs)
            unit = info.token_side
            tokens = (int(values["height"]) // unit) * (int(values["width"]) // unit)
            if tokens <= info.base_tokens:
                return original(*args, **kwargs)
            scheduler = self.scheduler
            if self.dynamic:
                bound = signature.bind(*args, **kwargs)
                mu = bound.arguments.get("mu")
                if mu is None:
                    return original(*args, **kwargs)
                steps = values.get("num_inference_steps")
                if steps is None and bound.arguments.get("sigmas") is not None:
                    steps = len(bound.arguments["sigmas"])
                if self.policy == "clamp":
                    new_mu = clamped_mu(mu, info, scheduler.config, steps)
                elif self.shift is None:
                    new_mu = base_size_mu(info, scheduler.config, steps)
                else:
                    new_mu = static_shift_mu(scheduler, self.shift)
                bound.arguments["mu"] = new_mu
                self.decision = {"policy": self.policy, "tokens": tokens, "mu": mu, "applied_mu": new_mu}
                return original(*bound.args, **bound.kwargs)
            if self.policy == "static" and self.shift is not None:
                with static_shift(scheduler, self.shift) as saved_shift:
                    result = original(*args, **kwargs)
                self.decision = {"policy": "static", "tokens": tokens,
                                 "shift": saved_shift, "applied_shift": self.shift}
                return result
            return original(*args, **kwargs)

        return set_timesteps

    def pre_forward(self, module, *args, **kwargs):
        state = self.attachment.state
        if state is not None and not state.slot(_PositionsCall).shift_checked:
            state.slot(_PositionsCall).shift_checked = True
            if self.attachment.pipe.scheduler is not self.scheduler:
                raise RuntimeError(
                    f"pipe.scheduler was replaced after hires.apply, so PositionConfig.timestep_shift="
                    f"{self.policy!r} is attached to the old one; call hires.apply(pipe, config) again after "
                    "changing the scheduler"
                )
            if self.decision is not None:
                state.log["log.positions.timestep_shift"] = dict(self.decision)
        return args, kwargs


# -- installer --------------------------------------------------------------------------------------

def _install_sincos_interpolated(attachment, settings: ResolvedPositions) -> None:
    module = _find_module(attachment.denoiser, PatchEmbed, "patch embedding")
    if settings.interpolation_scale is not None and settings.interpolation_scale != module.interpolation_scale:
        attachment.add_hook(module, _SincosScaleHook(attachment, float(settings.interpolation_scale)),
                            HOOK + ".sincos_scale")


def _install_cropped_table(attachment, settings: ResolvedPositions) -> None:
    module = _find_module(attachment.denoiser, PatchEmbed, "patch embedding")
    if not module.pos_embed_max_size:
        raise ValueError(f"PositionConfig.table={settings.table!r}: {type(attachment.denoiser).__name__}'s patch "
                         "embedding has no pos_embed_max_size table to extend")
    if settings.table == "extrapolate":
        check_sincos_table(module)
    attachment.add_hook(module, _TableExtensionHook(attachment, settings.table), HOOK + ".table")


def _install_rope(attachment, settings: ResolvedPositions) -> None:
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    module = _find_module(attachment.denoiser, (FluxPosEmbed, Flux2PosEmbed), "rotary position embedding")
    if settings.rope != "none":
        attachment.add_hook(module, _RopeHook(attachment, settings), HOOK + ".rope")


def _install_centred_rope(attachment, settings: ResolvedPositions) -> None:
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    module = _find_module(attachment.denoiser, QwenEmbedRope, "rotary position embedding")
    if settings.rope != "none":
        attachment.add_hook(module, _CentredRopeHook(attachment, settings), HOOK + ".rope")


def _install_rope_tables(attachment, settings: ResolvedPositions) -> None:
    denoiser = attachment.denoiser
    original = getattr(denoiser, "rope_embedder", None)
    if original is None or not hasattr(original, "axes_dims"):
        raise ValueError(f"PositionConfig: {type(denoiser).__name__} has no rope_embedder with axes_dims; hires "
                         "cannot place positions in this model")
    if settings.rope != "none":
        attachment.shadow(denoiser, "rope_embedder", _RopeTables(attachment, settings, original))


_INSTALLERS = {
    "sincos_interpolated": _install_sincos_interpolated,
    "sincos_cropped_table": _install_cropped_table,
    "rope": _install_rope,
    "rope_centred": _install_centred_rope,
    "rope_id_tables": _install_rope_tables,
}


# Encodings whose positions decide what shapes the denoiser takes: SD3's cropped table refuses larger grids.
_ESTIMATE_ADAPTATIONS = {"sincos_cropped_table": lambda settings: TableExtension(settings.table)}


def install(attachment, config: PositionConfig) -> None:
    """Hook the denoiser's position module (and the flow scheduler's shift) for `config`."""
    settings = resolve(config, attachment.info)
    if "use_resolution_binning" in attachment.calls.parameters:
        attachment.add_hook(attachment.denoiser, _ResolutionBinningCheck(attachment), HOOK + ".binning_check")
    _INSTALLERS[attachment.info.family.position_encoding](attachment, settings)
    if settings.timestep_shift is not None and settings.timestep_shift != "dynamic":
        attachment.add_hook(attachment.denoiser,
                            _TimestepShiftHook(attachment, settings.timestep_shift, settings.shift),
                            HOOK + ".timestep_shift")
