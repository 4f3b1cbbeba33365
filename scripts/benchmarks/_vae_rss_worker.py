"""Decode one latent with a real-size VAE architecture (random weights) and print peak memory as JSON.

Run as a subprocess by scripts/benchmarks/memory.py so that each way of decoding gets a fresh
process and its own peak resident set size (ru_maxrss):

    python scripts/benchmarks/_vae_rss_worker.py --way ours --size 2048 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

WAYS = ("untiled", "diffusers", "ours")

# Public values of the SDXL / SD 1.x VAE config (block widths, 2 resnets per block, 32 groups).
REAL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
)


def real_size_vae(seed: int = 0, **overrides):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**{**REAL_VAE, **overrides}).eval()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--way", choices=WAYS, required=True)
    parser.add_argument("--size", type=int, default=2048, help="output side in pixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile", type=int, default=None, help="our tile side in latent pixels")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)

    vae = real_size_vae()
    latent_side = options.size // 8
    latent = torch.randn(1, REAL_VAE["latent_channels"], latent_side, latent_side, generator=torch.Generator().manual_seed(1))
    if options.way == "diffusers":
        vae.enable_tiling()
    decode = vae.decode
    if options.way == "ours":
        from hires.techniques.tiled_vae import tiled_decode

        def decode(z):
            return (tiled_decode(vae, z, tile_size=options.tile),)

    baseline = current_rss_bytes()
    start = time.perf_counter()
    with torch.no_grad():
        image = decode(latent)[0]
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    print(json.dumps({
        "way": options.way, "size": options.size, "threads": options.threads, "seconds": seconds,
        "baseline_rss": baseline, "peak_rss": peak, "peak_above_baseline": peak - baseline,
        "output_shape": list(image.shape), "output_checksum": float(image.double().abs().sum()),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
