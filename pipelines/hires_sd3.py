"""hires for Stable Diffusion 3 as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/hires_sd3.py", trust_remote_code=True)

The logic lives in the installed `hires` package; this file only names the class to load.
"""

from hires.pipelines import HiresStableDiffusion3Pipeline

__all__ = ["HiresStableDiffusion3Pipeline"]
