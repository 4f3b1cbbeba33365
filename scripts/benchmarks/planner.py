"""The memory planner's plans for GPU budgets on real-size SDXL base, FLUX.1-dev and Qwen-Image (meta device).

Estimates, not measurements: scripts/benchmarks/memory.py checks the planner against measured peaks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .common import FLUX_DEV, QWEN_IMAGE, QWEN_IMAGE_VAE, Table, fmt, full_size_unet

HERE = Path(__file__).resolve().parent
CASES = (("sdxl", 4096, True), ("sdxl", 8192, True), ("flux", 4096, False), ("flux", 8192, False),
         ("qwenimage", 4096, True))
# Families whose CFG runs as two denoiser calls per step (true CFG), never one batch of two.
SEPARATE_CFG = ("qwenimage",)
BUDGETS = (80 * 2**30, 24 * 2**30)


def real_size_models(family: str):
    """Denoiser and VAE of SDXL base or FLUX.1-dev from public config values, on the meta device."""
    sys.path.insert(0, str(HERE))
    from _vae_rss_worker import REAL_VAE
    from diffusers import AutoencoderKL, AutoencoderKLQwenImage, FluxTransformer2DModel, QwenImageTransformer2DModel

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
    from hires import memory_planner

    rows = []
    for family, side, cfg in CASES:
        denoiser, vae = real_size_models(family)
        for budget in BUDGETS:
            try:
                p = memory_planner.plan(denoiser, vae, height=side, width=side, dtype=torch.bfloat16, cfg=cfg,
                                        cfg_batched=family not in SEPARATE_CFG, budget=budget, name=family,
                                        device_type="cuda")
                rows.append([family, f"{side}x{side}", f"{budget / 2**30:.0f}", fmt(p.weights / 2**30, 1),
                             fmt(p.denoiser_peak / 2**30, 1), fmt(p.vae_peak / 2**30, 1), fmt(p.vae_untiled_peak / 2**30, 1),
                             fmt(p.peak / 2**30, 1), _choice(p, cfg)])
            except memory_planner.MemoryBudgetError as error:
                rows.append([family, f"{side}x{side}", f"{budget / 2**30:.0f}", "-", "-", "-", "-", "-", f"refused: {error}"])
    return Table(
        title="Memory planner on real-size architectures (bf16, batch 1, a CUDA device; estimates, not measurements)",
        what=("hires.memory_planner.plan(..., device_type='cuda') on SDXL base (CFG), FLUX.1-dev (no true CFG) and "
              "Qwen-Image (true CFG: two calls a step; its causal 3D VAE is never tiled) built "
              "on the meta device from public config values; weights = denoiser + VAE only (text encoders offloaded or "
              "counted by the caller). Attention counted as a memory-efficient kernel; CUDA convolution workspaces "
              "are not modelled. GiB."),
        header=["family", "size", "budget", "weights", "denoiser activations", "VAE (as planned)", "VAE untiled",
                "peak", "choice"],
        rows=rows,
    )


def run(options) -> list[Table]:
    return [planner_table()]
