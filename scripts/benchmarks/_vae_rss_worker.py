"""Decode one latent with a real-size VAE architecture (random weights) and print peak memory as JSON.

Run as a subprocess by scripts/benchmarks/memory.py so that each way of decoding gets a fresh
process and its own peak resident set size (VmHWM, reset before decoding):

    python scripts/benchmarks/_vae_rss_worker.py --way ours --size 2048 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

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


class DryConvolutions(TorchFunctionMode):
    """Convolutions and attention return zero-filled outputs of the right shape (allocated and
    touched like the real ones); everything else (GroupNorm, SiLU, upsampling, copies) runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            x, weight = args[0], args[1]
            stride, padding, dilation = (kwargs.get(k, args[i] if len(args) > i else d) for k, i, d in
                                         (("stride", 3, 1), ("padding", 4, 0), ("dilation", 5, 1)))
            pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
            (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
            kh, kw = weight.shape[-2:]
            h = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            w = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            return torch.zeros(x.shape[0], weight.shape[0], h, w, dtype=x.dtype)
        if func is F.scaled_dot_product_attention:
            query, value = args[0], args[2]
            return torch.zeros(query.shape[:-1] + value.shape[-1:], dtype=query.dtype)
        return func(*args, **kwargs)


def reset_peak_rss() -> None:
    """Restart the peak count here. ru_maxrss cannot be used: Linux carries it over from the parent
    across fork and exec, so a worker started by a large process would report the parent's RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """Peak resident set size since the last `reset_peak_rss` (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--way", choices=WAYS, required=True)
    parser.add_argument("--size", type=int, default=2048, help="output side in pixels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tile", type=int, default=None,
                        help="tile side in latent pixels (ours, and diffusers' when given)")
    parser.add_argument("--grouping", default="unit", help="our segment grouping: unit or level")
    parser.add_argument("--latent", default=None, help="a .pt latent to decode (default: random)")
    parser.add_argument("--save", default=None, help="write the decoded image here (.pt)")
    parser.add_argument("--dry-conv", action="store_true",
                        help="replace convolutions and attention by zero-filled outputs of the same shape: "
                             "the same allocations, none of the FLOPs (memory measurements on a slow CPU)")
    options = parser.parse_args(argv)
    torch.set_num_threads(options.threads)

    vae = real_size_vae()
    latent_side = options.size // 8
    if options.latent:
        latent = torch.load(options.latent)
    else:
        latent = torch.randn(1, REAL_VAE["latent_channels"], latent_side,
                             latent_side, generator=torch.Generator().manual_seed(1))
    if options.way == "diffusers":
        vae.enable_tiling()
        if options.tile:
            vae.tile_latent_min_size = options.tile
            vae.tile_sample_min_size = options.tile * 8

    def decode(z):
        return vae.decode(z).sample

    if options.way == "ours":
        from hires.techniques.memory.tiled_vae import tiled_decode

        def decode(z):
            return tiled_decode(vae, z, tile_size=options.tile, grouping=options.grouping)  # z as vae.decode gets it

    context = DryConvolutions() if options.dry_conv else contextlib.nullcontext()

    reset_peak_rss()
    baseline = current_rss_bytes()
    start = time.perf_counter()
    with torch.no_grad(), context:
        image = decode(latent)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    print(json.dumps({
        "way": options.way, "size": options.size, "threads": options.threads, "seconds": seconds,
        "baseline_rss": baseline, "peak_rss": peak, "peak_above_baseline": peak - baseline,
        "output_shape": list(image.shape), "dry_conv": options.dry_conv, "tile": options.tile,
        "grouping": options.grouping,
    }))
    if options.save:
        torch.save(image, options.save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
