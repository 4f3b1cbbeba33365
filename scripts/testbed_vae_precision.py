"""What VAE precision alone does to the testbed's fidelity measures.

The automatic preset samples a cell's latents once (sd15 testbed model, float32); the same latents are then
decoded in float32, bfloat16 and float16 and scored: largest pixel difference from the float32 decode, halo,
clipped share, hue error and colour-correct share (testbed_metrics), and whether every pixel is finite.

    python scripts/testbed_vae_precision.py --size 64x --n 8 --seeds tune

Prints one line per dtype, each with n; on CPU, float16 convolutions are slow (minutes at 512 px).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import eval_coherence as ev
import numpy as np
import testbed_metrics as tm
import torch

import hires
from hires.sampling.latent_space import to_vae

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ev.MODELS["sd15"], help="an sd15 testbed pipeline folder")
    p.add_argument("--size", default="64x", choices=[k for k, *_ in ev.SIZES[1:]])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seeds", choices=sorted(ev.SEED_SETS), default="tune")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    height, width = next((h, w) for k, _, h, w in ev.SIZES if k == args.size)

    pipe = ev.load_pipeline("sd15", args.model_dir)
    pipe.set_progress_bar_config(disable=True)
    items = ev.cell_items(args.n, ev.SEED_SETS[args.seeds])
    hires.apply(pipe)
    latents = [pipe(prompt, height=height, width=width, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, generator=torch.Generator().manual_seed(seed),
                    output_type="latent").images
               for _, prompt, _, _, seed in items]
    hires.remove(pipe)
    # the family's own latent convention, as every hires decode uses it
    convention = hires.model_info(pipe).family.layout
    latents = [to_vae(convention, pipe.vae, z) for z in latents]
    colours = [colour for _, _, colour, _, _ in items]

    reference = None
    for name, dtype in DTYPES.items():
        vae = pipe.vae.to(dtype)
        with torch.no_grad():
            decoded = [vae.decode(z.to(dtype)).sample[0] for z in latents]
        finite = all(bool(torch.isfinite(x).all()) for x in decoded)
        images = [to_uint8(x) for x in decoded]
        reference = reference or images
        diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(images, reference))
        halo = tm.nanmean(tm.halo(im, c) for im, c in zip(images, colours))
        clipped = float(np.mean([tm.clipped(im) for im in images]))
        hue = float(np.nanmean([tm.colour_drift(im, c)[0] for im, c in zip(images, colours)]))
        correct = float(np.mean([tm.colour_correct(im, c) for im, c in zip(images, colours)]))
        print(f"{name:9s} n={len(images)} {args.size} ({height}x{width}) max |diff| vs float32 {diff:3d} levels, "
              f"halo {halo:.4f}, clipped {clipped:.4f}, hue error {hue:.1f}, colour {correct:.2f}, finite {finite}",
              flush=True)


if __name__ == "__main__":
    main()
