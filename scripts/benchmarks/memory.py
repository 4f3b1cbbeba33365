"""Memory: tiled VAE decode with whole-image GroupNorm statistics vs untiled vs diffusers' tiling,
and the memory planner's estimates against measured peaks (plans for GPU budgets: planner.py).

Real-size SDXL VAE architecture (config in _vae_rss_worker.py, public values), random weights.
Each decode runs in its own subprocess (_vae_rss_worker.py) so its peak RSS is its own.

1. Exactness and seams (real computation): scikit-image's astronaut photograph (512x512) encoded by
   the untiled VAE; the latent decoded untiled, with diffusers' tiling and with ours (same tile side).
2. Peak memory at 512x512 and 2048x2048 with real computation (a 2048^2 decode is ~48 TFLOP:
   about 5-25 minutes per way on 2 CPU cores), against the planner's estimate for a CPU run.
   Peak RSS is VmHWM after a reset in the worker (ru_maxrss would carry over this process's RSS);
   glibc's mmap threshold is fixed at 1 MiB in the workers so freed large buffers go back to the
   OS (as a CUDA caching allocator would reuse them); with the default dynamic threshold RSS also
   keeps freed heap pages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .common import Table, fmt

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "_vae_rss_worker.py"
EQ_SIZE = 512
EQ_TILE = 32  # latent px, for ours and diffusers' alike
MEMORY_CASES = (  # (side, way, tile, grouping); diffusers' tiling leaves 512^2 (its own tile) untiled
    (512, "untiled", None, "unit"),
    (512, "ours", 32, "unit"),
    (512, "ours", 32, "level"),
    (2048, "untiled", None, "unit"),
    (2048, "diffusers", None, "unit"),
    (2048, "ours", 64, "unit"),
)  # level split at 2048^2 recomputes each level's prefix once per GroupNorm: ~5x untiled's time


def worker(args: list[str], threads: int = 2) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(WORKER), "--threads", str(threads), *args], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def photograph(side: int) -> torch.Tensor:
    from skimage import data

    image = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1)[None].float() / 127.5 - 1
    return F.interpolate(image, size=(side, side), mode="area") if image.shape[-1] != side else image


def seam_ratio(image: torch.Tensor, period: int) -> float:
    """Mean |step| between neighbouring pixels across tile borders (every `period` px, both
    directions) divided by the mean |step| everywhere else. 1: borders look like the rest."""
    ratios = []
    for dim in (-1, -2):
        steps = (image.narrow(dim, 1, image.shape[dim] - 1) - image.narrow(dim, 0, image.shape[dim] - 1)).abs()
        steps = steps.mean(dim=tuple(d for d in range(image.ndim) if d != image.ndim + dim))
        border = torch.zeros(steps.shape[0], dtype=torch.bool)
        border[torch.arange(period - 1, steps.shape[0], period)] = True
        ratios.append(float(steps[border].mean() / steps[~border].mean()))
    return max(ratios)


def exactness_table(workdir: Path) -> Table:
    sys.path.insert(0, str(HERE))
    from _vae_rss_worker import real_size_vae

    vae = real_size_vae()
    with torch.no_grad():
        latent = vae.encode(photograph(EQ_SIZE)).latent_dist.mean
    del vae
    latent_path = workdir / "latent.pt"
    torch.save(latent, latent_path)
    results, images = {}, {}
    for way in ("untiled", "diffusers", "ours"):
        out = workdir / f"eq_{way}.pt"
        results[way] = worker(["--way", way, "--size", str(EQ_SIZE), "--tile", str(EQ_TILE),
                               "--latent", str(latent_path), "--save", str(out)])
        images[way] = torch.load(out)
    reference = images["untiled"]
    scale = float(reference.abs().max())
    # diffusers' tiles advance by 75% of a tile and are cropped to that: borders every 0.75 tile.
    periods = {"untiled": EQ_TILE * 8, "ours": EQ_TILE * 8, "diffusers": int(EQ_TILE * 8 * 0.75)}
    rows = []
    for way in ("untiled", "diffusers", "ours"):
        error = float((images[way] - reference).abs().max())
        rows.append([way, f"{error:.2e}", f"{error / scale:.2e}", fmt(seam_ratio(images[way], periods[way])),
                     fmt(seam_ratio(reference, periods[way])), fmt(results[way]["seconds"], 1),
                     fmt(results[way]["peak_above_baseline"] / 2**30, 2)])
    return Table(
        title=f"Tiled VAE decode: exactness and seams ({EQ_SIZE}x{EQ_SIZE} "
              f"photograph, real-size SDXL VAE, random weights)",
        what=(f"scikit-image astronaut {EQ_SIZE}x{EQ_SIZE}, encoded untiled; decoded untiled, with diffusers' tiling "
              f"(vae.enable_tiling(), tile {EQ_TILE} latent px, 25% overlap blend) and with hires' tiling (tile "
              f"{EQ_TILE} latent px, whole-image GroupNorm statistics); float32 on CPU, 1 run each. Seam ratio: mean "
              f"|neighbour step| across the method's tile borders / elsewhere (max over directions); the untiled "
              f"image's ratio at the same borders is the baseline (no seam = equal)."),
        header=["decode", "max abs error vs untiled", "relative to max |untiled|",
                "seam ratio", "untiled at same borders",
                "seconds", "peak RSS above baseline (GiB)"],
        rows=rows,
    )


def memory_table() -> Table:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    from _vae_rss_worker import REAL_VAE

    from diffusers import AutoencoderKL
    from hires.techniques.memory import estimate as memory_planner

    with torch.device("meta"):
        meta_vae = AutoencoderKL(**REAL_VAE)
    measured = {}
    for side, way, tile, grouping in MEMORY_CASES:
        args = ["--way", way, "--size", str(side), "--grouping", grouping]
        if tile:
            args += ["--tile", str(tile)]
        measured[(side, way, tile, grouping)] = worker(args)
    rows = []
    for (side, way, tile, grouping), result in measured.items():
        peak = result["peak_above_baseline"]
        untiled = measured[(side, "untiled", None, "unit")]["peak_above_baseline"]
        latent = (1, 4, side // 8, side // 8)
        if way == "diffusers":
            estimate = "-"
        else:
            bytes_ = memory_planner.vae_peak_bytes(meta_vae, "decode", latent, torch.float32, tiled=way == "ours",
                                                   tile_size=tile, grouping=grouping, device_type="cpu")
            estimate = f"{bytes_ / 2**30:.2f} ({100 * (bytes_ / peak - 1):+.0f}%)"
        label = way if way != "ours" else f"ours (tile {tile}, {grouping})"
        rows.append([f"{side}x{side}", label, fmt(peak / 2**30, 2),
                     fmt(peak / untiled, 3), estimate, fmt(result["seconds"], 0)])
    return Table(
        title="Peak memory of a real-size SDXL VAE decode (float32, CPU, peak RSS of a subprocess)",
        what=("Peak RSS (VmHWM) above the process's RSS before decoding (model and latent loaded), real computation, "
              "random latent, 1 run each, torch threads 2; glibc mmap threshold fixed at 1 MiB. Planner: "
              "hires.techniques.memory.estimate.vae_peak_bytes(..., "
              "device_type='cpu') (architecture on the meta device; CPU "
              "convolutions hold oneDNN's copy of their input), difference to measured in brackets; it does not model "
              "diffusers' own tiling. Tile in latent px. Seconds: wall time of the decode while the exactness "
              "table's workers shared the CPU."),
        header=["size", "decode", "peak (GiB)", "ratio to untiled", "planner estimate (GiB)", "seconds"],
        rows=rows,
    )


def run(options) -> list[Table]:
    from diffusers import AutoencoderKL  # noqa: F401  (diffusers' lazy imports are not thread-safe: import first)

    tables: dict[str, Table] = {}
    errors: list[BaseException] = []
    with tempfile.TemporaryDirectory() as tmp:
        def exactness():
            try:
                tables["exact"] = exactness_table(Path(tmp))
            except BaseException as error:  # reported after both finish
                errors.append(error)

        thread = threading.Thread(target=exactness)
        thread.start()  # the two measurements are independent subprocess chains: run them side by side
        tables["memory"] = memory_table()
        thread.join()
    if errors:
        raise errors[0]
    return [tables["exact"], tables["memory"]]

