"""DemoFusion's dilated sampling: interleaved sub-lattices of the latent denoised as base-size latents and fused in
(mechanism: `lattices`)."""

from ...registry import Technique
from .config import DilatedSamplingConfig

# Before every other denoiser hook (structure guidance's, the guidance hook at 10+), so it is the
# innermost: both halves of a CFG pair are fused before any guidance technique combines them.
TECHNIQUE = Technique("dilated_sampling", DilatedSamplingConfig, f"{__name__}.lattices:install", order=5)
