"""Upscaling the model's own picture with a strength, on the embedded testbed model (`hires generate`'s default).

For each of --n inputs (a plain base-size render of a testbed prompt, seed i), the picture is upscaled 2x and
4x with `generate(pipe, image=..., strength=s)` under the automatic preset (structure guidance's doubling
stages), at every strength of --strengths, and measured with the testbed's metrics (testbed_metrics):
- one: share of outputs with exactly one object of the prompted colour (95% Wilson interval);
- hue: mean hue error (degrees) of the largest object against the trained colour;
- detail: object texture contrast at its training period in pixels, relative to the inputs' own
  (1.0: as detailed as the base-size renders themselves; an upscale without new detail has it k times coarser);
- keep: PSNR (dB) of the output box-downscaled to the input's size against the input (how much of the picture stays).
Writes a Markdown table and a contact sheet (rows: inputs; columns: the input, then 4x at each strength).

    python scripts/strength_sweep.py --n 16 --out sweep/
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import testbed_common as tc  # noqa: E402
import testbed_metrics as tm  # noqa: E402

STRENGTHS = (0.0, 0.15, 0.3, 0.5, 0.7, 1.0)
SCALES = (2, 4)


def load(model: str):
    from diffusers import StableDiffusionPipeline

    import hires

    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    hires.apply(pipe)  # the automatic preset, as `hires generate` uses it
    return pipe


def inputs(pipe, n: int, steps: int, size: int):
    """(picture, colour, shape, seed) of n plain base-size renders, prompts drawn as the data set draws them."""
    import hires

    config = hires.runtime.get_attachment(pipe).config
    hires.remove(pipe)
    drawn = []
    for seed in range(n):
        sample = tc.make_sample(2026, seed)
        image = pipe(sample.caption, height=size, width=size, num_inference_steps=steps,
                     generator=torch.Generator().manual_seed(seed)).images[0]
        drawn.append((image, sample.colour, sample.shape, seed))
    hires.apply(pipe, config)
    return drawn


def keep_psnr(output: np.ndarray, picture: np.ndarray) -> float:
    k = output.shape[0] // picture.shape[0]
    small = output.astype(np.float64).reshape(picture.shape[0], k, picture.shape[1], k, 3).mean(axis=(1, 3))
    mse = float(np.mean((small - picture.astype(np.float64)) ** 2))
    return 10 * math.log10(255**2 / max(mse, 1e-10))


def run(args) -> dict:
    from hires.techniques.structure_guidance import guidance as progressive

    pipe = load(args.model)
    base = pipe.unet.config.sample_size * pipe.vae_scale_factor
    pictures = inputs(pipe, args.n, args.steps, base)
    own = [tm.measure(np.asarray(p), c, s) for p, c, s, _ in pictures]
    reference = tm.Reference.of(own)
    cells: dict = {}
    sheet: dict = {}
    started = time.time()
    for picture, colour, shape, seed in pictures:
        for scale in SCALES:
            for strength in args.strengths:
                out = progressive.generate(pipe, tc.caption(colour, shape), base * scale, base * scale, image=picture,
                                           strength=strength, num_inference_steps=args.steps,
                                           generator=torch.Generator().manual_seed(seed)).images[0]
                array = np.asarray(out)
                m = tm.measure(array, colour, shape)
                cells.setdefault((scale, strength), []).append((m, keep_psnr(array, np.asarray(picture))))
                if scale == 4 and seed < args.sheet_rows:
                    sheet.setdefault(seed, [np.asarray(picture.resize(out.size, Image.NEAREST))]).append(array)
        print(f"input {seed + 1}/{len(pictures)} done ({time.time() - started:.0f} s)", file=sys.stderr)
    stats = tm.summarise(own, reference)
    rows = [{"scale": 1, "strength": None, "n": stats["n"], "one": stats["one"], "one_ci": stats["one_ci"],
             "hue": tm.nanmean(m.hue_error for m in own), "detail": 1.0, "keep_psnr": float("inf")}]
    for (scale, strength), values in sorted(cells.items()):
        measures = [m for m, _ in values]
        stats = tm.summarise(measures, reference)
        rows.append({"scale": scale, "strength": strength, "n": stats["n"], "one": stats["one"],
                     "one_ci": stats["one_ci"], "hue": tm.nanmean(m.hue_error for m in measures),
                     "detail": stats["detail"], "keep_psnr": float(np.mean([k for _, k in values]))})
    return {"rows": rows, "sheet": sheet, "base": base, "steps": args.steps}


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Testbed sd15, inputs: plain {result['base']}^2 renders, {result['steps']} steps, automatic preset.",
             "", "| scale | strength | n | one object (95% CI) | hue error (deg) | detail vs input | keep PSNR (dB) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lo, hi = r["one_ci"]
        strength = "input" if r["strength"] is None else f"{r['strength']:g}"
        lines.append(f"| {r['scale']}x | {strength} | {r['n']} | {r['one']:.2f} ({lo:.2f}-{hi:.2f}) | "
                     f"{r['hue']:.1f} | {r['detail']:.2f} | {r['keep_psnr']:.1f} |")
    (out / "strength_sweep.md").write_text("\n".join(lines) + "\n")
    (out / "strength_sweep.json").write_text(json.dumps(result["rows"], indent=1))
    gap = 4
    bands = []
    for seed in sorted(result["sheet"]):
        tiles = []
        for im in result["sheet"][seed]:
            tiles += [im, np.full((im.shape[0], gap, 3), 255, np.uint8)]
        bands += [np.concatenate(tiles, axis=1), np.full((gap, sum(t.shape[1] for t in tiles), 3), 255, np.uint8)]
    if bands:
        Image.fromarray(np.concatenate(bands, axis=0)).save(out / "strength_sweep_4x.png", optimize=True)
    print("\n".join(lines))


def parse(argv=None):
    from hires.cli import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="an SD 1.x testbed folder (default: the embedded)")
    parser.add_argument("--n", type=int, default=16, help="inputs (prompt and seed each)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS))
    parser.add_argument("--sheet-rows", type=int, default=4, help="inputs shown on the contact sheet")
    parser.add_argument("--out", type=Path, required=True, help="folder for the table, its JSON and the sheet")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    write(run(args), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
