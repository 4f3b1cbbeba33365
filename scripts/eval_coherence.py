"""Count objects in testbed samples above the training size: the coherence number of hires.

For each model (testbed_sd15, testbed_flux), each configuration row and each size (1x, 4x, 16x the
64x64 training area, and a 2:1 wide size), generate K images per prompt, segment the prompted
colour, count connected components (testbed_common.count_objects) and write a Markdown table and a
PNG grid of samples.

    python scripts/eval_coherence.py                      # defaults: docs/testbed.md, docs/testbed_grid.png

Rows are (name, function(pipe) -> context manager); the pipeline is configured inside the `with`
and restored after it. `--rows techniques` uses `technique_rows(family)`: each technique module's
testbed configurations, applied with `hires_row(config)` (hires.apply, then hires.remove).

Determinism: image i of prompt j is drawn from its own generator seeded with seed + 1000*j + i, the
same at every size and in every row, so rows differ only by what the configuration changes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import testbed_common as tc  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "hires" / "assets"
MODELS = {"sd15": ASSETS / "testbed_sd15", "flux": ASSETS / "testbed_flux"}
MAX_SEQUENCE_LENGTH = 8  # the testbed T5 tokenizer's length; Flux's default of 512 is wasted here

Row = tuple[str, Callable[[object], ContextManager]]


def plain(pipe) -> ContextManager:
    return contextlib.nullcontext()


ROWS: list[Row] = [("plain diffusers", plain)]


def hires_row(config) -> Callable[[object], ContextManager]:
    @contextlib.contextmanager
    def use(pipe):
        import hires

        hires.apply(pipe, config)
        try:
            yield
        finally:
            hires.remove(pipe)

    return use


def extra_flux_rows() -> dict:
    """Flux rows measured in a second run (docs/testbed.md)."""
    import hires
    from hires.sampling import bottleneck, progressive
    from hires.techniques import attention

    return {
        "positions: NTK RoPE": hires.HiresConfig(positions=hires.PositionConfig(enabled=True, rope="ntk")),
        "positions: interpolation (PI)": hires.HiresConfig(positions=hires.PositionConfig(enabled=True, rope="interpolation")),
        "window attention (shifted)": attention.testbed_configs()["window attention (shifted)"],
        "structure guidance (latent)": progressive.testbed_configs()["structure guidance (latent)"],
        "bottleneck (default 10/70/20)": bottleneck.testbed_configs()["bottleneck (default 10/70/20)"],
        # the shift policy alone (plain RoPE) and YaRN without it: plain diffusers is rope "none" + "dynamic"
        "positions: plain RoPE, clamped shift": hires.HiresConfig(positions=hires.PositionConfig(enabled=True, rope="none")),
        "positions: plain RoPE, static shift 6": hires.HiresConfig(positions=hires.PositionConfig(
            enabled=True, rope="none", timestep_shift="static", shift=6.0)),
        "positions: YaRN RoPE, dynamic shift": hires.HiresConfig(positions=hires.PositionConfig(
            enabled=True, rope="yarn", timestep_shift="dynamic")),
    }


def technique_rows(family: str) -> list[Row]:
    """Every technique's testbed configurations (each module names its own), the same at every size."""
    import hires
    from hires.sampling import bottleneck, progressive
    from hires.techniques import attention, redilation

    if family == "sd15":
        configs = {name: hires.HiresConfig(redilation=c) for name, c in redilation.TESTBED_ROWS.items()}
        configs.update(attention.testbed_configs())
        configs.update(progressive.testbed_configs())
        configs.update(bottleneck.testbed_configs())
        configs["APG (preset)"] = hires.HiresConfig(apg=hires.APGConfig(enabled=True))
    else:
        positions = hires.PositionConfig(enabled=True)
        pixel = progressive.testbed_configs()["structure guidance (pixel)"]
        configs = {
            "positions: default (YaRN RoPE, clamped shift)": hires.HiresConfig(positions=positions),
            "entropy scaling": attention.testbed_configs()["entropy scaling"],
            "structure guidance (pixel)": pixel,
            "structure guidance + positions + entropy scaling": pixel.replace(
                positions=positions, entropy_scaling=hires.EntropyScalingConfig(enabled=True)),
        }
        configs.update(extra_flux_rows())
    return [("plain diffusers", plain)] + [(name, hires_row(c)) for name, c in configs.items()]

# (label, height, width, default K per prompt). Larger sizes cost more per image, so fewer images.
SIZES = [
    ("1x (64x64)", 64, 64, 32),
    ("4x (128x128)", 128, 128, 8),
    ("2:1 wide, 4.5x (96x192)", 96, 192, 4),
    ("16x (256x256)", 256, 256, 1),
]


def load_pipeline(family: str, path: Path):
    if family == "sd15":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    if family == "flux":
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
        # FluxPipeline hard-codes a 1024-class default size; this DiT's base (what hires scales from) is 64 px.
        pipe.default_sample_size = 64 // pipe.vae_scale_factor
        return pipe
    raise ValueError(f"family={family!r} is not one of {tuple(MODELS)}")


def generate(pipe, family: str, prompt: str, seeds: list[int], height: int, width: int, steps: int,
             guidance: float, batch: int) -> list[np.ndarray]:
    """uint8 images, one per seed, each from its own generator (independent of batching)."""
    out = []
    for i in range(0, len(seeds), batch):
        chunk = seeds[i : i + batch]
        gens = [torch.Generator().manual_seed(s) for s in chunk]
        kw = dict(prompt=[prompt] * len(chunk), height=height, width=width, num_inference_steps=steps,
                  generator=gens, output_type="np")
        if family == "flux":
            kw.update(negative_prompt=[""] * len(chunk), true_cfg_scale=guidance,
                      max_sequence_length=MAX_SEQUENCE_LENGTH)
        else:
            kw.update(guidance_scale=guidance)
        with torch.no_grad():
            imgs = pipe(**kw).images
        out.extend((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
    return out


def sample_seed(seed: int, prompt_index: int, i: int) -> int:
    return seed + 1000 * prompt_index + i


def run_model(family: str, args) -> tuple[list[dict], dict]:
    """All rows and sizes of one model; a separate process per model when --jobs > 1."""
    torch.set_num_threads(args.threads)
    prompts = tc.all_prompts()[: args.prompts] if args.prompts else tc.all_prompts()
    results, grid = [], {}
    pipe = load_pipeline(family, Path(args.model_dir[family]) if args.model_dir else MODELS[family])
    pipe.set_progress_bar_config(disable=True)
    rows = technique_rows(family) if args.rows == "techniques" else ROWS
    if args.only_rows:
        unknown = sorted(set(args.only_rows) - {name for name, _ in rows})
        if unknown:
            raise SystemExit(f"--only-rows {unknown}: no such {family} row; rows are: {', '.join(n for n, _ in rows)}")
        rows = [(name, row) for name, row in rows if name in args.only_rows]
    for row_name, row in rows:
        with row(pipe):
            for label, h, w, k in args.sizes:
                t0 = time.time()
                counts, shown = [], []
                for j, (prompt, colour, _) in enumerate(prompts):
                    seeds = [sample_seed(args.seed, j, i) for i in range(k)]
                    imgs = generate(pipe, family, prompt, seeds, h, w, args.steps, args.guidance[family],
                                    args.batch)
                    counts += [tc.count_objects(im, colour) for im in imgs]
                    shown.append(imgs[0])
                st = tc.summarise(counts)
                secs = time.time() - t0
                results.append(dict(model=family, row=row_name, size=label, height=h, width=w,
                                    k_per_prompt=k, n_images=st.k,
                                    share_exactly_one=st.share_exactly_one, mean_count=st.mean_count,
                                    mean_area=st.mean_area, seconds=round(secs, 1)))
                grid[(family, row_name, label)] = shown
                print(f"{family:5s} {row_name:16s} {label:24s} one={st.share_exactly_one:.3f} "
                      f"count={st.mean_count:.2f} area={st.mean_area:.4f} ({secs:.0f}s)", flush=True)
    return results, grid


def run(args) -> dict:
    prompts = tc.all_prompts()[: args.prompts] if args.prompts else tc.all_prompts()
    args.sizes = [(lab, h, w, args.k if args.k else k) for lab, h, w, k in SIZES
                  if not args.sizes or lab.split()[0] in args.sizes]
    if args.k_1x:
        args.sizes[0] = (*args.sizes[0][:3], args.k_1x)
    t_all = time.time()
    if args.jobs > 1 and len(args.models) > 1:
        # One process per model: on a small shared CPU, single-threaded processes side by side
        # finish sooner than one multi-threaded process. Numbers do not depend on this.
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(args.jobs, len(args.models)), mp_context=mp.get_context("spawn")) as ex:
            parts = list(ex.map(run_model, args.models, [args] * len(args.models)))
    else:
        parts = [run_model(f, args) for f in args.models]
    results = [r for rs, _ in parts for r in rs]
    grid = {k: v for _, g in parts for k, v in g.items()}
    return dict(results=results, grid=grid, wall=time.time() - t_all, prompts=[p for p, _, _ in prompts])


def write_grid(grid: dict, path: Path, n_show: int, cell: int = 80):
    """One strip per (model, row, size): the first sample of the first n_show prompts."""
    strips = []
    for (_, _, _), imgs in grid.items():
        tiles = []
        for im in [imgs[j * 5 % len(imgs)] for j in range(min(n_show, len(imgs)))]:
            h, w = im.shape[:2]
            scale = cell / h
            tiles.append(np.asarray(Image.fromarray(im).resize((round(w * scale), cell), Image.LANCZOS)))
            tiles.append(np.full((cell, 4, 3), 255, np.uint8))
        strips.append(np.concatenate(tiles, axis=1))
    width = max(s.shape[1] for s in strips)
    rows = []
    for s in strips:
        pad = np.full((cell, width - s.shape[1], 3), 255, np.uint8)
        rows += [np.concatenate([s, pad], axis=1), np.full((4, width, 3), 255, np.uint8)]
    # A 128-colour palette keeps the PNG small (<300 KB) at no visible cost for these images.
    img = Image.fromarray(np.concatenate(rows, axis=0)).quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    img.save(path, optimize=True)


def model_lines(args) -> list[str]:
    """What each evaluated model is, read from the training record shipped beside its weights."""
    lines = ["", "Models (from each folder's `training.json`):", ""]
    for family in args.models:
        folder = Path(args.model_dir[family]) if args.model_dir else MODELS[family]
        rec_path = folder / "training.json"
        if not rec_path.exists():
            lines.append(f"- {family}: `{folder}` (no training record)")
            continue
        rec = json.loads(rec_path.read_text())
        a, v = rec["args"], rec.get("vae_record", {})
        params = rec.get("params_unet") or rec.get("params_transformer")
        if family == "sd15":
            arch = (f"UNet2DConditionModel {params / 1e6:.2f}M params, channels {a['unet_channels']}, "
                    f"{a['layers_per_block']} layer(s) per block, eps-prediction, DDPM scaled_linear betas")
        else:
            arch = (f"FluxTransformer2DModel {params / 1e6:.2f}M params, {a['flux_double']} double + "
                    f"{a['flux_single']} single blocks, {a['flux_heads']} heads x {a['flux_head_dim']}, "
                    "RoPE, flow matching")
        secs = rec.get("train_seconds_training_run", rec["train_seconds_this_run"])
        lines.append(
            f"- {family}: {arch}; {rec['steps_done']} steps of batch {a['batch_size']} on {a['n_data']} "
            f"images, lr {a['lr']}, final loss {rec['final_loss']:.4f}, {secs:.0f} s training. "
            f"VAE: AutoencoderKL channels {v.get('args', {}).get('vae_channels')}, latent factor 4, "
            f"{v.get('steps_done')} steps, final loss {v.get('final_loss', float('nan')):.4f}."
        )
    return lines


def write_markdown(res: dict, args, path: Path, grid_path: Path, n_show: int):
    lines = [
        "# Coherence testbed results",
        "",
        "Generated by `python scripts/eval_coherence.py` "
        f"(`{' '.join(sys.argv[1:]) or 'default arguments'}`). Do not edit by hand.",
        "",
        f"- Models: {', '.join(f'`hires/assets/testbed_{m}`' for m in args.models)} "
        "(trained at 64x64 by `scripts/train_testbed.py`; see each folder's `training.json`).",
        f"- Prompts ({len(res['prompts'])}): " + ", ".join(f'"{p}"' for p in res["prompts"]) + ".",
        f"- K = images per prompt (column K); image i of prompt j uses seed {args.seed} + 1000*j + i.",
        f"- Sampling: {args.steps} steps; sd15: DDIM, guidance_scale {args.guidance['sd15']}; "
        f"flux: flow-match Euler with Flux's size-dependent shift, true_cfg_scale {args.guidance['flux']} "
        f"(negative prompt \"\"), max_sequence_length {MAX_SEQUENCE_LENGTH}.",
        "- Metric (`scripts/testbed_common.py`): pixels within the prompted colour's hue band "
        f"(+-{tc.HUE_HALF_WIDTH} deg, saturation >= {tc.MIN_SATURATION}), 8-connected components of at "
        "least max(24 px, 0.05% of the image). *one* = share of images with exactly one such object; "
        "*count* = mean objects per image; *area* = mean object area / image area.",
        f"- Wall time {res['wall']:.0f} s on {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {args.jobs} process(es) x {args.threads} thread(s); the CPU "
        "was shared with other work, so seconds are indicative only.",
        "",
        *model_lines(args),
        "",
        "| model | configuration | size | K | images | one | count | area | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        lines.append(
            f"| {r['model']} | {r['row']} | {r['size']} | {r['k_per_prompt']} | {r['n_images']} | "
            f"{r['share_exactly_one']:.3f} | {r['mean_count']:.2f} | {r['mean_area']:.4f} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        f"![samples]({grid_path.name})",
        "",
        f"`{grid_path.name}`: one strip per model / configuration / size, in table order; the first "
        f"sample (i = 0) of prompts j = 0, 5, 10, 3 (first {n_show} of j*5 mod 12: red circle, yellow square, "
        "green triangle, blue circle), scaled to a common height.",
        "",
    ]
    path.write_text("\n".join(lines))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--model-dir", nargs=2, action="append", metavar=("FAMILY", "PATH"),
                   help="evaluate another folder for a family, e.g. --model-dir sd15 /tmp/x")
    p.add_argument("--k", type=int, help="images per prompt at every size (default: per size)")
    p.add_argument("--k-1x", type=int, help="images per prompt at 1x only")
    p.add_argument("--prompts", type=int, help="use only the first N prompts")
    p.add_argument("--sizes", nargs="+", choices=[lab.split()[0] for lab, *_ in SIZES],
                   help="evaluate only these sizes (default: all)")
    p.add_argument("--rows", choices=("plain", "techniques"), default="plain",
                   help="plain: diffusers alone; techniques: every technique's testbed rows (hires.*.testbed_configs)")
    p.add_argument("--only-rows", nargs="+", metavar="ROW", help="evaluate only the rows with these names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--guidance-sd15", type=float, default=5.0)
    p.add_argument("--guidance-flux", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads per model process")
    p.add_argument("--jobs", type=int, default=2, help="models evaluated in parallel processes")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "testbed.md")
    p.add_argument("--png", type=Path, default=REPO / "docs" / "testbed_grid.png")
    p.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    p.add_argument("--show", type=int, default=4, help="prompts shown per strip in the grid")
    args = p.parse_args(argv)
    args.model_dir = {f: pth for f, pth in args.model_dir} if args.model_dir else None
    if args.model_dir:
        args.model_dir = {f: args.model_dir.get(f, MODELS[f]) for f in MODELS}
    args.guidance = {"sd15": args.guidance_sd15, "flux": args.guidance_flux}
    return args


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    res = run(args)
    args.md.parent.mkdir(parents=True, exist_ok=True)
    write_grid(res["grid"], args.png, args.show)
    write_markdown(res, args, args.md, args.png, args.show)
    if args.json:
        args.json.write_text(json.dumps({k: v for k, v in res.items() if k != "grid"}, indent=1) + "\n")
    print(f"wrote {args.md} and {args.png} ({args.png.stat().st_size // 1024} KB) in {res['wall']:.0f} s")


if __name__ == "__main__":
    main()
