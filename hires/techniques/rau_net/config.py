"""The RAU-Net configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses

from ...validation import option, require_unet, step_window, typed


@typed
@dataclasses.dataclass(frozen=True)
class RAUNetConfig:
    """RAU-Net (HiDiffusion): in the early steps, a down block's downsampler runs at stride 4 (dilation 2)
    and a cross-attention down block average-pools 2x after its first layer, so the deep UNet levels
    see a base-size feature map; the matching up blocks resize back. UNets only.

    `None` fields take the family's facts for the requested size (hires.families.RAUNetFacts).
    """

    enabled: bool = False
    downsampler: str | None = None  # module name of the strided downsampler, e.g. "down_blocks.0.downsamplers.0"
    # [start, stop) schedule fractions it is active in
    downsampler_steps: tuple[float, float] | None = option(None, low=0, high=1)
    pooled_block: str | None = None  # module name of the pooled down block, e.g. "down_blocks.1"
    pooled_steps: tuple[float, float] | None = option(None, low=0, high=1)
    # how the matching up block resizes the pooled features back
    upsample_mode: str = option("bicubic", choices=("bicubic", "bilinear", "nearest"))

    def __post_init__(self):
        owner = "RAUNetConfig"
        object.__setattr__(self, "downsampler_steps", step_window(owner, "downsampler_steps", self.downsampler_steps))
        object.__setattr__(self, "pooled_steps", step_window(owner, "pooled_steps", self.pooled_steps))

    def validate_for(self, info) -> None:
        require_unet("RAUNetConfig", info, "WindowAttentionConfig, EntropyScalingConfig or progressive structure "
                      "guidance")
        if info.family.rau_net is None and (self.downsampler is None or self.pooled_block is None
                                            or self.downsampler_steps is None or self.pooled_steps is None):
            raise ValueError(f"RAUNetConfig: family {info.name!r} has no RAU-Net facts (hires.families.RAUNetFacts); "
                             "give downsampler, downsampler_steps, pooled_block and pooled_steps explicitly")
