"""hires: training-free high-resolution generation for diffusers pipelines.

    import hires
    hires.apply(pipe, hires.HiresConfig(...))
    image = pipe(prompt, height=2048, width=2048).images[0]
    hires.remove(pipe)  # the pipeline is exactly as before
"""

from .config import (
    APGConfig,
    AttentionBackendConfig,
    EntropyScalingConfig,
    HiresConfig,
    MemoryConfig,
    PositionConfig,
    RedilationConfig,
    StructureGuidanceConfig,
    VAETilingConfig,
    WindowAttentionConfig,
)
from .families import FAMILIES, SUPPORTED_PIPELINES, ModelInfo
from .runtime import CallRecord, CallState, apply, is_applied, last_call, model_info, remove

__version__ = "0.1.0"

__all__ = [
    "APGConfig",
    "AttentionBackendConfig",
    "EntropyScalingConfig",
    "MemoryConfig",
    "PositionConfig",
    "RedilationConfig",
    "StructureGuidanceConfig",
    "VAETilingConfig",
    "WindowAttentionConfig",
    "FAMILIES",
    "SUPPORTED_PIPELINES",
    "CallRecord",
    "CallState",
    "HiresConfig",
    "ModelInfo",
    "apply",
    "is_applied",
    "last_call",
    "model_info",
    "remove",
]
