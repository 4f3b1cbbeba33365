"""The structure-guidance configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ...validation import Bounds, is_technique_config, option, per_stage, stage_settings, typed


@typed
@dataclasses.dataclass(frozen=True)
class StructureGuidanceConfig:
    """Progressive structure guidance (DiffuseHigh): base size -> upscale -> re-noise -> guided denoise.

    Each stage's guide is the low-frequency wavelet band of the upscaled previous result. `None`
    fields take the family preset (see hires.techniques.structure_guidance.guidance). Per-stage fields accept one
    value for every stage or a tuple with one value per stage after the base generation.
    """

    enabled: bool = False
    # intermediate stages between the base size and the requested size: pixel sides (int: square, or
    # (height, width)) or factors of the base side (float); the requested size is always the last stage
    stages: tuple | None = None
    # fraction of the schedule re-run at each stage, in (0, 1] (DiffuseHigh: 15/50); None: 0.3. On schedules of
    # 8 steps or fewer (distilled models) at least 0.5, so a stage runs two of four steps rather than one
    renoise: Any = None
    # share of the call's steps each stage runs (at most renoise's), spaced as the pipeline's own schedule of
    # proportionally fewer steps over the stage's renoised part: a deep renoise at the cost of few steps. None:
    # renoise's (the schedule's own steps there; a call's strength runs strength x steps, as diffusers' img2img).
    # On schedules of 8 steps or fewer at least 0.5, as renoise
    step_fraction: Any = None
    guided_steps: Any = None  # steps at the start of each stage that get the low-band swap (DiffuseHigh: 5)
    # where guided_steps is None: this share of each stage's steps (DiffuseHigh: 5 of 15)
    guided_fraction: float = option(1 / 3, low=0, high=1, low_open=True)
    # how the guide lets go: "fade" moves the low band toward the guide's by 1 - k/g in guided step k (from 0) of g,
    # so no single late step hands the whole low band back to the model's own CFG-extrapolated prediction (on
    # short stages that flipped colours); "hard" swaps it whole in each guided step and not after (DiffuseHigh)
    handover: str = option("fade", choices=("hard", "fade"))
    wavelet: str = "db4"
    wavelet_level: int = option(1, low=1)
    sharpen_alpha: float = option(1.0, low=0)  # unsharp mask (1 + a) x - a blur(x) of the upscaled guide; 0: off
    # blur sigma drawn per stage from the call's generator, uniform in [low, high]
    sharpen_sigma: tuple[float, float] = option((0.1, 2.0), low=0, low_open=True)
    guidance_scale: Any = None  # CFG scale per stage; None: the call's own
    # APG per stage (an APGConfig); None: HiresConfig.apg, which also rules the base generation;
    # APGConfig(enabled=False): plain CFG in that stage
    apg: Any = dataclasses.field(default=None, metadata=stage_settings("apg"))
    # where the guide's low band is swapped: "pixel" (a VAE round trip per guided step, the paper) or "latent"
    space: str = option("pixel", choices=("latent", "pixel"))
    # where the previous stage is upscaled: "pixel" (one decode + encode per stage) or "latent"; None: as `space`
    upscale_space: str | None = option(None, choices=("latent", "pixel"))
    upscale: str = option("bicubic", choices=("bicubic", "bilinear", "lanczos"))
    # clamp the upscaled (and sharpened) guide to the range of the source pixels around it: no ringing halo
    anti_ringing: bool = True
    # stage sizes when `stages` is None: "linear" adds one base side per stage (DiffuseHigh: 1024 -> 2048 -> 3072
    # -> 4096); "doubling" doubles the side per stage (FreeScale, HiFlow: 1024 -> 2048 -> 4096)
    ladder: str = option("linear", choices=("linear", "doubling"))

    def __post_init__(self):
        owner = "StructureGuidanceConfig"
        if self.stages is not None:
            stages = tuple(self.stages)
            for stage in stages:
                factor = isinstance(stage, float) and 1 < stage < math.inf
                side = isinstance(stage, int) and not isinstance(stage, bool) and stage > 0
                pair = isinstance(stage, (tuple, list)) and len(stage) == 2 and all(
                    isinstance(v, int) and v > 0 for v in stage)
                ok = factor or side or pair
                if not ok:
                    raise ValueError(f"{owner}.stages entry {stage!r} must be a pixel side (int), (height, width), "
                                     "or a float factor > 1 of the base side")
            object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "renoise", per_stage(owner, "renoise", self.renoise, Bounds(0, 1, low_open=True),
                                                      "a fraction of the schedule in (0, 1]"))
        object.__setattr__(self, "step_fraction", per_stage(owner, "step_fraction", self.step_fraction,
                                                            Bounds(0, 1, low_open=True),
                                                            "a fraction of the call's steps in (0, 1]"))
        object.__setattr__(self, "guided_steps", per_stage(owner, "guided_steps", self.guided_steps,
                                                           lambda v: isinstance(v, int) and v >= 0,
                                                           "a whole number of steps >= 0"))
        object.__setattr__(self, "guidance_scale", per_stage(owner, "guidance_scale", self.guidance_scale, Bounds(0),
                                                             "a finite guidance scale >= 0"))
        object.__setattr__(self, "apg", per_stage(owner, "apg", self.apg, is_technique_config,
                                                  "a hires.APGConfig or None (HiresConfig.from_dict reads mappings)"))
        if self.space == "pixel" and self.upscale_space == "latent":
            raise ValueError(f"{owner}.upscale_space='latent' cannot feed space='pixel' (a pixel guide needs the "
                             "upscaled pixels); use upscale_space='pixel' or None, or space='latent'")
        low, high = self.sharpen_sigma
        if not low <= high:
            raise ValueError(f"{owner}.sharpen_sigma={self.sharpen_sigma!r} must be (low, high) with 0 < low <= high")

    def validate_for(self, info) -> None:
        return None
