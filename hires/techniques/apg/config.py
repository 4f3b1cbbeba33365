"""The apg configuration (torch-free)."""

from __future__ import annotations

import dataclasses
import math

from ...validation import choice, step_range, typed


@typed
@dataclasses.dataclass(frozen=True)
class APGConfig:
    """Adaptive projected guidance (Sadat et al., ICLR 2025) for pipelines running CFG.

    `None` fields take the family preset (see hires.techniques.apg.combiner).
    """

    enabled: bool = False
    eta: float | None = None  # weight of the guidance part parallel to the conditional prediction
    norm_threshold: float | None = None  # r: the guidance update's norm is clipped to this (math.inf: off)
    momentum: float | None = None  # beta, negative for the paper's reverse momentum; 0: off
    space: str = "x0"  # "x0": on the denoised prediction as in the paper; "output": on the raw model output
    start: float = 0.0  # active for steps whose schedule fraction is in [start, stop)
    stop: float = 1.0

    def __post_init__(self):
        owner = "APGConfig"
        choice(owner, "space", self.space, ("x0", "output"))
        step_range(owner, self.start, self.stop)
        if self.norm_threshold is not None and not (self.norm_threshold > 0):
            raise ValueError(f"{owner}.norm_threshold={self.norm_threshold!r} must be > 0 (math.inf turns clipping off)")
        if self.momentum is not None and not (-1 < self.momentum < 1):
            raise ValueError(f"{owner}.momentum={self.momentum!r} must be in (-1, 1); the paper uses negative values")
        if self.eta is not None and not (self.eta >= 0 and math.isfinite(self.eta)):
            raise ValueError(f"{owner}.eta={self.eta!r} must be a finite number >= 0")

    def validate_for(self, info) -> None:
        if not info.family.runs_cfg:
            raise ValueError(
                f"APGConfig changes how classifier-free guidance combines, but family {info.name!r} never runs CFG "
                f"(its {info.family.guidance_scale_name} feeds a distilled guidance embedding); disable APGConfig "
                "for this model"
            )
