"""APG: overhead against plain CFG at equal size, and its effect on oversaturation.

Bench section (scripts/bench.py --only apg):
- overhead: interleaved wall time of whole denoising loops (latent output, no VAE) with CFG, APG on
  the x0 prediction and APG on the raw output, tiny random sd15 at 128 and 256 px on this machine's
  CPU. The tiny UNet is ~1000x cheaper per latent pixel than real SD1.5, so the ratio is an upper
  bound for real models; the second table puts APG's cost next to the real SD1.5 UNet's FLOPs.
- effect: mean saturation and share of clipped pixels, CFG vs APG at guidance 15 (see
  `compare_saturation`). On the tiny random sd15 the images are noise, so the numbers only show
  that the measurement runs; the acceptance number needs the trained testbed UNet:

    python scripts/benchmarks/apg.py --model hires/assets/testbed_sd15 --guidance 15

which also reports the share of images with exactly one object (testbed_common) per method.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, ROOT / "scripts", ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import hires  # noqa: E402
from benchmarks.common import Table, fmt, interleaved_times, ratio  # noqa: E402

PROMPT = "a red circle on a white background"


# -- effect: saturation and clipping -----------------------------------------------------------
def decode_unclamped(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """VAE decode of pipeline latents in [-1, 1] units, before the pipeline's clamp."""
    vae = pipe.vae
    if latents.ndim == 3:  # Flux returns packed latents
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    with torch.no_grad():
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0].float()


def saturation_stats(decoded: torch.Tensor) -> dict[str, float]:
    """Mean HSV saturation of the displayed image, and the share of pixels with a channel clipped.

    `decoded` is (B, 3, H, W) in [-1, 1] units before clamping; a pixel counts as clipped when any
    channel lies outside [-1, 1] (the pipeline's postprocess clamps it to 0 or 255).
    """
    clipped = (decoded.abs() > 1.0).any(dim=1).float().mean()
    rgb = (decoded / 2 + 0.5).clamp(0, 1)
    high, low = rgb.max(dim=1).values, rgb.min(dim=1).values
    saturation = torch.where(high > 0, (high - low) / high.clamp_min(1e-6), torch.zeros_like(high))
    return {"mean_saturation": float(saturation.mean()), "clipped_share": float(clipped)}


def _call_kwargs(pipe, guidance: float) -> dict:
    info = hires.model_info(pipe)
    if info.family.cfg_separate:  # Flux: true CFG needs a negative prompt
        return {info.family.guidance_scale_name: guidance, "negative_prompt": ""}
    return {info.family.guidance_scale_name: guidance}


def compare_saturation(pipe, prompts: list[str], seeds: list[int], *, guidance: float = 15.0,
                       apg: hires.APGConfig | None = None, size: int | None = None, steps: int = 20,
                       colours: list[str] | None = None, extra: dict | None = None) -> dict[str, dict[str, float]]:
    """Saturation statistics of CFG vs APG on the same prompts and seeds (and one-object share when
    `colours`, one per prompt, name the prompted testbed colour).

    Leaves `pipe` as it found it (APG is applied and removed here).
    """
    apg = apg or hires.APGConfig(enabled=True)
    info = hires.model_info(pipe)
    height = width = size or info.base_height
    methods = {"CFG": None, "APG": hires.HiresConfig(apg=apg)}
    results = {}
    for name, config in methods.items():
        if config is not None:
            hires.apply(pipe, config)
        try:
            stats, ones = [], []
            for j, prompt in enumerate(prompts):
                for seed in seeds:
                    latents = pipe(prompt, height=height, width=width, num_inference_steps=steps,
                                   generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                                   **_call_kwargs(pipe, guidance), **(extra or {})).images
                    decoded = decode_unclamped(pipe, latents, height, width)
                    stats.append(saturation_stats(decoded))
                    if colours is not None:
                        import testbed_common as tc

                        image = ((decoded[0] / 2 + 0.5).clamp(0, 1).permute(1, 2,
                                                                            0).numpy() * 255).round().astype(np.uint8)
                        ones.append(tc.count_objects(image, colours[j]).n_objects == 1)
        finally:
            if config is not None:
                hires.remove(pipe)
        row = {key: float(np.mean([s[key] for s in stats])) for key in stats[0]}
        if colours is not None:
            row["share_exactly_one"] = float(np.mean(ones))
        row["images"] = len(stats)
        results[name] = row
    return results


# -- overhead ----------------------------------------------------------------------------------
def _loop(pipe, size: int, steps: int):
    def run():
        with torch.no_grad():
            pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="latent")
    return run


def _with(pipe, config, fn):
    def run():
        hires.apply(pipe, config) if config is not None else hires.remove(pipe)
        fn()
    return run


def overhead_table(runs: int, sizes=(128, 256), steps: int = 4) -> Table:
    from tiny_models import build

    pipe = build("sd15")
    configs = {
        "CFG": None,
        "APG x0": hires.HiresConfig(apg=hires.APGConfig(enabled=True)),
        "APG output": hires.HiresConfig(apg=hires.APGConfig(enabled=True, space="output")),
    }
    rows = []
    for size in sizes:
        loop = _loop(pipe, size, steps)
        # apply/remove is outside the timed loop's cost in practice; here it is a few microseconds.
        functions = {name: _with(pipe, config, loop) for name, config in configs.items()}
        for clock, measure in (("wall", interleaved_times),
                               ("CPU", functools.partial(interleaved_times, clock=time.process_time))):
            times = measure(functions, runs)
            hires.remove(pipe)
            rows.append([f"{size}x{size} (latent {size // 8}^2)", clock, fmt(float(np.median(times["CFG"])), 3),
                         fmt(ratio(times, "APG x0", "CFG")), fmt(ratio(times, "APG output", "CFG"))])
    return Table(
        title="APG overhead vs CFG at equal size (whole denoising loop)",
        what=(f"tiny random sd15 (tests/tiny_models.py), {steps} DDIM steps, latent output, guidance 7.5, batch 1; "
              f"CPU, torch threads {torch.get_num_threads()}; {runs} interleaved rounds, ratio of medians, "
              "timed by wall clock and by this process's CPU time (the second is robust to other jobs' load). "
              "APG's added work grows with the latent only, the model's with its width: the tiny UNet makes "
              "this ratio an upper bound for real models."),
        header=["size", "clock", "CFG s/loop (median)", "APG x0 / CFG", "APG output / CFG"],
        rows=rows,
    )


def _sd15_unet_flops(latent: int) -> float:
    """Real SD1.5 UNet FLOPs for one CFG call (batch 2) at this latent side, on the meta device."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel(  # public SD1.5 config
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        sample, text = torch.empty(2, 4, latent, latent), torch.empty(2, 77, 768)
        with FlopCounterMode(display=False) as counter:
            unet(sample, torch.tensor([500, 500]), encoder_hidden_states=text)
    return float(counter.get_total_flops())


def cost_table(runs: int, latents=(64, 128, 256)) -> Table:
    """APG's own time per step (measured) and its work next to the real SD1.5 UNet's FLOPs."""
    from hires.techniques.apg.combiner import adaptive_projected_guidance

    rows = []
    for latent in latents:
        g = torch.Generator().manual_seed(0)
        cond, uncond = torch.randn(1, 4, latent, latent, generator=g), torch.randn(1, 4, latent, latent, generator=g)
        state = {"running": None}

        def step():
            guided, state["running"] = adaptive_projected_guidance(
                cond, uncond, 7.5, eta=0.0, norm_threshold=5.0, momentum=-0.5, running_delta=state["running"])

        times = interleaved_times({"apg": step}, runs)
        seconds = float(np.median(times["apg"]))
        # ~40 elementwise float64 operations per latent element (conversions, momentum, norms, projection, x0 maps)
        apg_flops = 40.0 * cond.numel()
        unet_flops = _sd15_unet_flops(latent)
        rows.append([f"{latent * 8}x{latent * 8}", f"{seconds * 1e3:.2f}", f"{unet_flops / 1e12:.2f}",
                     f"{apg_flops / unet_flops:.1e}"])
    return Table(
        title="APG's own cost per step next to the SD1.5 UNet",
        what=(f"adaptive_projected_guidance on (1, 4, h, w) float32 inputs, float64 math, CPU, {runs} rounds "
              "(median); UNet FLOPs of one batch-2 CFG call of the public SD1.5 architecture counted by "
              "FlopCounterMode on the meta device; APG work estimated at 40 elementwise FLOPs per latent element."),
        header=["image size", "APG ms/step (CPU)", "SD1.5 UNet TFLOPs/step", "APG / UNet FLOPs"],
        rows=rows,
    )


def effect_table(steps: int = 8, seeds=(0, 1, 2, 3)) -> Table:
    from tiny_models import build

    pipe = build("sd15")
    res = compare_saturation(pipe, [PROMPT], list(seeds), guidance=15.0, size=64, steps=steps)
    rows = [[name, fmt(r["mean_saturation"]), fmt(r["clipped_share"]), r["images"]] for name, r in res.items()]
    return Table(
        title="Saturation at guidance 15, CFG vs APG (tiny random sd15: plumbing check, not the effect)",
        what=(f"tiny random-weight sd15 at 64 px, {steps} DDIM steps, guidance 15, APG family preset in x0 space, "
              f"{len(seeds)} seeds. Random weights make noise images: this row shows the measurement runs, "
              "not that APG helps. The acceptance number needs the trained testbed UNet (run this module "
              "with --model hires/assets/testbed_sd15)."),
        header=["method", "mean saturation", "share of clipped pixels", "images"],
        rows=rows,
    )


def run(options) -> list[Table]:
    runs = max(3, options.runs)
    return [overhead_table(runs), cost_table(runs), effect_table()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CFG vs APG saturation on a saved pipeline (e.g. the testbed UNet)")
    parser.add_argument("--model", required=True, help="a diffusers pipeline directory (sd15-like or Flux)")
    parser.add_argument("--guidance", type=float, default=15.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=16, help="images per prompt")
    parser.add_argument("--size", type=int, default=None, help="pixels (default: the model's base size)")
    parser.add_argument("--space", choices=("x0", "output"), default="x0")
    options = parser.parse_args(argv)

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(options.model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    extra = {"max_sequence_length": 8} if hires.model_info(pipe).family.cfg_separate else {}
    try:
        import testbed_common as tc

        prompts_colours = [(p, c) for p, c, _ in tc.all_prompts()]
    except ImportError:
        prompts_colours = [(PROMPT, None)]
    prompts = [p for p, _ in prompts_colours]
    colours = [c for _, c in prompts_colours] if all(c for _, c in prompts_colours) else None
    start = time.time()
    res = compare_saturation(pipe, prompts, list(range(options.seeds)), guidance=options.guidance,
                             apg=hires.APGConfig(enabled=True, space=options.space), size=options.size,
                             steps=options.steps, colours=colours, extra=extra)
    print(f"{options.model}: guidance {options.guidance}, {options.steps} steps, {len(prompts)} prompts x "
          f"{options.seeds} seeds ({time.time() - start:.0f} s)")
    for name, row in res.items():
        cells = (f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        print(f"  {name:4s} " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
