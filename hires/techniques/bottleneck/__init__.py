"""Bottleneck sampling: high -> low -> high resolution stages with re-noising (mechanism: `slices`)."""

from ...registry import Technique
from .config import BottleneckConfig

TECHNIQUE = Technique("bottleneck", BottleneckConfig, f"{__name__}.slices:install", order=20, capabilities={"stages"})
