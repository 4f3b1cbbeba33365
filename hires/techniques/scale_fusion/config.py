"""The scale fusion configuration (torch-free)."""

from __future__ import annotations

import dataclasses
import math

from ...validation import choice, require_rewritable_attention, require_unmasked_attention, typed


@typed
@dataclasses.dataclass(frozen=True)
class ScaleFusionConfig:
    """FreeScale's scale fusion in image self-attention above the base size: a global branch (full
    attention) for the high frequencies and a local branch (overlapping base-size windows) for the low
    ones, out = G(local) + (global - G(global)) with G a Gaussian blur over the token grid.
    """

    enabled: bool = False
    global_branch: str = "full"  # "full" self-attention, or "dilated": FreeScale's fast mode (interleaved sub-grids)
    window: int | None = None  # local window side in tokens; None: the layer's grid side at the base size
    jitter: bool = True  # shift interior windows by up to 1/8 window, drawn from the call's generator
    blur_sigma: float = 1.0  # G's sigma in tokens; its kernel side is 2 * ceil(scale) - 1 (FreeScale)

    def __post_init__(self):
        owner = "ScaleFusionConfig"
        choice(owner, "global_branch", self.global_branch, ("full", "dilated"))
        if self.window is not None and self.window < 2:
            raise ValueError(f"{owner}.window={self.window!r} must be an int >= 2 (tokens) or None")
        if not (self.blur_sigma > 0 and math.isfinite(self.blur_sigma)):
            raise ValueError(f"{owner}.blur_sigma={self.blur_sigma!r} must be a finite number > 0")

    def validate_for(self, info) -> None:
        require_rewritable_attention("ScaleFusionConfig", info)
        require_unmasked_attention("ScaleFusionConfig", info)
