"""hires for Flux.2 [dev] (Flux2Pipeline) as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/hires_flux2.py", trust_remote_code=True)

The logic lives in the installed `hires` package; this file only names the class to load.
"""

from hires.pipelines import HiresFlux2Pipeline

__all__ = ["HiresFlux2Pipeline"]
