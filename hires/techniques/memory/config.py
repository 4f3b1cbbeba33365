"""The memory-planner and VAE-tiling configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses

from ...validation import option, parse_bytes, typed


@typed
@dataclasses.dataclass(frozen=True)
class VAETilingConfig:
    """Tiled VAE decode/encode with whole-image GroupNorm statistics (no seams, no tone shifts)."""

    enabled: bool = False
    # "auto": tile when the memory planner says so; "always"; "never"
    mode: str = option("auto", choices=("auto", "always", "never"))
    tile_size: int | None = option(None, low=1)  # tile side in latent pixels; None: chosen by the planner
    halo: int | None = option(None, low=0)  # context around each tile in latent pixels; None: enough for exact results


    def validate_for(self, info) -> None:
        reason = info.family.vae.untileable
        if reason:
            raise ValueError(f"VAETilingConfig(enabled=True) does not apply to family {info.name!r}: {reason}")


@typed
@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """The memory planner: estimate peak memory up front, choose tiling / chunking, refuse what cannot fit."""

    enabled: bool = False
    max_memory: int | str | None = None  # bytes or "24GiB"; None: the device's free memory
    feed_forward_chunks: int | None = option(None, low=1)  # None: chosen by the planner; 1: no chunking
    sequential_cfg: bool | None = None  # run the uncond/cond halves one after the other; None: planner
    # plan and tile only calls above the model's base area (the automatic preset: base-size calls stay plain diffusers)
    above_base_only: bool = False

    def __post_init__(self):
        owner = "MemoryConfig"
        if self.max_memory is not None:
            object.__setattr__(self, "max_memory", parse_bytes(self.max_memory, f"{owner}.max_memory"))

    def validate_for(self, info) -> None:
        reason = info.family.vae.untileable
        if reason:
            raise ValueError(f"MemoryConfig(enabled=True) does not apply to family {info.name!r}: the planner's "
                             f"way out of a large decode is hires' tiled VAE, and {reason}")
