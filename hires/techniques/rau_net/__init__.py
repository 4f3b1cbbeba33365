"""RAU-Net (HiDiffusion): a strided downsampler and a pooled down block in the early steps, UNets only
(mechanism: `blocks`)."""

from ...registry import Technique
from .config import RAUNetConfig

TECHNIQUE = Technique("rau_net", RAUNetConfig, f"{__name__}.blocks:install", order=35)
