"""What `hires.apply(pipe)` uses when no config is given: the combination the evidence supports.

One entry per family: structure guidance whose stages double the side (base -> 2x -> 4x ...), each
stage upscaling the previous result once through the VAE (decode, bicubic with the anti-ringing
clamp, encode) and guiding its steps with the low wavelet band of that latent, the guide's weight
fading linearly from 1 at the stage's first step toward 0 at its last (`handover="fade"`);
window attention (windows of the base area at the call's aspect) in the stages above the base size;
the memory planner with VAE tiling where a pass would not fit, on calls above the base area. Every part
leaves a call at the model's base size unchanged (structure guidance runs one stage there, the windows
cover the whole grid, the planner changes nothing that fits), so the preset only acts above the base size.

Measured on the shipped testbed v3 models (docs/testbed.md: one run of scripts/eval_coherence.py, 2026-12-08,
report seeds, n = 24 per cell; one object / prompted colour / object detail against plain 1x / halo, 16x and 64x):
the UNet at 15 steps 0.96 / 0.96 / 1.20 / 0.022 and 0.96 / 0.96 / 1.30 / 0.023 (the trivial baseline misses the
same prompt: 0.96 / 0.96 / 0.16 and 0.07), at the CLI's defaults (20 steps, guidance 7.5) 1.00 / 1.00 / 1.17 /
0.039 and 1.00 / 1.00 / 1.31 / 0.040, the sdxl preset at 50 steps 1.00 / 1.00 / 1.15 / 0.035 and 1.00 / 1.00 /
1.27 / 0.038 (plain 1x: halo 0.028-0.031, clipped <= 0.0001 against the preset's 0.0001-0.0013); the DiT at 15
steps 0.96 / 0.92 / 0.38 / 0.026 and 0.83 / 0.92 / 0.33 / 0.000, at 20 steps 0.88 / 0.96 / 0.27 / 0.003 and
0.79 / 0.92 / 0.22 / 0.061, at 28 steps 0.83 / 0.92 / 0.40 / 0.018 and 0.92 / 0.92 / 0.34 / 0.029 (plain draws
no object above 1x). The choices below were made on earlier models and tuning seeds.

Evidence for how deep a stage re-noises and in how many steps (2026-12-07, testbed v3 candidates: the 9,000-step
wide UNet and the 6,000-step wide DiT with the v3 VAE; tuning seeds 500000+, n = 12 per cell, 15 steps; object
detail / background detail / halo against plain 1x): on the UNet at 16x the previous renoise 0.3 gave
0.64 / 0.57 / 0.012, renoise 0.5 0.98 / 0.82 / 0.010, 0.7 1.23 / 0.98 / 0.009 (at 64x 0.72 / 0.63 against
1.25 / 1.02; one object 11 of 12 and the prompted colour 12 of 12 in each); renoise 0.7 in the steps of 0.3
(`step_fraction=0.3`, the same cost) 1.08 / 0.89 / 0.010. On the DiT at 16x renoise 0.3 0.29 / 0.51 / 0.009,
0.5 0.41 / 0.65 / 0.003, 0.5 in the steps of 0.3 0.41 / 0.62 / 0.006 (at 64x renoise 0.5 kept the one-object
share, 10 of 12 either way, and took the halo from 0.014 to 0.001; 0.7 lost objects there on the 3,000-step DiT,
9 of 12 against 11). A guide fading over half of each stage's steps instead of all gave the UNet 12 of 12 and
1.26 / 0.99 / 0.008, the DiT 9 of 12 (against 12) and 0.44 / 0.65 / 0.002: the preset keeps the whole stage. So the
UNet re-runs 0.7 of its schedule, SDXL 0.7 in a quarter of the call's steps (its cost as before) and the flow
DiTs 0.85 in 0.3 of them (as before: 0.125x direct at Flux 4096^2; every step of 0.5 would be 0.200x). With PI (below)
on the DiT, renoise 0.5 / 0.7 / 0.85 in 0.3 of the steps gave object detail 0.38 / 0.45 / 0.49 at 16x (background
0.52 in each, halo 0.000, one object 12 of 12), and 0.85 at 64x 0.34 (0.30 at 0.5), one object 12 of 12, halo 0.000;
at the CLI's 20 steps 0.85 at 64x read 0.30 / 0.51, halo 0.026, one object 12 of 12.
Stage APG (StructureGuidanceConfig.apg) on the UNet took the clipped pixels at the CLI's guidance 7.5 and 64x from
0.0006 to 0.0002 and its halo from 0.013 to 0.007, but raised the halo at 15 steps / guidance 5 and 64x (0.016 to
0.023) and drew two objects for README command 1's seed 7 on the shipped model: not in the preset.
On the UNet at SDXL's 50 steps (the sdxl preset's analogue), 13 steps per stage either way: renoise 0.25 gave
0.60 / 0.60 / 0.016 at 16x and 0.70 / 0.65 / 0.016 at 64x, 0.7 in those steps 1.20 / 0.96 / 0.013 and
1.23 / 1.00 / 0.008 (one object 12 of 12 in all four).
Positions on the DiT (same models and seeds): without PositionConfig its stages above 2x drew a warm band along the
bottom border (the background's bottom 4 rows off the middle's by 15.4 levels on average, 29.6 at most, at 16x;
3.6 in plain 1x), which no halo or clip measure sees; with RoPE positions interpolated into the base grid's range
(`PositionConfig(rope="interpolation")`) 4.5 (8.0 at most), one object 12 of 12 at 16x and 64x (10 of 12 without
at 64x), halo 0.000 at both (0.006 / 0.005), object detail 0.38 / 0.30 (0.41 / 0.29), background detail 0.52 / 0.49
(0.62 / 0.62). The flow DiTs' preset interpolates their positions where their record allows it.

Evidence for the fading hand-over (2026-12-06, testbed v2 UNet, tuning seeds 7000+, not the report seeds):
with the previous rule (60% of the steps guided, then none) a 20-step call (6-step stage) handed the low band
back at t = 51 and the CFG-extrapolated prediction of that step turned 3 of README command 1's seeds 0-7 green
or yellow; fading over the whole stage kept all 8 red with one object. Over the 12 prompts (n = 12 per cell),
one object / colour-correct share: 4x at 20 steps, CFG 7.5 0.75 / 0.83 (previous) against 0.92 / 1.00; 16x
0.33 / 0.83 against 0.67 / 0.92; 16x at 15 steps, CFG 5 0.33 / 0.83 (fading over 60%) against 0.67 / 0.92.

Earlier evidence (coherence testbed v2, 15 steps, 2026-12-02; one-object share / object detail / halo):
- The choice was made in exploration runs on the testbed UNet at 16x (seeds 0 and 500, n = 8-12):
  pixel-space guidance on DiffuseHigh's +1-base-side ladder (the previous preset) 0.62 / 0.58 / 0.11;
  a latent guide from one pixel upscale per stage on the doubling ladder 0.62 / 0.61 / 0.05; guiding
  60% of each stage's steps instead of a third 1.00 (n = 8); with window attention 1.00 / 0.52 / 0.05
  (n = 12); fewer steps per stage with windows lose it (3 steps: 0.42). At 64x windows cost coherence
  (0.50 with, 0.75 without, n = 4) but are what keeps the FLOPs below.
- On the testbed models of that time (the first v2 UNet, the v1 Flux DiT), same seeds in every row:
  UNet 16x 0.83 / 0.47 / 0.019 against the previous preset's 0.67 / 0.54 / 0.127 (n = 6; plain 0.00,
  trivial baseline 1.00 / 0.10); 64x 0.67 (n = 3) against 0.00 (n = 1). DiT 16x 0.17 / halo 0.10
  against 0.17 / 0.60 (n = 6), 64x 0.33 against 0.00.
- A run of that time (docs/testbed.md before testbed v3) on the retrained models (UNet trained longer, DiT v2 on the
  textured pictures): UNet 4x / 16x / 64x 0.62 / 0.88 / 0.00 (n = 8 / 8 / 3; plain 0.62 / 0.00 /
  0.00), DiT 0.75 / 0.75 / 0.00 (plain 0.00 / 0.00 / 0.00). The preset was not re-chosen on them.
- Cost (scripts/benchmarks/preset.py, real-size architectures on the meta device): SDXL 4096^2
  4.96 PFLOPs (0.170x direct) and 8192^2 22.3 PFLOPs (0.064x), Flux.1-dev 4096^2 0.125x direct. SDXL
  runs 0.25 of the call's steps per stage (13 of 50; then 0.25 of the schedule, now 0.7 of it respaced into
  those steps) instead of 0.3 to stay within 5 PFLOPs at 4096^2; on the earlier testbed UNet the shallow
  analogue kept 11 of 12 at 16x in exploration, 5 of 6 at 16x and 1 of 3 at 64x.
- Each family's preset is that one, less what its record says hires cannot do there (hires.families):
  no window attention where its attention cannot be rewritten (`attention_unsupported`: Z-Image's padded
  attention, Flux 3, ERNIE-Image, Krea-2, HiDream-I1, Qwen-Image 2.1), no memory planner where its VAE cannot
  be tiled (`VAEKind.untileable`: Qwen-Image's causal 3D VAE, Krea-2, Qwen-Image 2.1's RGBA VAE), no positions
  where they cannot be rescaled (`positions_unsupported`: ERNIE-Image, Krea-2, HiDream-I1, Qwen-Image 2.1). Families
  with sin-cos position tables (SD3, PixArt-Sigma) keep PositionConfig: without it SD3 cannot run past its
  table (3072 px for SD3/3.5-Large), and at its defaults PixArt's positions do not change while its
  pipeline's silent resolution binning becomes an error that says how to turn binning off. Neither is
  measured on the testbed (its DiT is a Flux). The families not measured run the preset of the one whose
  evidence stands for them (`Family.automatic_preset`: Flux's for every flow DiT).
"""

from __future__ import annotations

import dataclasses

from .config import HiresConfig, MemoryConfig, PositionConfig, StructureGuidanceConfig, WindowAttentionConfig
from .families import FAMILIES, Family

STRUCTURE = StructureGuidanceConfig(enabled=True, space="latent", upscale_space="pixel", ladder="doubling",
                                    guided_fraction=1.0, handover="fade")


def _preset(structure: StructureGuidanceConfig = STRUCTURE, positions: PositionConfig = PositionConfig(),
            windows: bool = True, memory: bool = True) -> HiresConfig:
    return HiresConfig(structure_guidance=structure, window_attention=WindowAttentionConfig(enabled=windows),
                       memory=MemoryConfig(enabled=memory, above_base_only=True), positions=positions)


# Structure guidance as the evidence chose it for a family (by the name its records' `automatic_preset` give);
# every other family runs STRUCTURE. How deep a stage re-noises is the detail it can draw at its own scale, more
# than how many steps it takes there (above): the UNet re-runs 0.7 of its schedule; SDXL and the flow DiT start as
# deep (0.7, 0.85) in a quarter / 0.3 of the call's steps, to keep SDXL 4096^2 within 5 PFLOPs and Flux within 0.15x.
STRUCTURE_BY_EVIDENCE: dict[str, StructureGuidanceConfig] = {
    "sd15": dataclasses.replace(STRUCTURE, renoise=0.7),
    "sdxl": dataclasses.replace(STRUCTURE, renoise=0.7, step_fraction=0.25),
    "flux": dataclasses.replace(STRUCTURE, renoise=0.85, step_fraction=0.3),
}


# Positions as the evidence chose them: the flow DiT's RoPE positions interpolated into the base grid's range (above:
# without it the testbed DiT tinted the bottom border and lost objects at 64x); the sin-cos tables as
# PositionConfig's defaults (SD3 cannot run past its table without it).
POSITIONS_BY_EVIDENCE: dict[str, PositionConfig] = {"flux": PositionConfig(enabled=True, rope="interpolation")}


def _positions(family: Family) -> PositionConfig:
    if family.sincos_positions:
        return PositionConfig(enabled=True)
    if family.positions_unsupported is not None:
        return PositionConfig()
    return POSITIONS_BY_EVIDENCE.get(family.automatic_preset or family.name, PositionConfig())


def family_preset(family: Family) -> HiresConfig:
    """The automatic preset of `family`: its evidence's structure guidance and positions, windows and the memory
    planner, each where its record allows it."""
    structure = STRUCTURE_BY_EVIDENCE.get(family.automatic_preset or family.name, STRUCTURE)
    return _preset(structure, positions=_positions(family), windows=family.attention_unsupported is None,
                   memory=family.vae.untileable is None)


# Every family's automatic preset.
AUTOMATIC: dict[str, HiresConfig] = {family.name: family_preset(family) for family in FAMILIES}


def automatic_config(info) -> HiresConfig:
    """The automatic preset of `info`'s family (a `hires.ModelInfo`)."""
    return family_preset(info.family)
