"""DemoFusion's skip residual: each step of an upscaled stage blended toward its noised start (mechanism: `blend`)."""

from ...registry import Technique
from .config import SkipResidualConfig

# After the staged planners (structure guidance 10, bottleneck 20), so their stages are planned first.
TECHNIQUE = Technique("skip_residual", SkipResidualConfig, install=None, order=25,
                      planner=f"{__name__}.blend:SkipResidual", requires={
    "stages": "it blends into stages that start from an upscaled result (structure guidance's, e.g. "
              "StructureGuidanceConfig(enabled=True, renoise=0.7), or bottleneck's)"})
