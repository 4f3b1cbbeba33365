"""Progressive structure guidance: cost of pixel vs latent guidance, and FLOPs of a progressive
SDXL 4096x4096 run against a direct 50-step 4096x4096 run (real-size architectures on the meta device)."""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import FULL_SIZE_UNETS, Table, fmt, interleaved_times, ratio

STEPS = 50
RENOISE_STEPS = 15  # DiffuseHigh: the last 15 of 50 steps
GUIDED = 5
LADDER = (1024, 2048, 3072, 4096)
TIMING_STEPS = 20


# -- real-size SDXL (public config values of stabilityai/stable-diffusion-xl-base-1.0) -------------
def sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**FULL_SIZE_UNETS["sdxl"])


def sdxl_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
    )


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@functools.lru_cache(maxsize=None)
def _models():
    with torch.device("meta"):
        return sdxl_unet().eval(), sdxl_vae().eval()


def unet_step_flops(side: int) -> int:
    """One denoising step at side x side px: the UNet on [uncond, cond] (batched CFG)."""
    unet, _ = _models()
    z = side // 8
    kwargs = dict(
        encoder_hidden_states=torch.empty(2, 77, 2048, device="meta"),
        added_cond_kwargs={"text_embeds": torch.empty(2, 1280, device="meta"),
                           "time_ids": torch.empty(2, 6, device="meta")},
    )
    return _flops(lambda: unet(torch.empty(2, 4, z, z, device="meta"), torch.tensor(500.0, device="meta"), **kwargs))


def vae_flops(side: int, what: str) -> int:
    _, vae = _models()
    if what == "decode":
        return _flops(lambda: vae.decode(torch.empty(1, 4, side // 8, side // 8, device="meta")))
    return _flops(lambda: vae.encode(torch.empty(1, 3, side, side, device="meta")))


def flops_table() -> Table:
    step = {s: unet_step_flops(s) for s in LADDER}
    decode = {s: vae_flops(s, "decode") for s in LADDER}
    encode = {s: vae_flops(s, "encode") for s in LADDER[1:]}
    direct = STEPS * step[4096] + decode[4096]
    later = LADDER[1:]
    latent = STEPS * step[1024] + sum(RENOISE_STEPS * step[s] for s in later) + decode[4096]
    # pixel: each stage decodes the previous result and encodes the upscaled one, and every guided
    # step decodes and re-encodes the predicted x0 at the stage's size.
    vae_pixel = sum(decode[p] + encode[s] + GUIDED * (decode[s] + encode[s]) for p, s in zip(LADDER, later))
    pixel = latent + vae_pixel
    t = 1e12
    rows = [
        ["direct 4096x4096, 50 steps", fmt(direct / t, 1), "1.000"],
        ["progressive, latent guidance (1024 -> 2048 -> 3072 -> 4096)", fmt(latent / t, 1), fmt(latent / direct)],
        ["progressive, pixel guidance (paper)", fmt(pixel / t, 1), fmt(pixel / direct)],
        ["  of which VAE round trips of pixel guidance", fmt(vae_pixel / t, 1), fmt(vae_pixel / direct)],
    ]
    per_step = ", ".join(f"{s}: {step[s] / t:.2f}" for s in LADDER)
    return Table(
        title="FLOPs: progressive SDXL 4096x4096 vs direct",
        what=("torch FlopCounterMode on the real-size SDXL base UNet and VAE (public config values, built on the "
              f"meta device, no weights); UNet on a batch of 2 (CFG); base stage {STEPS} steps, later stages "
              f"{RENOISE_STEPS} steps each, {GUIDED} guided; decode of the final image counted once. "
              f"UNet TFLOPs per step by side: {per_step}."),
        header=["run", "TFLOPs", "ratio to direct"],
        rows=rows,
    )


def timing_table(runs: int) -> Table:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    import hires
    from tiny_models import CALL_KWARGS, build

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipes = {space: build("sd15") for space in ("latent", "pixel")}
    for space, pipe in pipes.items():
        hires.apply(pipe, hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(
            enabled=True, space=space, renoise=0.3, guided_steps=5)))
    plain = build("sd15")

    def call(pipe, size):
        return lambda: pipe("a red circle", height=size, width=size, num_inference_steps=TIMING_STEPS,
                            generator=torch.Generator().manual_seed(0), output_type="pt", **CALL_KWARGS["sd15"])

    times = interleaved_times({"latent": call(pipes["latent"], 192), "pixel": call(pipes["pixel"], 192),
                               "direct": call(plain, 192)}, runs)
    torch.set_num_threads(threads)
    rows = [[name, fmt(sorted(v)[len(v) // 2], 2), fmt(ratio(times, name, "latent"))] for name, v in times.items()]
    return Table(
        title="Pixel vs latent guidance: wall time on the tiny SD1.5 pipeline",
        what=(f"tests/tiny_models sd15 (UNet 16/32 channels, VAE 8-16 channels, random weights) on CPU, 1 thread; "
              f"64 -> 128 -> 192 px, {TIMING_STEPS} steps at the base, 6 per later stage, 5 guided (direct: "
              f"{TIMING_STEPS} steps at 192 px); "
              f"{runs} interleaved rounds, median. Tiny-model ratios say little about real sizes: "
              "the FLOPs table gives the real-size ratio."),
        header=["run", "median s", "ratio to latent"],
        rows=rows,
    )


def run(options) -> list[Table]:
    return [timing_table(options.runs), flops_table()]
