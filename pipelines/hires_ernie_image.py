"""hires for ERNIE-Image as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/hires_ernie_image.py", trust_remote_code=True)

The logic lives in the installed `hires` package; this file only names the class to load.
"""

from hires.pipelines import HiresErnieImagePipeline

__all__ = ["HiresErnieImagePipeline"]
