"""hires for Qwen-Image 2.1 as a diffusers community pipeline.

    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/hires_qwenimage21.py", trust_remote_code=True)

The logic lives in the installed `hires` package; this file only names the class to load.
"""

from hires.pipelines import HiresQwenImage21Pipeline

__all__ = ["HiresQwenImage21Pipeline"]
