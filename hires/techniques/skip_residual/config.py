"""The skip-residual configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses

from ...validation import option, typed


@typed
@dataclasses.dataclass(frozen=True)
class SkipResidualConfig:
    """DemoFusion's skip residual: each step of an upscaled stage blended toward its noised start.

    In each stage that starts from an upscaled previous result, every step's latent is blended toward
    that result noised to the step's timestep (one noise draw per stage).

    z = (1 - c1) z + c1 noised_upscaled(t), c1 = cosf(t) ** exponent (hires.techniques.skip_residual.blend).
    It acts on the stages of structure guidance (or bottleneck's upscaling stage), which must be on.
    """

    enabled: bool = False
    exponent: float = option(3.0, low=0, low_open=True)  # DemoFusion's cosine_scale_1; FreeScale uses 2.0


    def validate_for(self, info) -> None:
        return None
