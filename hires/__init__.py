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
    DilatedSamplingConfig,
    EntropyScalingConfig,
    FlowAlignmentConfig,
    HiresConfig,
    MemoryConfig,
    PositionConfig,
    RAUNetConfig,
    RedilationConfig,
    ScaleFusionConfig,
    SkipResidualConfig,
    StructureGuidanceConfig,
    VAETilingConfig,
    WindowAttentionConfig,
)
from .families import FAMILIES, SUPPORTED_PIPELINES, ModelInfo

__version__ = "0.1.0"

_READY_PIPELINES = (
    "HiresChromaPipeline",
    "HiresFlux2KleinPipeline",
    "HiresFlux2Pipeline",
    "HiresFluxPipeline",
    "HiresPixArtSigmaPipeline",
    "HiresQwenImagePipeline",
    "HiresStableDiffusion3Pipeline",
    "HiresStableDiffusionPipeline",
    "HiresStableDiffusionXLPipeline",
    "HiresZImagePipeline",
)


# The runtime imports torch and diffusers (seconds): loaded on first use, so `import hires` and
# `hires --help` stay fast.
_RUNTIME_NAMES = ("CallRecord", "CallState", "apply", "is_applied", "last_call", "model_info", "remove")


def __getattr__(name):
    import importlib
    import importlib.util

    if name in _RUNTIME_NAMES:
        return getattr(importlib.import_module(".runtime", __name__), name)
    # The ready pipelines import five diffusers pipeline modules: load them only when asked for.
    if name in _READY_PIPELINES:
        return getattr(importlib.import_module(".pipelines", __name__), name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule, e.g. hires.runtime
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hires' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

__all__ = [
    "APGConfig",
    "AttentionBackendConfig",
    "BottleneckConfig",
    "DilatedSamplingConfig",
    "EntropyScalingConfig",
    "FlowAlignmentConfig",
    "MemoryConfig",
    "PositionConfig",
    "RAUNetConfig",
    "RedilationConfig",
    "ScaleFusionConfig",
    "SkipResidualConfig",
    "StructureGuidanceConfig",
    "VAETilingConfig",
    "WindowAttentionConfig",
    "FAMILIES",
    "SUPPORTED_PIPELINES",
    "CallRecord",
    "CallState",
    "HiresConfig",
    "HiresChromaPipeline",
    "HiresFlux2KleinPipeline",
    "HiresFlux2Pipeline",
    "HiresFluxPipeline",
    "HiresPixArtSigmaPipeline",
    "HiresQwenImagePipeline",
    "HiresStableDiffusion3Pipeline",
    "HiresStableDiffusionPipeline",
    "HiresStableDiffusionXLPipeline",
    "HiresZImagePipeline",
    "ModelInfo",
    "apply",
    "is_applied",
    "last_call",
    "model_info",
    "remove",
]
