"""The attention-backend configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses

from ...validation import option, typed

ATTENTION_BACKENDS = ("native", "flash", "_native_flash", "_native_efficient",
                      "_native_math", "xformers", "sage", "flex")


@typed
@dataclasses.dataclass(frozen=True)
class AttentionBackendConfig:
    """Which attention kernel runs, through diffusers' own attention dispatcher / SDPA backends."""

    enabled: bool = False
    backend: str = option("native", choices=ATTENTION_BACKENDS)


    def validate_for(self, info) -> None:
        return None
