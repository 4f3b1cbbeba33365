"""The window-attention configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses

from ...validation import option, require_rewritable_attention, typed


@typed
@dataclasses.dataclass(frozen=True)
class WindowAttentionConfig:
    """Image self-attention in windows holding the base size's token count, shifted per step."""

    enabled: bool = False
    # window side in tokens; None: the layer's base-size token count at the call's aspect ratio
    window: int | None = option(None, low=1)
    shift: bool = True  # shift windows every step by offsets drawn from the call's generator


    def validate_for(self, info) -> None:
        require_rewritable_attention("WindowAttentionConfig", info)
