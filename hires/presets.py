"""What `hires.apply(pipe)` uses when no config is given: the combination the evidence supports.

One entry per family: structure guidance whose stages double the side (base -> 2x -> 4x ...), each
stage upscaling the previous result once through the VAE (decode, bicubic with the anti-ringing
clamp, encode) and guiding the first 60% of its steps with the low wavelet band of that latent;
window attention (each layer's base-size grid) in the stages above the base size; the memory
planner with VAE tiling where a pass would not fit. Every part leaves a call at the model's base
size unchanged (structure guidance runs one stage there, the windows cover the whole grid, the
planner changes nothing that fits), so the preset only acts above the base size.

Evidence (coherence testbed v2, 15 steps, seeds 500+ not used elsewhere, 2026-12-02; one-object
share / object detail / halo, n = 12 at 16x and 4 at 64x; docs/testbed.md has the full tables):
- testbed UNet at 16x: this preset 1.00 / 0.52 / 0.05, against 0.62 / 0.58 / 0.11 for the previous
  preset (pixel-space guidance on DiffuseHigh's +1-base-side ladder, n = 8), plain 0.00 and the
  trivial baseline 1.00 / 0.09. Guiding 60% of a stage's steps instead of a third is what lifts
  the count (1.00 vs 0.62, n = 8); fewer steps per stage with windows lose it (3 steps: 0.42).
  At 64x it keeps one object in 2 of 4 images (previous preset: 1 of 2).
- testbed Flux DiT (v1 model, untextured, so only the count and halo mean anything) at 16x:
  0.62 / halo 0.10 against 0.25 / 0.52 for the previous preset (n = 8).
- Cost (scripts/benchmarks/preset.py, real-size architectures on the meta device): SDXL 4096^2
  4.95 PFLOPs (0.17x direct) and 8192^2 22.3 PFLOPs (0.064x), Flux.1-dev 4096^2 0.125x direct. SDXL
  re-runs 0.25 of the schedule per stage (13 of 50 steps) instead of 0.3 to stay within 5 PFLOPs
  at 4096^2; on the testbed that analogue keeps 11 of 12 at 16x.
- SD3 keeps PositionConfig: without it SD3 cannot run past its table (3072 px for SD3/3.5-Large).
  PixArt-Sigma keeps it too: at its defaults it changes no position, and it turns the pipeline's
  silent resolution binning into an error that says how to turn binning off. Neither is measured
  on the testbed (its DiT is a Flux).
"""

from __future__ import annotations

import dataclasses

from .config import HiresConfig, MemoryConfig, PositionConfig, StructureGuidanceConfig, WindowAttentionConfig

STRUCTURE = StructureGuidanceConfig(enabled=True, space="latent", upscale_space="pixel", ladder="doubling",
                                    guided_fraction=0.6)


def _preset(structure: StructureGuidanceConfig = STRUCTURE, positions: bool = False, windows: bool = True,
            memory: bool = True) -> HiresConfig:
    return HiresConfig(structure_guidance=structure, window_attention=WindowAttentionConfig(enabled=windows),
                       memory=MemoryConfig(enabled=memory, above_base_only=True),
                       positions=PositionConfig(enabled=True) if positions else PositionConfig())


AUTOMATIC: dict[str, HiresConfig] = {
    "sd15": _preset(),
    "sd21": _preset(),
    "sdxl": _preset(dataclasses.replace(STRUCTURE, renoise=0.25)),
    "pixart": _preset(positions=True),
    "sd3": _preset(positions=True),
    "flux": _preset(),
    # Not measured on the testbed; as Flux's (the testbed's flow DiT) where the family allows it: Qwen-Image's
    # causal 3D VAE cannot be tiled (no memory planner), Z-Image's padded attention cannot be windowed.
    "qwenimage": _preset(memory=False),
    "zimage": _preset(windows=False),
    # Flux.2 and Chroma are flow DiTs of Flux's design (packed latents, RoPE): the testbed's Flux
    # evidence stands for them, so they get Flux's preset.
    "flux2": _preset(),
    "flux2_klein": _preset(),
    "chroma": _preset(),
}


def automatic_config(info) -> HiresConfig:
    """The automatic preset of `info`'s family (a `hires.ModelInfo`)."""
    return AUTOMATIC[info.name]
