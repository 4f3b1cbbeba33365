"""The entropy-scaling configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses

from ...validation import option, require_rewritable_attention, typed


@typed
@dataclasses.dataclass(frozen=True)
class EntropyScalingConfig:
    """Scale each attention layer's softmax temperature by sqrt(ln N / ln T) (Jin et al. 2023).

    N is the layer's key count in this call, T its key count at the base size, both clamped >= 2.
    """

    enabled: bool = False
    # "self": image self-attention only (cross-attention keys are text tokens, factor 1); "all": every layer
    layers: str = option("self", choices=("self", "all"))
    # joint text-image attention (SD3, Flux): "exclude" counts image keys only in N and T; "include" counts
    # the text keys in both
    text_tokens: str = option("exclude", choices=("exclude", "include"))


    def validate_for(self, info) -> None:
        require_rewritable_attention("EntropyScalingConfig", info)
