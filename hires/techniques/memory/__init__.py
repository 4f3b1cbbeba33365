"""The memory planner and the tiled VAE it chooses: two techniques, one package (the planner estimates what
the tiled VAE does). `estimate`: peak memory on the meta device and the plans; `install`: both
installers; `chunking`: feed-forward chunks and sequential CFG; `tiled_vae`: decode / encode with
whole-image GroupNorm statistics."""

from ...registry import Technique
from .config import MemoryConfig, VAETilingConfig

TECHNIQUE = Technique("memory", MemoryConfig, f"{__name__}.install:install_memory", order=90)
VAE_TILING = Technique("vae_tiling", VAETilingConfig, f"{__name__}.install:install_vae_tiling", order=100)
