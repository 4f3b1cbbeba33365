"""hires for Chroma (ChromaPipeline) as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/hires_chroma.py", trust_remote_code=True)

The logic lives in the installed `hires` package; this file only names the class to load.
"""

from hires.pipelines import HiresChromaPipeline

__all__ = ["HiresChromaPipeline"]
