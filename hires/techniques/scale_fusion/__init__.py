"""FreeScale's scale fusion: global and local attention branches fused per layer (mechanism: `fusion`)."""

from ...registry import Technique
from .config import ScaleFusionConfig

TECHNIQUE = Technique("scale_fusion", ScaleFusionConfig, f"{__name__}.fusion:install", order=45,
                      capabilities={"torch_sdpa"}, excludes={
                          "window_attention": "both split image self-attention into windows (scale fusion already "
                                              "has a windowed local branch); enable one of them"})
