"""hires for Krea-2 as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/hires_krea2.py", trust_remote_code=True)

The logic lives in the installed `hires` package; this file only names the class to load.
"""

from hires.pipelines import HiresKrea2Pipeline

__all__ = ["HiresKrea2Pipeline"]
