"""hires for HiDream-I1 as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/hires_hidream.py", trust_remote_code=True)

The logic lives in the installed `hires` package; this file only names the class to load.
"""

from hires.pipelines import HiresHiDreamImagePipeline

__all__ = ["HiresHiDreamImagePipeline"]
