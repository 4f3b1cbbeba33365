"""The structure guidance configuration (torch-free)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ...validation import choice, fraction, is_technique_config, per_stage, stage_settings, typed


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
    guided_steps: Any = None  # steps at the start of each stage that get the low-band swap (DiffuseHigh: 5)
    guided_fraction: float = 1 / 3  # where guided_steps is None: this share of each stage's steps (DiffuseHigh: 5 of 15)
    # how the guide lets go: "fade" moves the low band toward the guide's by 1 - k/g in guided step k (from 0) of g,
    # so no single late step hands the whole low band back to the model's own CFG-extrapolated prediction (on
    # short stages that flipped colours); "hard" swaps it whole in each guided step and not after (DiffuseHigh)
    handover: str = "fade"
    wavelet: str = "db4"
    wavelet_level: int = 1
    sharpen_alpha: float = 1.0  # unsharp mask (1 + a) x - a blur(x) of the upscaled guide; 0: off
    sharpen_sigma: tuple[float, float] = (0.1, 2.0)  # blur sigma drawn per stage from the call's generator
    guidance_scale: Any = None  # CFG scale per stage; None: the call's own
    # APG per stage (an APGConfig); None: HiresConfig.apg, which also rules the base generation;
    # APGConfig(enabled=False): plain CFG in that stage
    apg: Any = dataclasses.field(default=None, metadata=stage_settings("apg"))
    space: str = "pixel"  # where the guide's low band is swapped: "pixel" (a VAE round trip per guided step, the paper) or "latent"
    # where the previous stage is upscaled: "pixel" (one decode + encode per stage) or "latent"; None: as `space`
    upscale_space: str | None = None
    upscale: str = "bicubic"
    # clamp the upscaled (and sharpened) guide to the range of the source pixels around it: no ringing halo
    anti_ringing: bool = True
    # stage sizes when `stages` is None: "linear" adds one base side per stage (DiffuseHigh: 1024 -> 2048 -> 3072
    # -> 4096); "doubling" doubles the side per stage (FreeScale, HiFlow: 1024 -> 2048 -> 4096)
    ladder: str = "linear"

    def __post_init__(self):
        owner = "StructureGuidanceConfig"
        if self.stages is not None:
            stages = tuple(self.stages)
            for stage in stages:
                ok = (isinstance(stage, float) and stage > 1) or (isinstance(stage, int) and not isinstance(stage, bool) and stage > 0) or (
                    isinstance(stage, (tuple, list)) and len(stage) == 2 and all(isinstance(v, int) and v > 0 for v in stage))
                if not ok:
                    raise ValueError(f"{owner}.stages entry {stage!r} must be a pixel side (int), (height, width), "
                                     "or a float factor > 1 of the base side")
            object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "renoise", per_stage(owner, "renoise", self.renoise,
                                                        lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a fraction of the schedule in (0, 1]"))
        object.__setattr__(self, "guided_steps", per_stage(owner, "guided_steps", self.guided_steps,
                                                             lambda v: isinstance(v, int) and v >= 0, "a whole number of steps >= 0"))
        object.__setattr__(self, "guidance_scale", per_stage(owner, "guidance_scale", self.guidance_scale,
                                                               lambda v: isinstance(v, (int, float)) and v >= 0, "a guidance scale >= 0"))
        object.__setattr__(self, "apg", per_stage(owner, "apg", self.apg, is_technique_config,
                                                  "a hires.APGConfig or None (HiresConfig.from_dict reads mappings)"))
        fraction(owner, "guided_fraction", self.guided_fraction, low_open=True)
        choice(owner, "space", self.space, ("latent", "pixel"))
        choice(owner, "handover", self.handover, ("hard", "fade"))
        if self.upscale_space is not None:
            choice(owner, "upscale_space", self.upscale_space, ("latent", "pixel"))
            if self.space == "pixel" and self.upscale_space == "latent":
                raise ValueError(f"{owner}.upscale_space='latent' cannot feed space='pixel' (a pixel guide needs the "
                                 "upscaled pixels); use upscale_space='pixel' or None, or space='latent'")
        choice(owner, "upscale", self.upscale, ("bicubic", "bilinear", "lanczos"))
        choice(owner, "ladder", self.ladder, ("linear", "doubling"))
        if not (isinstance(self.wavelet_level, int) and self.wavelet_level >= 1):
            raise ValueError(f"{owner}.wavelet_level={self.wavelet_level!r} must be an int >= 1")
        if not (isinstance(self.sharpen_alpha, (int, float)) and self.sharpen_alpha >= 0):
            raise ValueError(f"{owner}.sharpen_alpha={self.sharpen_alpha!r} must be a number >= 0")
        low, high = self.sharpen_sigma
        if not (0 < low <= high):
            raise ValueError(f"{owner}.sharpen_sigma={self.sharpen_sigma!r} must be (low, high) with 0 < low <= high")

    def validate_for(self, info) -> None:
        return None
