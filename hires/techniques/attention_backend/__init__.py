"""The attention kernel, through diffusers' dispatcher or torch's SDPA backends (mechanism: `backend`)."""

from ...registry import Technique
from .config import AttentionBackendConfig

TECHNIQUE = Technique("attention_backend", AttentionBackendConfig, f"{__name__}.backend:install", order=60)
