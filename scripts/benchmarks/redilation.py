"""Re-dilation bench: UNet time per step with re-dilation on vs plain, noise-damped guidance's extra
pass, dispersion's effect, and what each costs in FLOPs on the full-size architectures.

Timing runs the pipeline's own denoising loop (a real UNet2DConditionModel at a medium width, random
weights, CPU) with hires attached, so it includes the hooks' Python overhead; the per-step UNet time
is the loop time over the number of UNet calls. FLOPs come from the full-size SD1.5 / SDXL UNets
(public configs below) built on the meta device.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from .common import FULL_SIZE_UNETS, Table, fmt, full_size_unet, interleaved_times, ratio

def _timing_pipeline(width: int):
    """An SD1.5-layout pipeline (4 levels, real classes) narrow enough to time on a CPU."""
    import tiny_models
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    config = dict(FULL_SIZE_UNETS["sd15"])
    config.update(block_out_channels=tuple(width * m for m in (1, 2, 4, 4)), cross_attention_dim=32,
                  attention_head_dim=2, norm_num_groups=min(32, width), sample_size=8)
    pipe = StableDiffusionPipeline(
        vae=tiny_models.make_vae(), text_encoder=tiny_models.make_clip(32), tokenizer=tiny_models.make_tokenizer(),
        unet=UNet2DConditionModel(**config).eval(),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_batches(pipe):
    """Batch size of every UNet forward, counted at its first layer: the weak NDCFG pass calls the
    UNet's forward below `__call__`, where a pre-hook on the UNet itself would not see it."""
    batches = []
    handle = pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    return batches, handle


def _denoise(pipe, size: int, steps: int, guidance: float = 5.0):
    return pipe("a red circle", height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images


def _timing_tables(options) -> list[Table]:
    import hires

    width, steps = 32, 4
    size = 8 * 8 * 4  # the timing model's base latent is 8: 4x the side, 16x the area (a "2048^2" request)
    plain_pipe, dilated_pipe, ndcfg_pipe = (_timing_pipeline(width) for _ in range(3))
    # Every step dilated, so the ratio is the per-step cost of dilation itself.
    dilated = hires.RedilationConfig(enabled=True, stop_fraction=1.0,
                                     noise_damped_guidance=False, dispersion_modules=())
    hires.apply(dilated_pipe, hires.HiresConfig(redilation=dilated))
    hires.apply(ndcfg_pipe, hires.HiresConfig(redilation=hires.RedilationConfig(
        enabled=True, stop_fraction=1.0, noise_damped_guidance=True, ndcfg_stop_fraction=1.0, dispersion_modules=())))
    dispersed_pipe = _timing_pipeline(width)
    hires.apply(dispersed_pipe, hires.HiresConfig(redilation=hires.RedilationConfig(
        enabled=True, stop_fraction=1.0, noise_damped_guidance=False, dispersion_stop_fraction=1.0)))
    functions = {
        "plain": lambda: _denoise(plain_pipe, size, steps),
        "redilated": lambda: _denoise(dilated_pipe, size, steps),
        "redilated+dispersion": lambda: _denoise(dispersed_pipe, size, steps),
        "redilated+NDCFG": lambda: _denoise(ndcfg_pipe, size, steps),
    }
    times = interleaved_times(functions, runs=options.runs)
    plan = hires.last_call(dilated_pipe).notes["log.redilation.plan"]
    rows = []
    for name in functions:
        rows.append([name, fmt(statistics.median(times[name]) / steps * 1000, 1), fmt(ratio(times, name, "plain"))])
    timing = Table(
        title="UNet time per step: re-dilation on vs plain (same size, one interleaved run)",
        what=(f"SD1.5-layout UNet (4 levels, channels {width}x(1,2,4,4), real diffusers classes, random weights), "
              f"CPU, torch threads {torch.get_num_threads()}; {size}x{size} px = 16x the base area, latent "
              f"{size // 8}^2, batch 2 (CFG), DDIM {steps} steps, every step active; sd15 2048^2 preset map "
              f"({len(plan['dilations'])} convs dilated, progressive 4->2); median of {options.runs} interleaved "
              "rounds of the whole denoising loop, per step. Target for re-dilation alone: <= 1.10x."),
        header=["configuration", "ms / step", "ratio to plain"],
        rows=rows,
    )

    # NDCFG's extra pass as UNet calls and batch rows (the weak pass runs the uncond half only).
    batches, handle = _unet_batches(ndcfg_pipe)
    _denoise(ndcfg_pipe, size, steps)
    handle.remove()
    ndcfg_steps = len(hires.last_call(ndcfg_pipe).notes.get("log.redilation.ndcfg_steps", []))
    extra = Table(
        title="Noise-damped guidance: extra passes",
        what=(f"Same model and call as above, NDCFG active in {ndcfg_steps} of {steps} steps. The weak-dilation pass "
              "runs only the unconditional half of the CFG batch (the official code runs the doubled batch and keeps "
              "half). Official 50-step schedules have NDCFG in 35-37 steps."),
        header=["quantity", "value"],
        rows=[
            ["UNet forwards per step (plain: 1 on a batch of 2)", fmt(len(batches) / steps, 2)],
            ["batch rows per step, ratio to plain (counted)", fmt(sum(batches) / (steps * 2), 2)],
            ["wall time ratio to plain (from the run above)", fmt(ratio(times, "redilated+NDCFG", "plain"))],
            ["wall time ratio to re-dilation alone", fmt(ratio(times, "redilated+NDCFG", "redilated"))],
            ["official schedule (NDCFG in 35 of 50 steps, doubled batch): batch rows ratio", fmt((50 + 35) / 50, 2)],
            ["hires (NDCFG in 35 of 50 steps, uncond half): batch rows ratio", fmt((100 + 35) / 100, 2)],
        ],
    )
    return [timing, extra]


def _dispersion_effect_table() -> Table:
    import hires
    import tiny_models

    family, size, steps = "sd15", 256, 6
    outputs = {}
    for name, config in {
        "plain": None,
        "re-dilation (preset, no dispersion, no NDCFG)": hires.RedilationConfig(
            enabled=True, noise_damped_guidance=False, dispersion_modules=()),
        "re-dilation + dispersion (preset)": hires.RedilationConfig(enabled=True, noise_damped_guidance=False),
    }.items():
        pipe = tiny_models.build(family)
        if config is not None:
            hires.apply(pipe, hires.HiresConfig(redilation=config))
        outputs[name] = tiny_models.generate(pipe, family, size, steps=steps)
    base = outputs["plain"]
    rows = []
    for name, image in outputs.items():
        diff = (image - base).abs()
        rows.append([name, fmt(diff.mean().item(), 4), fmt(diff.max().item(), 4)])
    dilated = outputs["re-dilation (preset, no dispersion, no NDCFG)"]
    dispersed = outputs["re-dilation + dispersion (preset)"]
    rows.append(["dispersion vs re-dilation alone", fmt((dispersed - dilated).abs().mean().item(), 4),
                 fmt((dispersed - dilated).abs().max().item(), 4)])
    return Table(
        title="Dispersion's effect on the output (tiny sd15, 16x area)",
        what=(f"Tiny sd15 test model (random weights), {size}x{size} px (16x base area), {steps} DDIM steps, seed 0; "
              "mean / max absolute difference of the decoded image in [0, 1] against plain diffusers. Random weights "
              "say nothing about quality: the coherence testbed's rows do."),
        header=["configuration", "mean |diff| vs plain", "max |diff| vs plain"],
        rows=rows,
    )


def _conv_flops(unet, latent: tuple[int, int], dilations: dict[str, float],
                dispersed: set[str]) -> tuple[float, float]:
    """(plain, re-dilated) FLOPs of the dilatable convs for one batch-2 pass, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from hires.techniques.redilation.dilation import DISPERSED_KERNEL, dilatable_convs

    shapes = {}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: shapes.__setitem__(n, args[0].shape))
               for n, m in dilatable_convs(unet).items()]
    with torch.device("meta"):
        batch = 2
        sample = torch.empty(batch, 4, *latent)
        kwargs = dict(encoder_hidden_states=torch.empty(batch, 77, unet.config.cross_attention_dim))
        if unet.config.addition_embed_type == "text_time":
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, 1280), "time_ids": torch.empty(batch, 6)}
        with FlopCounterMode(display=False) as counter:
            unet(sample, torch.tensor(500), **kwargs)
    for h in handles:
        h.remove()
    total = counter.get_total_flops()
    extra = 0.0
    for name, conv in dilatable_convs(unet).items():
        factor = dilations.get(name, 1.0)
        shape = shapes[name]
        out_pixels = (shape[-2] // conv.stride[0]) * (shape[-1] // conv.stride[0])
        plain = 2 * shape[0] * conv.in_channels * conv.out_channels * 9 * out_pixels
        if name in dispersed:
            kernel = DISPERSED_KERNEL ** 2
            factor = max(factor / 2, 1.0)
        else:
            kernel = 9
        # fractional factors run on an input resized by ceil(d) / d
        resize = (math.ceil(factor) / factor) ** 2 if factor > 1 else 1.0
        extra += plain * (kernel / 9) * resize - plain
    return total, total + extra


def _flops_table() -> Table:
    from hires.techniques.redilation.presets import family_presets
    from hires.techniques.redilation.dilation import dilatable_convs, resolve_preset_names

    rows = []
    for family, base in (("sd15", 64), ("sdxl", 128)):
        unet = full_size_unet(family)
        names = list(dilatable_convs(unet))
        for preset in family_presets(family).presets:
            side = math.sqrt(preset.area_ratio / preset.aspect)
            latent = (round(base * side), round(base * side * preset.aspect))
            dilations, _ = resolve_preset_names(preset.dilations, family, names, len(unet.down_blocks))
            dispersed, _ = resolve_preset_names([(n, True) for n in preset.dispersion_modules], family, names,
                                                len(unet.down_blocks))
            # the first step: the largest factors (progressive starts at d)
            total, with_dilation = _conv_flops(unet, latent, dilations, set(dispersed))
            rows.append([family, preset.official_size, f"{latent[0]}x{latent[1]}", f"{total / 1e12:.2f}",
                         fmt(with_dilation / total), len(dilations), len(dispersed)])
    return Table(
        title="FLOPs of one UNet pass at the first step (full-size architectures, meta device)",
        what=("torch.utils.flop_counter on the public SD1.5 / SDXL UNet configs, batch 2, 77 text tokens. A dilated "
              "integer-factor conv costs the same FLOPs as the plain one; fractional factors run on an input "
              "enlarged by (ceil(d)/d)^2 and dispersed 5x5 kernels cost 25/9. Re-dilation's wall-time cost on GPUs "
              "comes from slower dilated-conv kernels, not FLOPs."),
        header=["family", "official size", "latent", "plain TFLOPs", "ratio with preset", "convs dilated",
                "convs dispersed"],
        rows=rows,
    )


def run(options) -> list[Table]:
    start = time.perf_counter()
    tables = _timing_tables(options)
    tables.append(_dispersion_effect_table())
    tables.append(_flops_table())
    tables[0].what += f" (section part 1 took {time.perf_counter() - start:.0f} s)"
    return tables
