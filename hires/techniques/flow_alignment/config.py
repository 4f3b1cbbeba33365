"""The flow-alignment configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ...validation import Bounds, option, per_stage, typed


@typed
@dataclasses.dataclass(frozen=True)
class FlowAlignmentConfig:
    """HiFlow's flow-aligned guidance in structure guidance's upscaled stages, flow-matching families only.

    Each step of such a stage, the predicted velocity v is aligned with the reference flow toward the
    stage's upscaled clean latent x_ref (v_ref = (x_t - x_ref) / sigma): its low band moves to v_ref's
    by alpha, then v += beta (v_prev + v_ref - v_ref_prev - v). Both weights decay linearly over the
    stage's steps, (N - i) / N. Per-stage fields take one value for every stage after the base or a
    tuple with one per stage; `None` takes HiFlow's (see hires.techniques.flow_alignment.alignment).
    """

    enabled: bool = False
    alphas: Any = None  # direction alignment per stage; None: 1.0 in the first upscaled stage, 0.25 after
    betas: Any = None  # acceleration alignment per stage; None: 0.5
    # "fft": Butterworth low-pass of the 2D FFT; "dwt": the level-1 Haar approximation
    band: str = option("fft", choices=("fft", "dwt"))
    cutoff: float = option(0.2, low=0, high=1, low_open=True)  # Butterworth cutoff, of the half-band (HiFlow: 0.2)
    order: int = option(4, low=1)  # Butterworth order (HiFlow: 4)

    def __post_init__(self):
        owner, weight = "FlowAlignmentConfig", Bounds(0, 1)
        object.__setattr__(self, "alphas", per_stage(owner, "alphas", self.alphas, weight, "a weight in [0, 1]"))
        object.__setattr__(self, "betas", per_stage(owner, "betas", self.betas, weight, "a weight in [0, 1]"))

    def validate_for(self, info) -> None:
        if info.prediction_type != "flow":
            raise ValueError(
                f"FlowAlignmentConfig aligns a flow-matching model's velocity; family {info.name!r} predicts "
                f"{info.prediction_type!r}. For {info.name!r} use StructureGuidanceConfig alone"
            )
