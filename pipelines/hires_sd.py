"""hires for Stable Diffusion 1.x / 2.x as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/hires_sd.py", trust_remote_code=True)

The logic lives in the installed `hires` package; this file only names the class to load.
"""

from hires.pipelines import HiresStableDiffusionPipeline

__all__ = ["HiresStableDiffusionPipeline"]
