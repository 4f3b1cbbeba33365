"""The APG configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses
import math

from ...validation import option, typed


@typed
@dataclasses.dataclass(frozen=True)
class APGConfig:
    """Adaptive projected guidance (Sadat et al., ICLR 2025) for pipelines running CFG.

    `None` fields take the family preset (see hires.techniques.apg.combiner).
    """

    enabled: bool = False
    eta: float | None = option(None, low=0)  # weight of the guidance part parallel to the conditional prediction
    # r: the guidance update's norm is clipped to this (math.inf: off)
    norm_threshold: float | None = option(None, low=0, high=math.inf, low_open=True)
    # beta, negative for the paper's reverse momentum; 0: off
    momentum: float | None = option(None, low=-1, high=1, low_open=True, high_open=True)
    # "x0": on the denoised prediction as in the paper; "output": on the raw model output
    space: str = option("x0", choices=("x0", "output"))
    start: float = option(0.0, low=0, high=1)  # active for steps whose schedule fraction is in [start, stop)
    stop: float = option(1.0, low=0, high=1)

    def __post_init__(self):
        if self.start >= self.stop:
            raise ValueError(f"APGConfig.start={self.start} must be below APGConfig.stop={self.stop} (fractions of "
                             "the schedule)")

    def validate_for(self, info) -> None:
        if not info.family.runs_cfg:
            raise ValueError(
                f"APGConfig changes how classifier-free guidance combines, but family {info.name!r} never runs CFG "
                f"(its {info.family.guidance_scale_name} feeds a distilled guidance embedding); disable APGConfig "
                "for this model"
            )
