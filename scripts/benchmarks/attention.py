"""Attention at high resolution: overhead of entropy scaling, FLOPs of windowed vs global attention.

1. Entropy-scaling overhead: wall time of a pipeline call with entropy scaling on vs the same
   pipeline without hires, at the same size (1024 image tokens at the top level), interleaved, on
   CPU with one torch thread. Mid-size models built in code (random weights): an SD-style UNet (channels 128/256,
   1024 tokens at the top level) and a Flux-style transformer (2 double + 4 single blocks, width
   256, 1024 image tokens); the factor is applied in every image self-attention layer.
2. FLOPs of windowed vs global attention: the real-size SDXL UNet, Flux.1-dev and Qwen-Image transformers built
   on the meta device from their public configs, one denoiser forward (batch 1, no CFG) at 2048²,
   4096², 8192², counted by torch.utils.flop_counter.FlopCounterMode. On the meta device SDPA runs
   its math decomposition, so attention FLOPs are the `bmm` FLOPs (QK^T and PV); windows are the
   default (each layer's grid at the 1024² base size).
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import types

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import real_size_flux2
from benchmarks.common import FLUX_DEV, FULL_SIZE_UNETS, QWEN_IMAGE, Table, fmt, interleaved_times, ratio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLOP_SIZES = (2048, 4096, 8192)


def _fake_attachment(model, family: str, patch: int, size: int):
    """What the attention wrappers read from an attachment: a call state at `size` (base 1024²)."""
    from hires.families import FAMILIES, ModelInfo
    from hires.runtime import CallState

    record = next(f for f in FAMILIES if f.name == family)
    info = ModelInfo(family=record, base_height=1024, base_width=1024, latent_factor=8, patch_size=patch,
                     prediction_type="epsilon")
    state = CallState(info=info, height=size, width=size, timesteps=torch.zeros(1, dtype=torch.float64),
                      call_locals={"generator": torch.Generator().manual_seed(0)})
    state.step_index = 0
    return types.SimpleNamespace(denoiser=model, state=state,
                                 set_attn_processors=lambda m, processors: m.set_attn_processor(dict(processors)))


def _sdxl_inputs(size):
    latent = size // 8
    return dict(sample=torch.empty(1, 4, latent, latent, device="meta"), timestep=torch.ones(1, device="meta"),
                encoder_hidden_states=torch.empty(1, 77, 2048, device="meta"),
                added_cond_kwargs={"text_embeds": torch.empty(1, 1280, device="meta"),
                                   "time_ids": torch.empty(1, 6, device="meta")})


def _flux_inputs(size):
    side = size // 16
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    return dict(hidden_states=torch.empty(1, side * side, 64, device="meta"),
                encoder_hidden_states=torch.empty(1, 512, 4096, device="meta"),
                pooled_projections=torch.empty(1, 768, device="meta"), timestep=torch.ones(1, device="meta"),
                img_ids=img_ids.to("meta"), txt_ids=torch.zeros(512, 3, device="meta"),
                guidance=torch.ones(1, device="meta"))


def _qwenimage_inputs(size):
    side = size // 16
    return dict(hidden_states=torch.empty(1, side * side, 64, device="meta"),
                encoder_hidden_states=torch.empty(1, 512, 3584, device="meta"),
                timestep=torch.ones(1, device="meta"), img_shapes=[[(1, side, side)]])


def _count(model, inputs) -> tuple[int, int]:
    with FlopCounterMode(display=False) as counter:
        model(**inputs)
    counts = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in counts.items() if str(op).startswith("aten.bmm"))
    return counter.get_total_flops(), attention


def flop_table() -> Table:
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, UNet2DConditionModel

    from hires.config import WindowAttentionConfig
    from hires.techniques.window_attention.windows import LOG_WINDOWS
    from hires.techniques.window_attention.windows import install as install_window_attention

    rows = []
    specs = (("SDXL UNet", "sdxl", 1, lambda: UNet2DConditionModel(**FULL_SIZE_UNETS["sdxl"]), _sdxl_inputs),
             ("Flux.1-dev transformer", "flux", 2, lambda: FluxTransformer2DModel(**FLUX_DEV), _flux_inputs),
             ("Flux.2-dev transformer", "flux2", 2, lambda: real_size_flux2.models()[0], real_size_flux2.inputs),
             ("Qwen-Image transformer", "qwenimage", 2, lambda: QwenImageTransformer2DModel(**QWEN_IMAGE),
              _qwenimage_inputs))
    for label, family, patch, make, inputs in specs:
        with torch.device("meta"):
            model = make().eval()
        windowed = copy.deepcopy(model)
        for size in FLOP_SIZES:
            with torch.no_grad():
                total, attention = _count(model, inputs(size))
                attachment = _fake_attachment(windowed, family, patch, size)
                if size == FLOP_SIZES[0]:
                    install_window_attention(attachment, WindowAttentionConfig(enabled=True))
                for processor in windowed.attn_processors.values():
                    processor.attachment = attachment
                w_total, w_attention = _count(windowed, inputs(size))
            windows = max(w["windows"] for w in attachment.state.log[LOG_WINDOWS].values())
            rows.append([label, f"{size}²", f"{total / 1e12:.1f}", f"{attention / 1e12:.1f}",
                         f"{100 * attention / total:.0f}%", f"{w_total / 1e12:.1f}", f"{w_attention / 1e12:.1f}",
                         fmt(total / w_total, 2), str(windows)])
    return Table(
        title="FLOPs of windowed vs global attention (real-size architectures, meta device)",
        what=("One denoiser forward, batch 1 (CFG doubles everything), TFLOPs counted by FlopCounterMode; attention = "
              "the bmm FLOPs of SDPA's math decomposition (QK^T and PV). Windowed: WindowAttentionConfig() defaults, "
              "windows = each layer's token grid at the 1024² base size (Flux, Qwen-Image: text tokens stay global)."),
        header=["model", "size", "total TFLOPs", "attention TFLOPs", "attention share", "windowed total",
                "windowed attention", "total speed-up", "windows (top level)"],
        rows=rows,
    )


def _mid_pipelines():
    """Mid-size SD-style and Flux-style pipelines (random weights), built from the tiny ones."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import tiny_models
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    torch.manual_seed(0)
    sd = tiny_models.build("sd15")
    sd.unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()
    flux = tiny_models.build("flux")
    flux.transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(16, 24, 24)).eval()
    return {"sd15": sd, "flux": flux}


def overhead_table(runs: int) -> Table:
    runs = max(runs, 11)  # the effect is ~1%: fewer rounds leave the ratio inside the noise of a shared CPU
    import hires
    from hires.config import EntropyScalingConfig, WindowAttentionConfig

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_models import CALL_KWARGS

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for family, pipe in _mid_pipelines().items():
            size = 256 if family == "sd15" else 512  # 1024 image tokens at the top level for both
            scaled = copy.deepcopy(pipe)
            hires.apply(scaled, hires.HiresConfig(entropy_scaling=EntropyScalingConfig(enabled=True)))
            windowed = copy.deepcopy(pipe)
            hires.apply(windowed, hires.HiresConfig(window_attention=WindowAttentionConfig(enabled=True)))

            def call(p):
                return lambda: p("a red circle", height=size, width=size, num_inference_steps=1, output_type="latent",
                                 generator=torch.Generator().manual_seed(0), **CALL_KWARGS[family])

            with torch.no_grad():
                times = interleaved_times({"plain": call(pipe), "entropy": call(scaled),
                                           "windows": call(windowed)}, runs)
            factors = hires.last_call(scaled).notes["log.entropy_factors"]
            tokens = (size // 8) ** 2 if family == "sd15" else (size // 16) ** 2
            rows.append([family + "-style mid-size", f"{size}² ({tokens} image tokens)",
                         f"{min(factors.values()):.3f}–{max(factors.values()):.3f}",
                         fmt(statistics.median(times["plain"]), 2),
                         fmt(ratio(times, "entropy", "plain")), fmt(ratio(times, "windows", "plain"))])
    finally:
        torch.set_num_threads(threads)
    return Table(
        title="Overhead of entropy scaling (and windows) vs plain attention, equal size",
        what=(f"Median wall time of a 1-step pipeline call (latents "
              f"out), {runs} interleaved rounds after one warm-up, "
              "CPU, 1 torch thread; ratio of medians within the run. Target for entropy scaling: <= 1.02x. "
              "Models: random-weight mid-size SD-style UNet and "
              "Flux-style transformer on the tiny pipelines (64 px base)."),
        header=["model", "size", "entropy factors", "plain median s", "entropy / plain", "windows / plain"],
        rows=rows,
    )


def run(options) -> list[Table]:
    return [overhead_table(options.runs), flop_table()]
