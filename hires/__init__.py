"""hires: training-free high-resolution generation for diffusers pipelines.

    import hires
    hires.apply(pipe, hires.HiresConfig(...))
    image = pipe(prompt, height=2048, width=2048).images[0]
    hires.remove(pipe)  # the pipeline is exactly as before
"""

import sys

from .config import CONFIG_CLASSES, HiresConfig
from .families import FAMILIES, SUPPORTED_PIPELINES, ModelInfo

globals().update(CONFIG_CLASSES)  # every technique's config class: hires.StructureGuidanceConfig, ...

__version__ = "0.1.0"

_READY_PIPELINES = (
    "HiresChromaPipeline",
    "HiresErnieImagePipeline",
    "HiresFlux2KleinPipeline",
    "HiresFlux2Pipeline",
    "HiresFluxPipeline",
    "HiresHiDreamImagePipeline",
    "HiresKrea2Pipeline",
    "HiresPixArtSigmaPipeline",
    "HiresQwenImage21Pipeline",
    "HiresQwenImagePipeline",
    "HiresStableDiffusion3Pipeline",
    "HiresStableDiffusionPipeline",
    "HiresStableDiffusionXLPipeline",
    "HiresZImagePipeline",
    # Modular Diffusers
    "HiresFlux2KleinBaseModularPipeline",
    "HiresFlux2KleinModularPipeline",
    "HiresFlux2ModularPipeline",
    "HiresFlux3DistilledModularPipeline",
    "HiresFlux3ModularPipeline",
    "HiresFluxModularPipeline",
    "HiresQwenImageModularPipeline",
    "HiresStableDiffusion3ModularPipeline",
    "HiresStableDiffusionXLModularPipeline",
    "HiresZImageModularPipeline",
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


# Module paths of earlier releases, kept importable by code written against them: old name -> where it
# lives now (the same module object). hires itself imports only the new names.
MOVED_MODULES = {
    "hires.memory_planner": "hires.techniques.memory.estimate",
    "hires.planning": "hires.techniques.memory.install",
    "hires.presets_redilation": "hires.techniques.redilation.presets",
    "hires.sampling.bottleneck": "hires.techniques.bottleneck.slices",
    "hires.sampling.flow_alignment": "hires.techniques.flow_alignment.alignment",
    "hires.sampling.progressive": "hires.techniques.structure_guidance.guidance",
    "hires.sampling.skip_residual": "hires.techniques.skip_residual.blend",
    "hires.techniques.dispersion": "hires.techniques.redilation.dispersion",
    "hires.techniques.guidance": "hires.denoiser.guidance",
    "hires.techniques.tiled_vae": "hires.techniques.memory.tiled_vae",
}


class _MovedModule:
    """Finds and loads an old module name as the module it moved to."""

    def find_spec(self, name, path=None, target=None):
        import importlib.util

        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        import importlib

        module = importlib.import_module(MOVED_MODULES[spec.name])
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._own_spec  # the import machinery set the old name's spec on it


if not any(isinstance(finder, _MovedModule) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModule())

__all__ = [
    *CONFIG_CLASSES,
    "FAMILIES",
    "SUPPORTED_PIPELINES",
    "CallRecord",
    "CallState",
    "HiresConfig",
    *_READY_PIPELINES,
    "ModelInfo",
    "apply",
    "is_applied",
    "last_call",
    "model_info",
    "remove",
]
