"""Ready pipelines: diffusers pipeline classes with hires built in.

    pipe = hires.HiresStableDiffusionXLPipeline.from_pretrained(path)   # or .from_pipe(existing)
    image = pipe(prompt, height=4096, width=4096, hires_config=hires.HiresConfig(...)).images[0]

Each class is its diffusers base class plus one call argument, `hires_config`. Without it, the
config of the last call stays (the first call uses the family's automatic preset, hires.presets;
`hires_config=HiresConfig()` turns every technique off). Being their own `__call__`,
they also reject sizes diffusers would silently replace (0 means "default" to diffusers).
"""

from __future__ import annotations

import inspect

from diffusers import (
    ChromaPipeline,
    Flux2KleinPipeline,
    Flux2Pipeline,
    FluxPipeline,
    PixArtSigmaPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    ZImagePipeline,
)

from .config import HiresConfig, validate_size
from .runtime import apply, get_attachment


class HiresPipelineMixin:
    def __call__(self, *args, hires_config: HiresConfig | None = None, **kwargs):
        attachment = get_attachment(self)
        if hires_config is not None and (attachment is None or attachment.config != hires_config):
            apply(self, hires_config)
        elif attachment is None:
            apply(self)
        info = get_attachment(self).info
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
)
