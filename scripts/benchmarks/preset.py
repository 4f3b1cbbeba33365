"""The automatic preset's cost at real size: every stage of hires' own plan, denoiser and VAE FLOPs.

The stage list, each stage's steps and its VAE passes come from the code that runs them
(`hires.presets.automatic_config`, `progressive.stage_sizes`, `progressive.stage_step_count`, the guided
fraction); the FLOPs of one denoiser step and of one VAE pass at each size are counted by
FlopCounterMode on real-size architectures built on the meta device (public config values), with
the preset's window attention installed where the preset enables it. A preset that turns on a
technique this count does not model is an error here, not a silent undercount.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import torch

from benchmarks.attention import _fake_attachment, _flux_inputs, _sdxl_inputs
from benchmarks.common import FLUX_DEV, FULL_SIZE_UNETS, Table, fmt
from benchmarks.progressive import _flops

GB = 10**9
VAE_BUDGET = 24 * GB  # tiling decisions as the planner takes them for a 24 GB device
# Techniques whose FLOPs this count models (positions, entropy scaling: the same work; memory and
# tiling: counted through the tiling decision; window attention: installed on the counted model).
MODELLED = {"structure_guidance", "window_attention", "positions", "entropy_scaling", "memory", "vae_tiling"}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    label: str
    family: str
    steps: int
    cfg_batch: int  # denoiser batch per step: 2 with batched CFG, 1 for guidance-distilled Flux
    patch: int
    latent_channels: int
    sizes: tuple[int, ...]


SPECS = {
    "sdxl": ModelSpec("SDXL base", "sdxl", 50, 2, 1, 4, (2048, 4096, 8192)),
    "flux": ModelSpec("Flux.1-dev", "flux", 28, 1, 2, 16, (2048, 4096)),
}


def _vae_config(spec: ModelSpec) -> dict:
    from benchmarks.progressive import sdxl_vae

    config = dict(sdxl_vae().config)
    if spec.family == "flux":
        config.update(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                      shift_factor=0.1159, force_upcast=False)
    return {k: v for k, v in config.items() if not k.startswith("_")}


@functools.lru_cache(maxsize=None)
def _models(family: str):
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel

    spec = SPECS[family]
    with torch.device("meta"):
        denoiser = (UNet2DConditionModel(**FULL_SIZE_UNETS["sdxl"]) if family == "sdxl"
                    else FluxTransformer2DModel(**FLUX_DEV)).eval()
        vae = AutoencoderKL(**_vae_config(spec)).eval()
    return denoiser, vae


@functools.lru_cache(maxsize=None)
def denoiser_step_flops(family: str, height: int, width: int, windows: bool) -> int:
    """One denoising step at height x width px (the CFG batch included)."""
    from hires.config import WindowAttentionConfig
    from hires.techniques.window_attention.windows import install as install_window_attention

    spec = SPECS[family]
    model, _ = _models(family)
    if windows:
        model = copy.deepcopy(model)
        attachment = _fake_attachment(model, family, spec.patch, max(height, width))
        attachment.state.height, attachment.state.width = height, width
        install_window_attention(attachment, WindowAttentionConfig(enabled=True))
        for processor in model.attn_processors.values():
            processor.attachment = attachment
    assert height == width, "the count runs square sizes"
    inputs = _sdxl_inputs(height) if family == "sdxl" else _flux_inputs(height)
    return spec.cfg_batch * _flops(lambda: model(**inputs))


@functools.lru_cache(maxsize=None)
def _untiled_vae_flops(family: str, kind: str, side: int) -> int:
    _, vae = _models(family)
    channels = SPECS[family].latent_channels
    if kind == "decode":
        return _flops(lambda: vae.decode(torch.empty(1, channels, side // 8, side // 8, device="meta")))
    return _flops(lambda: vae.encode(torch.empty(1, 3, side, side, device="meta")))


@functools.lru_cache(maxsize=None)
def _tiling_overhead_per_pixel(family: str, kind: str) -> float:
    """Extra FLOPs per output pixel of hires' tiled VAE (it recomputes each segment's prefix once per
    GroupNorm): measured at 2048 px, where counting tiles on meta is quick; the overhead is local
    work, so it scales with the area (measured 1024 -> 2048 -> 4096: x4.1, x4.05 per doubling)."""
    from hires.techniques.memory import tiled_vae

    _, vae = _models(family)
    side = 2048
    channels = SPECS[family].latent_channels
    if kind == "decode":
        tiled = _flops(lambda: tiled_vae.tiled_decode(vae, torch.empty(1, channels, side // 8,
                                                                       side // 8, device="meta")))
    else:
        tiled = _flops(lambda: tiled_vae.tiled_encode(vae, torch.empty(1, 3, side, side, device="meta")))
    return (tiled - _untiled_vae_flops(family, kind, side)) / side**2


def _tiles(family: str, kind: str, side: int) -> bool:
    from hires.techniques.memory import estimate as memory_planner

    _, vae = _models(family)
    channels = SPECS[family].latent_channels
    shape = (1, channels, side // 8, side // 8) if kind == "decode" else (1, 3, side, side)
    dtype = torch.float32 if vae.config.force_upcast else torch.bfloat16
    peak = memory_planner.vae_peak_bytes(vae, kind, shape, dtype, tiled=False, device_type="cuda")
    return peak > VAE_BUDGET - memory_planner.module_bytes(vae, dtype)


def vae_flops(family: str, kind: str, side: int) -> tuple[int, bool]:
    """FLOPs of one VAE pass at side x side px, tiled where the planner would tile on a 24 GB device."""
    tiled = _tiles(family, kind, side)
    flops = _untiled_vae_flops(family, kind, side)
    if tiled:
        flops += int(_tiling_overhead_per_pixel(family, kind) * side**2)
    return flops, tiled


@dataclasses.dataclass
class StageCost:
    side: int
    steps: int
    decodes: list  # sides of the decodes this stage runs (the previous result, guided steps)
    encodes: list
    denoiser: int = 0
    vae: int = 0


def preset_plan(family: str, config, side: int) -> list[StageCost]:
    """The stages `config` runs for a side x side request, as hires' planner lays them out."""
    from hires.techniques.structure_guidance import guidance as progressive

    enabled = set(config.enabled_techniques())
    if enabled - MODELLED:
        raise NotImplementedError(f"the preset enables {sorted(enabled - MODELLED)}, whose FLOPs this count does not "
                                  "model")
    spec = SPECS[family]
    info = _fake_attachment(_models(family)[0], family, spec.patch, side).state.info
    sg = config.structure_guidance
    sizes = progressive.stage_sizes(info, sg, side, side) if sg.enabled else [(side, side)]
    later = len(sizes) - 1
    renoise = progressive.per_stage(sg, "renoise", later)
    fractions = progressive.per_stage(sg, "step_fraction", later)
    guided = progressive.per_stage(sg, "guided_steps", later)
    upscale_in_pixels = (sg.upscale_space or sg.space) == "pixel"
    stages = [StageCost(sizes[0][0], spec.steps, [], [])]
    for i, (h, _) in enumerate(sizes[1:]):
        steps = progressive.stage_step_count(spec.steps, progressive.stage_renoise(renoise[i], spec.steps),
                                             fractions[i])
        n_guided = guided[i] if guided[i] is not None else progressive.guided_steps_for(steps, sg)
        decodes = [sizes[i][0]] if upscale_in_pixels else []
        encodes = [h] if upscale_in_pixels else []
        if sg.space == "pixel":
            decodes += [h] * n_guided
            encodes += [h] * n_guided
        stages.append(StageCost(h, steps, decodes, encodes))
    stages[-1].decodes.append(side)  # the user's call decodes the result
    windows = config.window_attention.enabled
    for stage in stages:
        stage.denoiser = stage.steps * denoiser_step_flops(family, stage.side, stage.side, windows)
        stage.vae = sum(vae_flops(family, "decode", s)[0] for s in stage.decodes) + sum(
            vae_flops(family, "encode", s)[0] for s in stage.encodes)
    return stages


def direct_flops(family: str, side: int) -> int:
    spec = SPECS[family]
    return spec.steps * denoiser_step_flops(family, side, side, False) + vae_flops(family, "decode", side)[0]


def preset_table() -> Table:
    from hires.presets import AUTOMATIC

    rows = []
    for family, spec in SPECS.items():
        config = AUTOMATIC[family]
        for side in spec.sizes:
            stages = preset_plan(family, config, side)
            denoiser = sum(s.denoiser for s in stages)
            vae = sum(s.vae for s in stages)
            direct = direct_flops(family, side)
            ladder = " -> ".join(f"{s.side}:{s.steps}" for s in stages)
            tiled = sorted({f"{k} {s}" for st in stages for k,
                            sides in (("decode", st.decodes), ("encode", st.encodes))
                            for s in sides if vae_flops(family, k, s)[1]})
            rows.append([spec.label, f"{side}²", ladder, fmt(direct / 1e15, 2),
                         fmt(denoiser / 1e15, 2), fmt(vae / 1e15, 2),
                         fmt((denoiser + vae) / 1e15, 2), fmt((denoiser + vae) / direct), ", ".join(tiled) or "none"])
    return Table(
        title="FLOPs of the automatic preset at real size (denoiser + VAE), against direct generation",
        what=("Stages, steps and VAE passes from hires' own planner "
              "for `hires.apply(pipe)` (hires.presets.AUTOMATIC); "
              "each denoiser step and VAE pass counted by torch FlopCounterMode on the real-size SDXL base UNet / "
              "FLUX.1-dev transformer and their VAEs built on the meta device (public config values), window "
              "attention installed where the preset enables it; SDXL denoiser batch 2 (CFG), Flux batch 1 "
              "(distilled guidance); direct = the same steps at the requested size plus one decode. VAE passes tiled "
              "where hires' planner would tile on a 24 GB device (float32 for SDXL's force_upcast VAE), the tiled "
              "VAE's recompute counted from a 2048 px count scaled by area. Counted once (deterministic). PFLOPs."),
        header=["model", "size", "stages (side:steps)", "direct", "preset denoiser", "preset VAE", "preset total",
                "preset / direct", "tiled passes"],
        rows=rows,
    )


def run(options) -> list[Table]:
    return [preset_table()]
