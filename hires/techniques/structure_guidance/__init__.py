"""Progressive structure guidance (DiffuseHigh): base size -> upscale -> re-noise -> guided denoise, as stages of
the stage engine (mechanism: `guidance`)."""

from ...registry import Technique
from .config import StructureGuidanceConfig

TECHNIQUE = Technique("structure_guidance", StructureGuidanceConfig, f"{__name__}.guidance:install", order=10,
                      capabilities={"stages"}, planner=f"{__name__}.guidance:StructureGuidance")
