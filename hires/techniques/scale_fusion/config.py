"""The scale-fusion configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses

from ...validation import option, require_rewritable_attention, require_unmasked_attention, typed


@typed
@dataclasses.dataclass(frozen=True)
class ScaleFusionConfig:
    """FreeScale's scale fusion in image self-attention above the base size: a global branch (full
    attention) for the high frequencies and a local branch (overlapping base-size windows) for the low
    ones, out = G(local) + (global - G(global)) with G a Gaussian blur over the token grid.
    """

    enabled: bool = False
    # "full" self-attention, or "dilated": FreeScale's fast mode (interleaved sub-grids)
    global_branch: str = option("full", choices=("full", "dilated"))
    # local window side in tokens; None: the layer's grid side at the base size
    window: int | None = option(None, low=2)
    jitter: bool = True  # shift interior windows by up to 1/8 window, drawn from the call's generator
    # G's sigma in tokens; kernel side 2 ceil(scale) - 1 (FreeScale)
    blur_sigma: float = option(1.0, low=0, low_open=True)


    def validate_for(self, info) -> None:
        require_rewritable_attention("ScaleFusionConfig", info)
        require_unmasked_attention("ScaleFusionConfig", info)
