"""Re-dilation presets (ScaleCrafter's official configs) for the UNet families: data, and the rule
for sizes between them.

Each preset is keyed by the requested area over the family's base area and by the aspect ratio
(long side / short side; a tall image uses the wide preset, the convolutions being isotropic), so
the same table serves a 64 px tiny model and a 1024 px SDXL alike. Step ranges are fractions of the
schedule: the official 50-step loop index bound tau becomes tau / 50.

Module names are written as they exist in the family's full-size diffusers UNet (`depth` resolution
levels). SDXL's official configs name `down_blocks.3`, `down_blocks.2.downsamplers` and
`up_blocks.2.upsamplers`, which SDXL lacks and the official code skipped silently; the SDXL rows
below list what those configs actually dilated (reference: shared/references/scalecrafter.md).

Dispersion: the official *_disperse configs ship `inflate_tau: 0`, so dispersion never ran there.
Here the 16x-area presets run it on the official layer lists for the whole re-dilation window (our
choice of step range; `dispersion_modules=()` or `dispersion_stop_fraction=0` gives the official
behaviour).

Rule for any other size (`preset_for`):
- area ratio r = (height * width) / (base_height * base_width), aspect a = long / short side;
- an exact (r, a) match takes that preset;
- otherwise the preset with the nearest log area ratio (ties: the nearest log aspect, then the
  smaller area) gives the modules, step fractions, progressive and NDCFG switches, and every factor
  is multiplied by sqrt(r / r_preset): dilation follows the side scale of an equal-area square
  (2 at 4x, 2.5 at 6.25x, 4 at 16x in the official table). Factors that end up <= 1 are dropped, so
  nothing is dilated at or below the base area.

A UNet with fewer resolution levels than the family's full-size one (the tiny test models) gets the
preset mapped by distance from the bottleneck: `down_blocks.i` of the full-size table is the block
`depth - 1 - i` levels above the mid block, `up_blocks.i` the block i levels below it; levels the
smaller UNet does not have are left out (listed in the call's notes).
"""

from __future__ import annotations

import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class RedilationPreset:
    area_ratio: float
    aspect: float  # long side / short side
    official_size: str  # the official config it reproduces, e.g. "2048x1024"
    stop_fraction: float
    progressive: bool
    dilations: tuple[tuple[str, float], ...]
    # NDCFG and dispersion run in the re-dilation window (every official config has ndcfg_tau = dilate_tau)
    noise_damped_guidance: bool = False
    ndcfg_dilations: tuple[tuple[str, float], ...] = ()
    dispersion_modules: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class FamilyPresets:
    depth: int  # resolution levels of the family's full-size UNet (len(down_blocks))
    presets: tuple[RedilationPreset, ...]


def _blocks(factor: float, *names: str) -> tuple[tuple[str, float], ...]:
    return tuple((name, factor) for name in names)


_SD_INNER = ("down_blocks.1", "down_blocks.2", "down_blocks.3",
             "mid_block", "up_blocks.0", "up_blocks.1", "up_blocks.2")
_SD15_2048 = (("down_blocks.1", 2), ("down_blocks.2", 3), ("down_blocks.3", 4), ("mid_block", 4),
              ("up_blocks.0", 4), ("up_blocks.1", 3), ("up_blocks.2", 2))
_SD15_2048_NDCFG = (("down_blocks.2", 3), ("down_blocks.3", 4),
                    ("mid_block", 4), ("up_blocks.0", 4), ("up_blocks.1", 3))
_SD_DISPERSION = ("down_blocks.2.downsamplers", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1")

_SD21_2048_NDCFG = (("down_blocks.2.resnets", 3), ("down_blocks.2.downsamplers", 4), ("down_blocks.3", 4),
                    ("mid_block", 4), ("up_blocks.0", 4), ("up_blocks.1", 4), ("up_blocks.2", 3))

PRESETS: dict[str, FamilyPresets] = {
    "sd15": FamilyPresets(depth=4, presets=(
        RedilationPreset(4.0, 1.0, "1024x1024", 0.6, False, _blocks(2, *_SD_INNER)),
        RedilationPreset(6.25, 1.0, "1280x1280", 0.7, False, _blocks(2.5, *_SD_INNER)),
        RedilationPreset(8.0, 2.0, "2048x1024", 0.7, True, _SD15_2048, True, _SD15_2048_NDCFG),
        RedilationPreset(16.0, 1.0, "2048x2048", 0.7, True, _SD15_2048, True, _SD15_2048_NDCFG, _SD_DISPERSION),
    )),
    "sd21": FamilyPresets(depth=4, presets=(
        RedilationPreset(4.0, 1.0, "1024x1024", 0.4, False, _blocks(2, *_SD_INNER)),
        RedilationPreset(6.25, 1.0, "1280x1280", 0.6, False, _blocks(2.5, *_SD_INNER)),
        # the official file has an NDCFG map for this size but ndcfg_tau 0: off
        RedilationPreset(8.0, 2.0, "2048x1024", 0.74, True, _SD15_2048),
        RedilationPreset(16.0, 1.0, "2048x2048", 0.74, True,
                         _SD21_2048_NDCFG + (("up_blocks.3.resnets", 2),), True, _SD21_2048_NDCFG, _SD_DISPERSION),
    )),
    "sdxl": FamilyPresets(depth=3, presets=(
        RedilationPreset(4.0, 1.0, "2048x2048", 0.6, False, _blocks(2, "mid_block", "up_blocks.0")),
        RedilationPreset(6.25, 1.0, "2560x2560", 0.6, False, _blocks(2.5, "mid_block", "up_blocks.0")),
        RedilationPreset(8.0, 2.0, "4096x2048", 0.7, True,
                         (("down_blocks.2", 3), ("mid_block", 4), ("up_blocks.0", 4), ("up_blocks.1", 3),
                          ("up_blocks.2", 2)),
                         True, _blocks(2, "mid_block", "up_blocks.0")),
        RedilationPreset(16.0, 1.0, "4096x4096", 0.7, True,
                         (("down_blocks.2", 4), ("mid_block", 4), ("up_blocks.0", 4), ("up_blocks.1", 3),
                          ("up_blocks.2", 2)),
                         True, _blocks(2, "mid_block", "up_blocks.0"), ("down_blocks.2", "mid_block", "up_blocks.0")),
    )),
}


def family_presets(family: str) -> FamilyPresets:
    if family not in PRESETS:
        raise ValueError(f"no re-dilation presets for family {family!r}; presets exist for {', '.join(PRESETS)}")
    return PRESETS[family]


def preset_for(family: str, area_ratio: float, aspect: float) -> RedilationPreset:
    """The preset for a requested size (see the module docstring for the rule)."""
    if not (area_ratio > 0 and aspect >= 1):
        raise ValueError(f"area_ratio={area_ratio!r} must be > 0 and aspect={aspect!r} >= 1 (long / short side)")
    table = family_presets(family).presets
    for preset in table:
        if math.isclose(preset.area_ratio, area_ratio,
                        rel_tol=1e-6) and math.isclose(preset.aspect, aspect, rel_tol=1e-6):
            return preset
    nearest = min(table, key=lambda p: (round(abs(math.log(area_ratio / p.area_ratio)), 9),
                                        round(abs(math.log(aspect / p.aspect)), 9), p.area_ratio))
    gain = math.sqrt(area_ratio / nearest.area_ratio)

    def scaled(pairs):
        return tuple((name, factor * gain) for name, factor in pairs if factor * gain > 1 + 1e-9)

    return dataclasses.replace(nearest, area_ratio=area_ratio, aspect=aspect,
                               official_size=f"{nearest.official_size} scaled x{gain:.3f}",
                               dilations=scaled(nearest.dilations), ndcfg_dilations=scaled(nearest.ndcfg_dilations))


_BLOCK_NAME = re.compile(r"^(down_blocks|up_blocks)\.(\d+)(\..*)?$")


def map_to_depth(name: str, table_depth: int, unet_depth: int) -> str | None:
    """A full-size module name mapped onto a UNet of `unet_depth` levels by distance from the
    bottleneck; None where that UNet has no such level."""
    match = _BLOCK_NAME.match(name)
    if match is None or table_depth == unet_depth:
        return name
    kind, index, rest = match.group(1), int(match.group(2)), match.group(3) or ""
    if kind == "down_blocks":
        index = unet_depth - 1 - (table_depth - 1 - index)
    if not 0 <= index < unet_depth:
        return None
    return f"{kind}.{index}{rest}"
