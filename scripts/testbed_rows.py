"""The coherence testbed's rows: what eval_coherence.py compares, built from hires' public API only.

A row is plain diffusers, the trivial baseline (generate at the base size, bicubic-upscale to the
request), the automatic preset (`hires.apply(pipe)` with no config), or one `hires.HiresConfig`,
sampled at the testbed's steps and guidance unless the row names its own: the "defaults" rows run
where users run, at the CLI's defaults (what `hires generate` passes: 20 steps, no guidance argument,
so the pipeline's own default) and at the family's default steps (SDXL's 50, Flux's 28).
The rows live here, not in the library, so the library carries no benchmark definitions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import hires
from hires.presets import AUTOMATIC
from hires.techniques.structure_guidance.guidance import stage_renoise

PLAIN, TRIVIAL, PRESET, CONFIG = "plain", "trivial", "preset", "config"
PIPELINE_GUIDANCE = "pipeline"  # pass no guidance argument: the pipeline's own default, as the CLI does
CLI_STEPS = 20  # hires generate's --steps default (hires/cli.py)
FAMILY_STEPS = {"sd15": 50, "flux": 28}  # SDXL's pipeline default (the UNet's row is its analogue), Flux's


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # PLAIN, TRIVIAL, PRESET or CONFIG
    config: hires.HiresConfig | None = None
    # "standing" (plain, baseline, preset), "defaults" (at the CLI's / family's defaults),
    # "technique" (one alone), "combination", "ablation" (the preset with one switch changed)
    group: str = "technique"
    steps: int | None = None  # None: the eval's --steps
    guidance: float | str | None = None  # None: the eval's --guidance-*; PIPELINE_GUIDANCE: none passed
    sizes: tuple[str, ...] | None = None  # None: every size the eval runs (1x only for plain rows)

    @property
    def settings(self) -> tuple:
        """What the row samples with besides its technique: rows with equal settings share a plain row."""
        return (self.steps, self.guidance)


STANDING = [
    Row("plain diffusers", PLAIN, group="standing"),
    Row("trivial baseline (base size + bicubic upscale)", TRIVIAL, group="standing"),
    Row("automatic preset (hires.apply(pipe))", PRESET, group="standing"),
]


def defaults_rows(family: str) -> list[Row]:
    """Plain, the trivial baseline and the preset at the CLI's defaults; the family's preset and the
    trivial baseline at the family's default steps (each row's baseline samples as the row does)."""
    cli = f"the CLI's defaults ({CLI_STEPS} steps, the pipeline's own guidance)"
    at_cli = {"group": "defaults", "steps": CLI_STEPS, "guidance": PIPELINE_GUIDANCE}
    rows = [Row(f"plain diffusers at {cli}", PLAIN, sizes=("1x", "4x", "16x"), **at_cli),
            Row(f"trivial baseline at {cli}", TRIVIAL, **at_cli),
            Row(f"automatic preset at {cli}", PRESET, **at_cli)]
    steps = FAMILY_STEPS[family]
    at_family = {"group": "defaults", "steps": steps}
    if family == "sd15":
        sdxl = AUTOMATIC["sdxl"]
        sg = sdxl.structure_guidance
        rows.append(Row(f"SDXL analogue: the sdxl preset (renoise {sg.renoise:g}, step fraction {sg.step_fraction:g}) "
                        f"at SDXL's {steps} steps", CONFIG, sdxl, **at_family))
        # the same steps per stage as a shallow renoise (the sdxl preset before step_fraction)
        shallow = dataclasses.replace(sg, renoise=sg.step_fraction, step_fraction=None)
        rows.append(Row(f"SDXL analogue, shallow: renoise {sg.step_fraction:g} in as many steps, at SDXL's {steps} "
                        "steps", CONFIG, dataclasses.replace(sdxl, structure_guidance=shallow), group="ablation",
                        steps=steps))
        rows.append(Row(f"trivial baseline at SDXL's {steps} steps", TRIVIAL, **at_family))
    else:
        rows.append(Row(f"automatic preset at Flux's {steps} steps", PRESET, **at_family))
        rows.append(Row(f"trivial baseline at Flux's {steps} steps", TRIVIAL, **at_family))
    return rows

_ENTROPY = hires.EntropyScalingConfig(enabled=True)
_WINDOWS = hires.WindowAttentionConfig(enabled=True)
_FUSION = hires.ScaleFusionConfig(enabled=True)
_APG = hires.APGConfig(enabled=True)
_BOTTLENECK = hires.BottleneckConfig(enabled=True)
_DILATED = hires.DilatedSamplingConfig(enabled=True)
_SKIP = hires.SkipResidualConfig(enabled=True)


_LADDER = hires.StructureGuidanceConfig(enabled=True, space="latent", upscale_space="pixel", ladder="doubling")


def _structure(space: str) -> hires.StructureGuidanceConfig:
    return hires.StructureGuidanceConfig(enabled=True, space=space)


def _one(name: str, **fields) -> Row:
    return Row(name, CONFIG, hires.HiresConfig(**fields))


def _combo(name: str, **fields) -> Row:
    return Row(name, CONFIG, hires.HiresConfig(**fields), group="combination")


def _every_family_rows() -> list[Row]:
    """The techniques both testbed models take, alone, and structure guidance with entropy scaling."""
    return [
        _one("entropy scaling", entropy_scaling=_ENTROPY),
        _one("window attention (shifted)", window_attention=_WINDOWS),
        _one("scale fusion (FreeScale)", scale_fusion=_FUSION),
        _one("scale fusion, fast (dilated global branch)", scale_fusion=hires.ScaleFusionConfig(
            enabled=True, global_branch="dilated")),
        _one("APG", apg=_APG),
        _one("structure guidance (latent)", structure_guidance=_structure("latent")),
        _one("structure guidance (pixel)", structure_guidance=_structure("pixel")),
        _one("bottleneck (10/70/20)", bottleneck=_BOTTLENECK),
        _combo("structure guidance (pixel) + entropy scaling", structure_guidance=_structure("pixel"),
               entropy_scaling=_ENTROPY),
        _combo("structure guidance (pixel) + scale fusion", structure_guidance=_structure("pixel"),
               scale_fusion=_FUSION),
        _one("dilated sampling (DemoFusion)", dilated_sampling=_DILATED),
        # the skip residual acts on stages that restart from an upscaled result: FreeScale's restart depth
        _combo("skip residual on structure guidance (latent, renoise 0.7)",
               structure_guidance=hires.StructureGuidanceConfig(enabled=True, space="latent", renoise=0.7),
               skip_residual=_SKIP),
        _combo("DemoFusion (structure guidance latent, renoise 1 + skip residual + dilated sampling + local windows)",
               structure_guidance=hires.StructureGuidanceConfig(enabled=True, space="latent", renoise=1.0),
               skip_residual=_SKIP, dilated_sampling=hires.DilatedSamplingConfig(enabled=True, local_windows=True)),
        # The steps from the previous preset (structure guidance (pixel)) to the automatic preset.
        _combo("structure guidance (latent guide, pixel upscale, doubling)", structure_guidance=_LADDER),
        _combo("structure guidance (latent guide, pixel upscale, doubling, 60% guided)",
               structure_guidance=dataclasses.replace(_LADDER, guided_fraction=0.6)),
        _combo("SDXL's preset analogue (as the preset, renoise 0.25)", structure_guidance=dataclasses.replace(
            _LADDER, guided_fraction=0.6, renoise=0.25), window_attention=_WINDOWS, memory=hires.MemoryConfig(enabled=True)),
    ]


def ablation_rows(family: str) -> list[Row]:
    """The family's automatic preset with one switch of its path changed: what each contributes to colour,
    halo, clipping and detail (the fidelity issue's list; VAE precision is no switch of the preset:
    scripts/testbed_vae_precision.py decodes the preset's latents in each dtype)."""
    preset = AUTOMATIC[family]
    sg = preset.structure_guidance
    own_renoise = stage_renoise(sg.renoise, CLI_STEPS)  # the value the preset's stages run

    def changed(name: str, **fields) -> Row:
        return Row(f"preset, {name}", CONFIG, dataclasses.replace(preset, **fields), group="ablation")

    return [
        changed("no anti-ringing", structure_guidance=dataclasses.replace(sg, anti_ringing=False)),
        changed("no sharpening of the guide", structure_guidance=dataclasses.replace(sg, sharpen_alpha=0.0)),
        changed("guide band: wavelet level 2", structure_guidance=dataclasses.replace(sg, wavelet_level=2)),
        *(changed(f"renoise {r:g}", structure_guidance=dataclasses.replace(sg, renoise=r))
          for r in (0.15, 0.3, 0.5, 0.7) if r != own_renoise),
        # the same renoised depth in the steps of a shallower one: what depth contributes apart from steps
        *(changed(f"step fraction {f:g}", structure_guidance=dataclasses.replace(sg, step_fraction=f))
          for f in (0.15, 0.3) if f < own_renoise and f != sg.step_fraction),
        *([changed("every step of its renoise", structure_guidance=dataclasses.replace(sg, step_fraction=None))]
          if sg.step_fraction is not None else []),
        # the DiT's positions left to its own extrapolation instead of interpolated into the base grid's range
        *([changed("no positions", positions=hires.PositionConfig())] if preset.positions.enabled else []),
        # the DiT's RoPE rescaled by YaRN (high frequencies kept as trained) or DyPE instead of interpolated
        *([changed("YaRN positions", positions=hires.PositionConfig(enabled=True, rope="yarn")),
           changed("DyPE positions", positions=hires.PositionConfig(enabled=True, rope="yarn", timestep_dependent=True))]
          if preset.positions.rope == "interpolation" else []),
        changed("hard hand-over", structure_guidance=dataclasses.replace(sg, handover="hard")),
        changed("guide fading over half the steps", structure_guidance=dataclasses.replace(sg, guided_fraction=0.5)),
        changed("no window attention", window_attention=hires.WindowAttentionConfig(enabled=False)),
    ]


def unet_rows() -> list[Row]:
    """Rows for the UNet testbed model (StableDiffusionPipeline)."""
    redil = hires.RedilationConfig
    return STANDING + defaults_rows("sd15") + ablation_rows("sd15") + [
        _one("re-dilation", redilation=redil(enabled=True, noise_damped_guidance=False, dispersion_modules=())),
        _one("re-dilation + dispersion (mid block)", redilation=redil(
            enabled=True, noise_damped_guidance=False, dispersion_modules=("mid_block",))),
        _one("re-dilation + noise-damped guidance", redilation=redil(
            enabled=True, noise_damped_guidance=True, dispersion_modules=())),
        _one("ScaleCrafter preset (every re-dilation switch)", redilation=redil(enabled=True)),
        _one("RAU-Net (HiDiffusion)", rau_net=hires.RAUNetConfig(enabled=True)),
    ] + _every_family_rows() + [
        _combo("structure guidance (pixel) + re-dilation + noise-damped guidance",
               structure_guidance=_structure("pixel"),
               redilation=redil(enabled=True, noise_damped_guidance=True, dispersion_modules=())),
        _combo("structure guidance (pixel) + RAU-Net", structure_guidance=_structure("pixel"),
               rau_net=hires.RAUNetConfig(enabled=True)),
    ]


def dit_rows() -> list[Row]:
    """Rows for the DiT testbed model (FluxPipeline)."""
    pos = hires.PositionConfig
    return STANDING + defaults_rows("flux") + ablation_rows("flux") + [
        _one("positions: YaRN RoPE (default)", positions=pos(enabled=True)),
        _one("positions: NTK RoPE", positions=pos(enabled=True, rope="ntk")),
        _one("positions: interpolation (PI)", positions=pos(enabled=True, rope="interpolation")),
        _one("positions: DyPE (timestep-dependent YaRN)", positions=pos(enabled=True, timestep_dependent=True)),
    ] + _every_family_rows() + [
        _combo("structure guidance (pixel) + positions (PI)", structure_guidance=_structure("pixel"),
               positions=pos(enabled=True, rope="interpolation")),
        _combo("structure guidance (pixel) + HiFlow flow alignment", structure_guidance=_structure("pixel"),
               flow_alignment=hires.FlowAlignmentConfig(enabled=True)),
        _combo("structure guidance (pixel) + HiFlow flow alignment + DyPE", structure_guidance=_structure("pixel"),
               flow_alignment=hires.FlowAlignmentConfig(enabled=True),
               positions=pos(enabled=True, timestep_dependent=True)),
    ]


ROWS = {"sd15": unet_rows, "flux": dit_rows}
