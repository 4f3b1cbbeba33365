"""Bottleneck sampling: high -> low -> high resolution stages with re-noising (mechanism: `slices`)."""

from ...registry import Technique
from .config import BottleneckConfig

TECHNIQUE = Technique("bottleneck", BottleneckConfig, install=None, order=20, capabilities={"stages"},
                      planner=f"{__name__}.slices:Bottleneck")
