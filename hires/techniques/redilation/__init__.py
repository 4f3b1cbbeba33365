"""Re-dilated and dispersed convolutions and noise-damped guidance (ScaleCrafter), UNets only (mechanism:
`dilation`; the official presets: `presets`; the dispersion map: `dispersion`)."""

from ...registry import Technique
from .config import RedilationConfig

TECHNIQUE = Technique("redilation", RedilationConfig, f"{__name__}.dilation:install", order=30)
