"""Attention-entropy scaling: softmax temperature times sqrt(ln N / ln T) per layer (mechanism: `scaling`)."""

from ...registry import Technique
from .config import EntropyScalingConfig

TECHNIQUE = Technique("entropy_scaling", EntropyScalingConfig, f"{__name__}.scaling:install", order=50,
                      capabilities={"softmax_scale"})
