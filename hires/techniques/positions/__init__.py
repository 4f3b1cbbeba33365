"""Positional extrapolation for diffusion transformers and the flow timestep-shift policy (mechanism:
`encodings`)."""

from ...registry import Technique
from .config import PositionConfig

TECHNIQUE = Technique("positions", PositionConfig, f"{__name__}.encodings:install", order=80,
                      adapts_estimate=f"{__name__}.encodings:estimate_adaptation")
