"""The positional-extrapolation configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses

from ...validation import option, typed


@typed
@dataclasses.dataclass(frozen=True)
class PositionConfig:
    """Positional extrapolation for diffusion transformers (PixArt-Sigma, SD3, Flux).

    `None` fields take the family default (see hires.techniques.positions.encodings).
    """

    enabled: bool = False
    # Flux RoPE: "none" (plain integer positions), "interpolation" (PI), "ntk" (NTK-aware base), "yarn"
    rope: str | None = option(None, choices=("none", "interpolation", "ntk", "yarn"))
    # YaRN ramp ends, in rotations over the base grid
    yarn_beta_fast: float | None = option(None, low=0, low_open=True)
    yarn_beta_slow: float | None = option(None, low=0, low_open=True)
    # SD3's learned table past pos_embed_max_size: "interpolate" (resize the table) or "extrapolate"
    table: str | None = option(None, choices=("interpolate", "extrapolate"))
    # PixArt-Sigma's sin-cos interpolation scale (positions are i * base / N / scale)
    interpolation_scale: float | None = option(None, low=0, low_open=True)
    # flow families' timestep shift at high token counts: "dynamic" (diffusers' own, unbounded),
    # "clamp" (dynamic mu clamped to its value at the base size), "static" (a fixed shift)
    timestep_shift: str | None = option(None, choices=("dynamic", "clamp", "static"))
    shift: float | None = option(None, low=0, low_open=True)  # for timestep_shift="static"
    # RoPE families, DyPE: the YaRN ramps / NTK factor follow the noise level of each step
    # (kappa = sigma^2: full extrapolation at pure noise, fading as sigma -> 0); None: off
    timestep_dependent: bool | None = None

    def __post_init__(self):
        owner = "PositionConfig"
        if self.timestep_dependent and self.rope in ("none", "interpolation"):
            raise ValueError(f"{owner}.timestep_dependent=True (DyPE) scales the YaRN ramps or the NTK factor by the "
                             f"noise level; rope={self.rope!r} has neither. Use rope='yarn' (DyPE's default) or 'ntk'")
        if self.shift is not None and self.timestep_shift not in (None, "static"):
            raise ValueError(f"{owner}.shift={self.shift} conflicts with timestep_shift={self.timestep_shift!r}; "
                             "a fixed shift needs timestep_shift='static'")
        betas = (self.yarn_beta_fast, self.yarn_beta_slow)
        if any(b is not None for b in betas):
            if self.rope not in (None, "yarn"):
                raise ValueError(f"{owner}: yarn_beta_fast/yarn_beta_slow={betas} act only with rope='yarn' "
                                 f"(got rope={self.rope!r}); use rope='yarn' or drop them")
            if None not in betas and not betas[0] > betas[1]:
                raise ValueError(f"{owner}: needs yarn_beta_fast > yarn_beta_slow > 0 (rotations over the base grid), "
                                 f"got yarn_beta_fast={betas[0]!r}, yarn_beta_slow={betas[1]!r}")

    def validate_for(self, info) -> None:
        if info.family.is_unet:
            raise ValueError(
                f"PositionConfig changes a diffusion transformer's positional encoding; family {info.name!r} "
                "is a UNet and has none. For UNets use RedilationConfig, EntropyScalingConfig or progressive "
                "structure guidance"
            )
