"""The re-dilation configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ...validation import factor_map, option, require_unet, typed


@typed
@dataclasses.dataclass(frozen=True)
class RedilationConfig:
    """Re-dilated / dispersed convolutions and noise-damped guidance (ScaleCrafter), UNets only.

    `None` fields take the family's preset for the requested size (see hires.techniques.redilation.dilation).
    """

    enabled: bool = False
    # module name (or block prefix such as "mid_block") -> dilation factor (fractional allowed, >= 1)
    dilations: Any = None
    # dilation is active while the step's fraction of the schedule is below this...
    stop_fraction: float | None = option(None, low=0, high=1, low_open=True)
    # ...or, instead, while the scheduler timestep is at least this (give one or the other)
    min_timestep: float | None = option(None, low=0)
    progressive: bool | None = None  # decay the factor over the active steps, never below 2
    # dispersed convolution: 3x3 kernels mapped to 5x5 by the least-squares map, on these modules
    dispersion_modules: tuple[str, ...] | None = None
    dispersion_stop_fraction: float | None = option(None, low=0, high=1)
    dispersion_eta: float = option(0.05, low=0)  # weight of the pixel-level term
    # noise-damped guidance: weak-dilation uncond + w * (strong cond - strong uncond)
    noise_damped_guidance: bool | None = None
    ndcfg_dilations: Any = None
    ndcfg_stop_fraction: float | None = option(None, low=0, high=1)

    def __post_init__(self):
        owner = "RedilationConfig"
        object.__setattr__(self, "dilations", factor_map(owner, "dilations", self.dilations, 1.0))
        object.__setattr__(self, "ndcfg_dilations", factor_map(owner, "ndcfg_dilations", self.ndcfg_dilations, 1.0))
        if self.stop_fraction is not None and self.min_timestep is not None:
            raise ValueError(
                f"{owner}: stop_fraction={self.stop_fraction} and min_timestep={self.min_timestep} conflict; "
                "give one (fraction of the schedule) or the other (timestep threshold)"
            )
        if self.dispersion_modules is not None:
            object.__setattr__(self, "dispersion_modules", tuple(self.dispersion_modules))

    def validate_for(self, info) -> None:
        require_unet("RedilationConfig", info,
                     "EntropyScalingConfig, PositionConfig or progressive structure guidance")
