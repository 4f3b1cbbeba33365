"""What `hires.apply(pipe)` uses when no config is given: the combination the evidence supports.

One entry per family. Every technique in these configs leaves a call at the model's base size
unchanged (structure guidance runs one stage there, positions are the model's own), so the
automatic preset only acts above the base size.

Evidence (docs/testbed.md, 12 prompts, 4x and 16x the training area):
- testbed UNet: pixel-space structure guidance keeps exactly one object in 86% of 4x samples and
  58% at 16x, against 50% and 0% plain; no other technique helps at 16x (re-dilation 17-33%,
  bottleneck 0-8%, entropy scaling and windows 0%).
- testbed Flux DiT: structure guidance 54% / 42% against 29% / 8% plain; YaRN positions alone
  drop 4x to 6%, and added to structure guidance they pull it down to 40%, so Flux's preset
  leaves positions off.
- SD3 keeps PositionConfig: without it SD3 cannot run past its table (3072 px for SD3/3.5-Large).
  PixArt-Sigma keeps it too: at its defaults it changes no position, and it turns the pipeline's
  silent resolution binning into an error that says how to turn binning off. Neither is measured
  on the testbed (its DiT is a Flux).
"""

from __future__ import annotations

from .config import HiresConfig, PositionConfig, StructureGuidanceConfig

_STRUCTURE = StructureGuidanceConfig(enabled=True)
_GUIDED = HiresConfig(structure_guidance=_STRUCTURE)
_GUIDED_WITH_POSITIONS = HiresConfig(structure_guidance=_STRUCTURE, positions=PositionConfig(enabled=True))

AUTOMATIC: dict[str, HiresConfig] = {
    "sd15": _GUIDED,
    "sd21": _GUIDED,
    "sdxl": _GUIDED,
    "pixart": _GUIDED_WITH_POSITIONS,
    "sd3": _GUIDED_WITH_POSITIONS,
    "flux": _GUIDED,
    # Not measured on the testbed; structure guidance as Flux's (the testbed's flow DiT), positions off.
    "qwenimage": _GUIDED,
    "zimage": _GUIDED,
}


def automatic_config(info) -> HiresConfig:
    """The automatic preset of `info`'s family (a `hires.ModelInfo`)."""
    return AUTOMATIC[info.name]
