"""hires: training-free high-resolution generation for diffusers pipelines.

    import hires
    hires.apply(pipe, hires.HiresConfig(...))
    image = pipe(prompt, height=2048, width=2048).images[0]
    hires.remove(pipe)  # the pipeline is exactly as before
"""

from .config import (
    APGConfig,
    AttentionBackendConfig,
    BottleneckConfig,
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

_READY_PIPELINES = (
    "HiresFluxPipeline",
    "HiresPixArtSigmaPipeline",
    "HiresStableDiffusion3Pipeline",
    "HiresStableDiffusionPipeline",
    "HiresStableDiffusionXLPipeline",
)


def __getattr__(name):
    # The ready pipelines import five diffusers pipeline modules: load them only when asked for.
    if name in _READY_PIPELINES:
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'hires' has no attribute {name!r}")

__all__ = [
    "APGConfig",
    "AttentionBackendConfig",
    "BottleneckConfig",
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
    "HiresFluxPipeline",
    "HiresPixArtSigmaPipeline",
    "HiresStableDiffusion3Pipeline",
    "HiresStableDiffusionPipeline",
    "HiresStableDiffusionXLPipeline",
    "ModelInfo",
    "apply",
    "is_applied",
    "last_call",
    "model_info",
    "remove",
]
