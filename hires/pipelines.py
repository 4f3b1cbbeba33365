"""Ready pipelines: diffusers pipeline classes with hires built in.

    pipe = hires.HiresStableDiffusionXLPipeline.from_pretrained(path)   # or .from_pipe(existing)
    image = pipe(prompt, height=4096, width=4096, hires_config=hires.HiresConfig(...)).images[0]

Each class is its diffusers base class plus one call argument, `hires_config`. Without it, the
config of the last call stays (the first call uses the family's automatic preset, hires.presets;
`hires_config=HiresConfig()` turns every technique off). Being their own `__call__`,
they also reject sizes diffusers would silently replace (0 means "default" to diffusers).

The Modular Diffusers pipeline classes have theirs too, loaded as diffusers loads them:

    pipe = hires.HiresFlux3ModularPipeline.from_pretrained(path)   # or (blocks=..., ...) as the base class
    pipe.load_components(torch_dtype=torch.bfloat16)
    images = pipe(prompt=..., height=2048, width=2048, output="images", hires_config=hires.HiresConfig(...))
"""

from __future__ import annotations

import inspect

from diffusers import (
    ChromaPipeline,
    ErnieImagePipeline,
    Flux2KleinBaseModularPipeline,
    Flux2KleinModularPipeline,
    Flux2KleinPipeline,
    Flux2ModularPipeline,
    Flux2Pipeline,
    Flux3DistilledModularPipeline,
    Flux3ModularPipeline,
    FluxModularPipeline,
    FluxPipeline,
    HiDreamImagePipeline,
    Krea2Pipeline,
    PixArtSigmaPipeline,
    QwenImageModularPipeline,
    QwenImage21Pipeline,
    QwenImagePipeline,
    StableDiffusion3ModularPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLModularPipeline,
    StableDiffusionXLPipeline,
    ZImageModularPipeline,
    ZImagePipeline,
)

from .config import HiresConfig, validate_size
from .runtime import apply, get_attachment


def _attach(pipe, hires_config: HiresConfig | None):
    """hires on `pipe` with `hires_config`, or with the config it has (the automatic preset at first)."""
    attachment = get_attachment(pipe)
    if hires_config is not None and (attachment is None or attachment.config != hires_config):
        apply(pipe, hires_config)
    elif attachment is None:
        apply(pipe)
    return get_attachment(pipe).info


class HiresPipelineMixin:
    def __call__(self, *args, hires_config: HiresConfig | None = None, **kwargs):
        info = _attach(self, hires_config)
        # By name or by position: diffusers turns height=0 into its default size before hires sees it.
        base_call = super().__call__
        try:
            given = inspect.signature(base_call).bind_partial(*args, **kwargs).arguments
        except TypeError:
            given = kwargs  # the pipeline's own call raises the argument error
        for side in ("height", "width"):
            if given.get(side) is not None:
                validate_size(side, given[side], info.size_multiple, info.name)
        return base_call(*args, **kwargs)


class HiresStableDiffusionPipeline(HiresPipelineMixin, StableDiffusionPipeline):
    """StableDiffusionPipeline (SD 1.x and 2.x) with hires."""


class HiresStableDiffusionXLPipeline(HiresPipelineMixin, StableDiffusionXLPipeline):
    """StableDiffusionXLPipeline with hires."""


class HiresPixArtSigmaPipeline(HiresPipelineMixin, PixArtSigmaPipeline):
    """PixArtSigmaPipeline with hires."""


class HiresStableDiffusion3Pipeline(HiresPipelineMixin, StableDiffusion3Pipeline):
    """StableDiffusion3Pipeline with hires."""


class HiresFluxPipeline(HiresPipelineMixin, FluxPipeline):
    """FluxPipeline with hires."""


class HiresFlux2Pipeline(HiresPipelineMixin, Flux2Pipeline):
    """Flux2Pipeline (Flux.2 [dev]) with hires."""


class HiresFlux2KleinPipeline(HiresPipelineMixin, Flux2KleinPipeline):
    """Flux2KleinPipeline (Flux.2 [klein]) with hires."""


class HiresChromaPipeline(HiresPipelineMixin, ChromaPipeline):
    """ChromaPipeline with hires."""


class HiresQwenImagePipeline(HiresPipelineMixin, QwenImagePipeline):
    """QwenImagePipeline with hires."""


class HiresZImagePipeline(HiresPipelineMixin, ZImagePipeline):
    """ZImagePipeline (Z-Image and Z-Image Turbo) with hires."""


class HiresErnieImagePipeline(HiresPipelineMixin, ErnieImagePipeline):
    """ErnieImagePipeline (ERNIE-Image) with hires."""


class HiresKrea2Pipeline(HiresPipelineMixin, Krea2Pipeline):
    """Krea2Pipeline (Krea-2) with hires."""


class HiresHiDreamImagePipeline(HiresPipelineMixin, HiDreamImagePipeline):
    """HiDreamImagePipeline (HiDream-I1) with hires."""


class HiresQwenImage21Pipeline(HiresPipelineMixin, QwenImage21Pipeline):
    """QwenImage21Pipeline (Qwen-Image 2.1) with hires."""


READY_PIPELINES = (
    HiresStableDiffusionPipeline,
    HiresStableDiffusionXLPipeline,
    HiresPixArtSigmaPipeline,
    HiresStableDiffusion3Pipeline,
    HiresFluxPipeline,
    HiresFlux2Pipeline,
    HiresFlux2KleinPipeline,
    HiresChromaPipeline,
    HiresQwenImagePipeline,
    HiresZImagePipeline,
    HiresErnieImagePipeline,
    HiresKrea2Pipeline,
    HiresHiDreamImagePipeline,
    HiresQwenImage21Pipeline,
)


class HiresModularPipelineMixin:
    """A Modular Diffusers pipeline class plus `hires_config`, kept as for the classic ones. hires attaches on the
    first call, so the graph may be edited and the components loaded (`load_components`) in between."""

    def __call__(self, state=None, output=None, hires_config: HiresConfig | None = None, **kwargs):
        info = _attach(self, hires_config)
        for side in ("height", "width"):
            if kwargs.get(side) is not None:
                validate_size(side, kwargs[side], info.size_multiple, info.name)
        return super().__call__(state, output, **kwargs)


class HiresStableDiffusionXLModularPipeline(HiresModularPipelineMixin, StableDiffusionXLModularPipeline):
    """StableDiffusionXLModularPipeline with hires."""


class HiresStableDiffusion3ModularPipeline(HiresModularPipelineMixin, StableDiffusion3ModularPipeline):
    """StableDiffusion3ModularPipeline with hires."""


class HiresFluxModularPipeline(HiresModularPipelineMixin, FluxModularPipeline):
    """FluxModularPipeline with hires."""


class HiresFlux2ModularPipeline(HiresModularPipelineMixin, Flux2ModularPipeline):
    """Flux2ModularPipeline (Flux.2 [dev]) with hires."""


class HiresFlux2KleinModularPipeline(HiresModularPipelineMixin, Flux2KleinModularPipeline):
    """Flux2KleinModularPipeline (Flux.2 [klein], step-distilled) with hires."""


class HiresFlux2KleinBaseModularPipeline(HiresModularPipelineMixin, Flux2KleinBaseModularPipeline):
    """Flux2KleinBaseModularPipeline (Flux.2 [klein] base) with hires."""


class HiresQwenImageModularPipeline(HiresModularPipelineMixin, QwenImageModularPipeline):
    """QwenImageModularPipeline with hires."""


class HiresZImageModularPipeline(HiresModularPipelineMixin, ZImageModularPipeline):
    """ZImageModularPipeline with hires."""


class HiresFlux3ModularPipeline(HiresModularPipelineMixin, Flux3ModularPipeline):
    """Flux3ModularPipeline with hires."""


class HiresFlux3DistilledModularPipeline(HiresModularPipelineMixin, Flux3DistilledModularPipeline):
    """Flux3DistilledModularPipeline (Flux 3's flow-map distilled model) with hires."""


READY_MODULAR_PIPELINES = (
    HiresStableDiffusionXLModularPipeline,
    HiresStableDiffusion3ModularPipeline,
    HiresFluxModularPipeline,
    HiresFlux2ModularPipeline,
    HiresFlux2KleinModularPipeline,
    HiresFlux2KleinBaseModularPipeline,
    HiresQwenImageModularPipeline,
    HiresZImageModularPipeline,
    HiresFlux3ModularPipeline,
    HiresFlux3DistilledModularPipeline,
)
