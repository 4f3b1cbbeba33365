"""The memory planner's plans for GPU budgets on real-size SDXL base, FLUX.1-dev, FLUX.2-dev and Qwen-Image (meta
device): one decode per request (`planner_table`), and the automatic preset's whole call (`preset_table`).

Estimates, not measurements: scripts/benchmarks/memory.py checks the planner against measured peaks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .common import FLUX_DEV, QWEN_IMAGE, QWEN_IMAGE_VAE, Table, fmt, full_size_unet

HERE = Path(__file__).resolve().parent
CASES = (("sdxl", 4096, True), ("sdxl", 8192, True), ("flux", 4096, False), ("flux", 8192, False),
         ("flux2", 4096, False), ("qwenimage", 4096, True))
# Families whose CFG runs as two denoiser calls per step (true CFG), never one batch of two.
SEPARATE_CFG = ("qwenimage",)
BUDGETS = (80 * 2**30, 24 * 2**30)


def real_size_models(family: str):
    """Denoiser and VAE of SDXL base or FLUX.1-dev from public config values, on the meta device."""
    sys.path.insert(0, str(HERE))
    from _vae_rss_worker import REAL_VAE
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage, FluxTransformer2DModel, QwenImageTransformer2DModel

    if family == "flux2":
        from .real_size_flux2 import models

        return models()
    with torch.device("meta"):
        if family == "sdxl":
            return full_size_unet("sdxl"), AutoencoderKL(**REAL_VAE)
        if family == "qwenimage":
            return QwenImageTransformer2DModel(**QWEN_IMAGE), AutoencoderKLQwenImage(**QWEN_IMAGE_VAE)
        flux_vae = dict(REAL_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.3611, shift_factor=0.1159)
        return FluxTransformer2DModel(**FLUX_DEV), AutoencoderKL(**flux_vae)


def _choice(p, cfg: bool) -> str:
    vae = f"VAE {'tiled ' + str(p.tile_size) + ' ' + p.tile_grouping if p.tile_vae else 'untiled'}"
    cfg_layout = f"; {'sequential' if p.sequential_cfg else 'batched'} CFG" if cfg else ""
    return f"{vae}; FF chunks {p.feed_forward_chunks}{cfg_layout}"


def planner_table() -> Table:
    from hires.techniques.memory import estimate as memory_planner

    rows = []
    for family, side, cfg in CASES:
        denoiser, vae = real_size_models(family)
        for budget in BUDGETS:
            try:
                p = memory_planner.plan(denoiser, vae, height=side, width=side, dtype=torch.bfloat16, cfg=cfg,
                                        cfg_batched=family not in SEPARATE_CFG, budget=budget, name=family,
                                        device_type="cuda")
                rows.append([family, f"{side}x{side}", f"{budget / 2**30:.0f}", fmt(p.weights / 2**30, 1),
                             fmt(p.denoiser_peak / 2**30, 1), fmt(p.vae_peak / 2**30, 1),
                             fmt(p.vae_untiled_peak / 2**30, 1),
                             fmt(p.peak / 2**30, 1), _choice(p, cfg)])
            except memory_planner.MemoryBudgetError as error:
                rows.append([family, f"{side}x{side}", f"{budget / 2**30:.0f}",
                             "-", "-", "-", "-", "-", f"refused: {error}"])
    return Table(
        title="Memory planner on real-size architectures (bf16, batch 1, a CUDA device; estimates, not measurements)",
        what=("hires.techniques.memory.estimate.plan(..., device_type='cuda') "
              "on SDXL base (CFG), FLUX.1-dev (no true CFG), "
              "FLUX.2-dev (no CFG) and Qwen-Image (true CFG: two "
              "calls a step; its causal 3D VAE is never tiled) built "
              "on the meta device from public config values; weights "
              "= denoiser + VAE only (text encoders offloaded or "
              "counted by the caller). Attention counted as a memory-efficient kernel; CUDA convolution workspaces "
              "are not modelled. GiB."),
        header=["family", "size", "budget", "weights", "denoiser activations", "VAE (as planned)", "VAE untiled",
                "peak", "choice"],
        rows=rows,
    )


# The automatic preset's call: structure guidance (latent guide, pixel upscale, doubling ladder),
# the memory planner on and VAE tiling "auto".
PRESET_CASES = (("sdxl", 8192, torch.float16, 24 * 10**9), ("sdxl", 4096, torch.float16, 24 * 10**9),
                ("flux", 4096, torch.bfloat16, 80 * 10**9), ("flux", 4096, torch.bfloat16, 24 * 10**9))


def text_encoder_bytes(family: str, dtype: torch.dtype) -> int:
    """Weights of the family's text encoders (public config values, meta device), kept on the device."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from hires.techniques.memory import estimate as memory_planner

    clip_l = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, vocab_size=49408, max_position_embeddings=77)
    with torch.device("meta"):
        encoders = [CLIPTextModel(CLIPTextConfig(**clip_l))]
        if family == "sdxl":  # OpenCLIP bigG
            encoders.append(CLIPTextModel(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32,
                                                         num_attention_heads=20, projection_dim=1280, vocab_size=49408,
                                                         max_position_embeddings=77)))
        else:  # T5-v1.1-XXL encoder
            encoders.append(T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                                                    vocab_size=32128, feed_forward_proj="gated-gelu")))
    return sum(memory_planner.module_bytes(e, dtype) for e in encoders)


def preset_call_plan(family: str, side: int, dtype: torch.dtype, budget: int):
    """The whole-call plan of the automatic preset at side x side on a CUDA device (or the refusal)."""
    from hires.config import HiresConfig, StructureGuidanceConfig
    from hires.families import FAMILIES, ModelInfo
    from hires.runtime import StageRequest, stage_plan
    from hires.techniques.memory import estimate as memory_planner
    from hires.techniques.memory import install as planning

    record = next(f for f in FAMILIES if f.name == family)
    info = ModelInfo(record, 1024, 1024, 8, 1 if family == "sdxl" else 2, "epsilon" if family == "sdxl" else "flow")
    guidance = StructureGuidanceConfig(enabled=True, space="latent", upscale_space="pixel", ladder="doubling")
    denoiser, vae = real_size_models(family)
    stages = stage_plan(info, HiresConfig(structure_guidance=guidance), StageRequest(side, side, 50))
    denoiser_passes, vae_passes = planning.call_passes(info, stages, 1, vae.config.latent_channels)
    return memory_planner.plan_call(denoiser, vae, denoiser_passes=denoiser_passes, vae_passes=vae_passes, dtype=dtype,
                                    cfg=family == "sdxl", budget=budget,
                                    other_weights=text_encoder_bytes(family, dtype),
                                    name=f"{family} {side}x{side}", device_type="cuda")


def _pass_choices(plan) -> str:
    tiled = [p for p in plan.vae_passes() if p.tiling is not None]
    steps = "; ".join(f"{p.shape[1]}: {p.choice()}" for p in plan.denoiser_passes() if p.shape[0] >= 2048)
    vae = "; ".join(f"{p.what} {p.choice()}" for p in tiled) or "every VAE pass untiled"
    untiled = len(plan.vae_passes()) - len(tiled)
    return f"steps {steps}; {vae}{f'; {untiled} smaller VAE passes untiled' if tiled and untiled else ''}"


def preset_table() -> Table:
    from hires.techniques.memory import estimate as memory_planner

    rows = []
    for family, side, dtype, budget in PRESET_CASES:
        model = "SDXL" if family == "sdxl" else "Flux"
        label = f"{model} {side}² automatic preset, {str(dtype).removeprefix('torch.')}, {budget / 1e9:.0f} GB"
        try:
            plan = preset_call_plan(family, side, dtype, budget)
        except memory_planner.MemoryBudgetError as error:
            message = str(error)
            rows.append([label, "-", fmt(budget / 1e9, 0), "-", "-",
                         f"refused: {message.split(';')[0]}; try {message.split('try ')[-1]}"])
            continue
        peak = plan.peak_pass
        rows.append([label, fmt(plan.peak / 1e9, 2), fmt(budget / 1e9, 0),
                     f"{peak.what} ({peak.kind}, {peak.choice()})", str(len(plan.vae_passes())), _pass_choices(plan)])
    return Table(
        title="Memory planner: the automatic preset's whole call on real-size architectures (estimates, a CUDA "
              "device)",
        what=("hires.techniques.memory.estimate.plan_call over hires.runtime.stage_plan's "
              "stages and their VAE passes (structure guidance with "
              "space='latent', upscale_space='pixel', ladder='doubling': per stage after the base one decode at the "
              "previous size and one encode at the stage's, then the call's decode), batch 1, SDXL with CFG, Flux "
              "without true CFG. Resident: denoiser and text encoders in the dtype, the VAE in float32 during its "
              "passes where float16 meets force_upcast (SDXL). Architectures built on the meta device from public "
              "config values; attention counted as a memory-efficient kernel, CUDA convolution workspaces not "
              "modelled. GB = 10^9 bytes."),
        header=["call", "peak (GB)", "budget (GB)", "peak pass", "VAE passes", "choices"],
        rows=rows,
    )


def run(options) -> list[Table]:
    return [planner_table(), preset_table()]
