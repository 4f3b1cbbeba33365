"""Adaptive projected guidance (APG) for pipelines running CFG (mechanism: `combiner`)."""

from ...registry import Technique
from .config import APGConfig

TECHNIQUE = Technique("apg", APGConfig, f"{__name__}.combiner:install", order=70, capabilities={"whole_cfg_batch"})
