"""hires for Flux.2 [klein] (Flux2KleinPipeline) as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/hires_flux2_klein.py", trust_remote_code=True)

The logic lives in the installed `hires` package; this file only names the class to load.
"""

from hires.pipelines import HiresFlux2KleinPipeline

__all__ = ["HiresFlux2KleinPipeline"]
