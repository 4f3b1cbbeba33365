"""Coherence testbed v3: one object of the right colour *and* native-scale detail, beside the trivial baseline.

For each model (testbed_sd15, testbed_flux), each row (scripts/testbed_rows.py: plain diffusers, the
trivial baseline = base size + bicubic upscale, the automatic preset, the same at the CLI's and the
family's default steps, every technique alone, the best combinations) and each size (4x, 16x, 64x the
64x64 training area, a 2:1 and a 1:3 aspect), generate n images and score them with
testbed_metrics.measure: objects of the prompted colour, shape of the largest, whether the largest
object has the prompted colour and its hue error, texture detail at the training period relative to
1x plain samples and the stripes' power relative to drawn pictures, halo, speckle, clipping, and
seconds per image as a ratio to plain at the same size.

    python scripts/eval_coherence.py                  # both models, docs/testbed.md + contact sheets
    python scripts/eval_coherence.py --models sd15 --json /tmp/sd15.json --md /tmp/sd15.md
    python scripts/eval_coherence.py --seeds tune --md /tmp/tune.md      # tuning: not the reported seeds
    python scripts/eval_coherence.py --only-rows "automatic preset (hires.apply(pipe))" --sizes 16x --n 4
    python scripts/eval_coherence.py --from-json /tmp/sd15.json /tmp/flux.json   # table from saved runs

Seeds: `--seeds report` (the default, what docs/testbed.md reports) or `--seeds tune` (a disjoint set for
choosing settings, so reported numbers are never the ones tuned on). Image i of a cell uses prompt
i mod 12 and seed base + 1000*(i mod 12) + i // 12, the same in every row, so rows differ only by what
the configuration changes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import testbed_common as tc
import testbed_metrics as tm
import testbed_rows as trows
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "hires" / "assets"
MODELS = {"sd15": ASSETS / "testbed_sd15", "flux": ASSETS / "testbed_flux"}
MAX_SEQUENCE_LENGTH = 8  # the testbed T5 tokenizer's length; Flux's default of 512 is wasted here
BASE = 64  # training size of both models

# (key, label, height, width). 1x is plain only: it is the detail reference.
SIZES = [
    ("1x", "1x (64x64)", 64, 64),
    ("4x", "4x (128x128)", 128, 128),
    ("16x", "16x (256x256)", 256, 256),
    ("64x", "64x (512x512)", 512, 512),
    ("2:1", "2:1 wide, 8x (128x256)", 128, 256),
    ("1:3", "1:3 tall, 6.75x (288x96)", 288, 96),
]
# Images per cell, chosen so every row of both models fits about an hour on the 2-core CPU, two
# single-threaded worker processes sharing the rows (docs/testbed.md gives the run's own time). The
# preset's rows (the standing preset and the rows at the CLI's and the family's defaults: what the
# fidelity targets read) and the trivial baselines get 24 images at 16x and 64x, since halo and clipping
# are carried by a few images per cell and 12 left their means seed-bound; plain above 1x, which only
# shows that plain loses the object and times the rest, gets fewer ("plain" below, 1x is the detail
# reference and keeps its group's count); the rows of one technique, one combination or one switch
# of the preset changed each get few. The run's time follows the host's speed: on a slower host pass
# --n, --sizes or --only-rows.
N_DEFAULT = {
    "standing": {"1x": 96, "4x": 8, "16x": 24, "64x": 24, "2:1": 4, "1:3": 4},
    "defaults": {"1x": 48, "4x": 8, "16x": 24, "64x": 24, "2:1": 4, "1:3": 4},
    "plain": {"4x": 8, "16x": 12, "64x": 4, "2:1": 4, "1:3": 4},
    "technique": {"4x": 3, "16x": 3, "64x": 1, "2:1": 2, "1:3": 2},
}
SEED_SETS = {"report": 0, "tune": 500_000}  # base seeds: the reported set and a disjoint one for tuning
DRAWN_N = 96  # drawn pictures (testbed_common.drawn_pictures) the stripes column is judged against
SHEET_SIZES = ("16x", "64x")
SHEET_ROWS = (trows.PLAIN, trows.TRIVIAL, trows.PRESET)


def load_pipeline(family: str, path: Path):
    if family == "sd15":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    if family == "flux":
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
        # FluxPipeline hard-codes a 1024-class default size; this DiT's base (what hires scales from) is 64 px.
        pipe.default_sample_size = BASE // pipe.vae_scale_factor
        return pipe
    raise ValueError(f"family={family!r} is not one of {tuple(MODELS)}")


def base_size(height: int, width: int) -> tuple[int, int]:
    """The trivial baseline's generation size: the training area at the request's aspect, sides
    multiples of 16 (both pipelines' latent grids), at least 32."""
    s = (height * width / BASE**2) ** 0.5
    return max(32, round(height / s / 16) * 16), max(32, round(width / s / 16) * 16)


def seed_base(args) -> int:
    """The seed set's base (--seeds), unless --seed names one."""
    return SEED_SETS[args.seeds] if args.seed is None else args.seed


def cell_items(n: int, seed: int) -> list[tuple[int, str, str, str, int]]:
    """(i, prompt, colour, shape, seed) of the cell's n images."""
    prompts = tc.all_prompts()
    out = []
    for i in range(n):
        j = i % len(prompts)
        p, c, s = prompts[j]
        out.append((i, p, c, s, seed + 1000 * j + i // len(prompts)))
    return out


def sampling_arguments(row: trows.Row, family: str, args, batch: int) -> dict:
    """The call's steps and guidance: the row's own where it names them, else the eval's. With
    PIPELINE_GUIDANCE nothing is passed (as `hires generate` does): SD's guidance_scale default 7.5, and
    for Flux no true CFG (true_cfg_scale 1; this DiT has no guidance embedding)."""
    kw = {"num_inference_steps": row.steps or args.steps}
    if family == "flux":
        kw["max_sequence_length"] = MAX_SEQUENCE_LENGTH
    if row.guidance == trows.PIPELINE_GUIDANCE:
        return kw
    scale = args.guidance[family] if row.guidance is None else row.guidance
    if family == "flux":
        return {**kw, "negative_prompt": [""] * batch, "true_cfg_scale": scale}
    return {**kw, "guidance_scale": scale}


def generate(pipe, family, prompts, seeds, height, width, args, row: trows.Row = trows.STANDING[0]) -> list[np.ndarray]:
    """uint8 images, each from its own generator (independent of batching)."""
    out = []
    for a in range(0, len(prompts), args.batch):
        ps, ss = prompts[a : a + args.batch], seeds[a : a + args.batch]
        kw = {"prompt": ps, "height": height, "width": width,
              "generator": [torch.Generator().manual_seed(s) for s in ss], "output_type": "np",
              **sampling_arguments(row, family, args, len(ps))}
        with torch.no_grad():
            imgs = pipe(**kw).images
        out.extend((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
    return out


def trivial(pipe, family, prompts, seeds, height, width, args, row: trows.Row = trows.STANDING[1]) -> list[np.ndarray]:
    bh, bw = base_size(height, width)
    small = generate(pipe, family, prompts, seeds, bh, bw, args, row)
    return [np.asarray(Image.fromarray(im).resize((width, height), Image.BICUBIC)) for im in small]


@contextlib.contextmanager
def applied(pipe, row: trows.Row):
    if row.kind in (trows.PLAIN, trows.TRIVIAL):
        yield
        return
    import hires

    hires.apply(pipe) if row.kind == trows.PRESET else hires.apply(pipe, row.config)
    try:
        yield
    finally:
        hires.remove(pipe)


_PIPELINES: dict = {}


def pipeline(family: str, args):
    """This process's pipeline of `family`, loaded once (rows restore it with hires.remove)."""
    if family not in _PIPELINES:
        pipe = load_pipeline(family, Path(args.model_dir.get(family, MODELS[family])))
        pipe.set_progress_bar_config(disable=True)
        _PIPELINES[family] = pipe
    return _PIPELINES[family]


def model_rows(family: str, args) -> list[trows.Row]:
    """The model's rows, or with --only-rows those named, the reference plain row (the first) and the
    plain row at each named row's settings."""
    rows = trows.ROWS[family]()
    if args.only_rows:
        named = [r for r in rows if r.name in args.only_rows]
        settings = {r.settings for r in named}
        rows = [r for i, r in enumerate(rows)
                if i == 0 or r in named or (r.kind == trows.PLAIN and r.settings in settings)]
    return rows


def images_per_cell(args) -> dict:
    """Images per cell: per row group and size; 1x is the reference (plain rows only), plain rows above
    1x take the "plain" counts."""
    sizes = [k for k, *_ in SIZES]
    out = {kind: {k: args.n or N_DEFAULT[kind][k] for k in sizes[1:]} for kind in N_DEFAULT}
    for kind in out:
        if "1x" in N_DEFAULT[kind]:
            out[kind] = {"1x": args.n_1x or N_DEFAULT[kind]["1x"], **out[kind]}
    return out


def row_group(row: trows.Row) -> str:
    return row.group if row.group in ("standing", "defaults") else "technique"  # combinations count as techniques


def cell_n(row: trows.Row, size: str, args) -> int:
    per_cell = images_per_cell(args)
    return per_cell["plain" if row.kind == trows.PLAIN and size != "1x" else row_group(row)][size]


def row_sizes(row: trows.Row, args) -> list[str]:
    """Sizes a row runs: 1x for plain rows only (the reference), the rest as --sizes asks, within the row's own."""
    wanted = (["1x"] if row.kind == trows.PLAIN else []) + list(args.sizes)
    return [k for k, *_ in SIZES if k in wanted and (row.sizes is None or k in row.sizes)]


def run_row(family: str, index: int, args) -> dict:
    """Every size of one row of one model: each cell's measures and seconds per image, unscored (the 1x
    reference and plain's seconds come from the plain row, which may run in another process)."""
    pipe = pipeline(family, args)
    row = model_rows(family, args)[index]
    t_row = time.perf_counter()
    cells, sheet = [], {}
    with applied(pipe, row):
        for key, label, h, w in SIZES:
            if key not in row_sizes(row, args):
                continue
            items = cell_items(cell_n(row, key, args), seed_base(args))
            prompts, seeds = [it[1] for it in items], [it[4] for it in items]
            make = trivial if row.kind == trows.TRIVIAL else generate
            cell = {"model": family, "row": row.name, "group": row.group, "kind": row.kind,
                    "settings": list(row.settings), "size": key, "label": label, "height": h, "width": w}
            t0 = time.perf_counter()
            try:
                imgs = make(pipe, family, prompts, seeds, h, w, args, row)
            except (ValueError, RuntimeError) as err:  # a row that cannot run here is a result too
                cells.append({**cell, "n": 0, "error": f"{type(err).__name__}: {err}"})
                print(f"{family} | {row.name} | {key}: {type(err).__name__}: {err}", flush=True)
                continue
            secs = (time.perf_counter() - t0) / len(imgs)
            cells.append({**cell, "seconds_per_image": secs,
                          "measures": [tm.measure(im, it[2], it[3]) for im, it in zip(imgs, items)]})
            if key in SHEET_SIZES and row.kind in SHEET_ROWS and row.group == "standing":
                sheet[(row.kind, key)] = imgs[: args.sheet_n]
            print(f"{family} | {row.name[:44]:44s} | {key:4s} n={len(imgs):2d} t={secs:.1f}s", flush=True)
    return {"model": family, "index": index, "cells": cells, "sheet": sheet,
            "seconds": time.perf_counter() - t_row}


def drawn_measures(n: int = DRAWN_N) -> list[tm.Measure]:
    """Measures of held-out drawn pictures, picture i of prompt i mod 12: the data's own stripes."""
    return [tm.measure(p.image, p.colour, p.shape) for p in tc.drawn_pictures(n)]


def score_model(family: str, parts: list[dict], args) -> dict:
    """One model's cells in row order, scored against its reference plain row's 1x images (the first
    row's) and against drawn pictures, and timed against plain at the same size and settings (the
    reference plain row where no plain row has them)."""
    parts = sorted(parts, key=lambda p: p["index"])
    plain = next(c for p in parts for c in p["cells"] if c["kind"] == trows.PLAIN and c["size"] == "1x")
    if "error" in plain:
        raise RuntimeError(f"{family}: plain 1x failed, so nothing can be scored: {plain['error']}")
    ref = tm.Reference.of(plain["measures"], drawn_measures())
    reference_settings = plain.get("settings", [None, None])
    plain_secs = {}
    for p in parts:
        for c in p["cells"]:
            if c["kind"] == trows.PLAIN and "error" not in c:
                plain_secs.setdefault((tuple(c.get("settings", reference_settings)), c["size"]), c["seconds_per_image"])

    def plain_seconds(c) -> float:
        own = (tuple(c.get("settings", reference_settings)), c["size"])
        return plain_secs.get(own) or plain_secs[(tuple(reference_settings), c["size"])]
    cells, sheet = [], {}
    for part in parts:
        sheet.update(part["sheet"])
        for c in part["cells"]:
            if "error" in c:
                cells.append(c)
                continue
            c = dict(c)
            st = tm.summarise(c.pop("measures"), ref)
            cells.append({**c, "time_ratio": c["seconds_per_image"] / plain_seconds(c), **st})
            print(f"{family} | {c['row'][:44]:44s} | {c['size']:4s} n={st['n']:2d} one={st['one']:.2f} "
                  f"colour={st['colour']:.2f} shape={st['shape']:.2f} detail={st['detail']:.2f}/{st['detail_bg']:.2f} "
                  f"stripes={st['stripes']:.2f} halo={st['halo']:.3f} hue={st['hue_error']:.1f} "
                  f"time={cells[-1]['time_ratio']:.2f}x")
    attach_baselines(cells, reference_settings)
    if sheet:
        write_sheet(sheet, args.sheet_dir / f"testbed_sheet_{family}.png")
    return {"model": family, "cells": cells, "reference": ref.as_dict(), "n": images_per_cell(args),
            "seconds": sum(p["seconds"] for p in parts), "record": model_record(family, args)}


BASELINE_KEYS = ("one", "colour", "detail", "detail_bg")


def attach_baselines(cells: list[dict], reference_settings) -> None:
    """Give each scored cell the trivial baseline's measures (base size + bicubic upscale) at its size and
    settings, or at the reference settings where no trivial row samples as it does, so every row reads
    beside what an upscale of the base image gives."""
    def key(c, settings=None):
        return tuple(settings if settings is not None else c.get("settings", reference_settings)), c["size"]
    trivial_cells = {key(c): c for c in cells if c["kind"] == trows.TRIVIAL and "error" not in c}
    for c in cells:
        if "error" in c or c["kind"] == trows.TRIVIAL:
            continue
        base = trivial_cells.get(key(c)) or trivial_cells.get(key(c, reference_settings))
        if base is not None:
            c["baseline"] = {k: base[k] for k in BASELINE_KEYS} | {"row": base["row"]}


def _baseline_text(c: dict) -> str:
    b = c.get("baseline")
    return " / ".join(_f(b[k], ".2f") for k in BASELINE_KEYS) if b else "—"


def write_sheet(sheet: dict, path: Path, gap: int = 6):
    """Rows plain / trivial baseline / preset; columns 16x then 64x, same seeds, at native pixels
    (downscaling would erase the texture the sheet is there to show)."""
    bands = []
    for kind in SHEET_ROWS:
        tiles = []
        for key in SHEET_SIZES:
            for im in sheet.get((kind, key), []):
                tiles += [im, np.full((im.shape[0], gap, 3), 255, np.uint8)]
        if not tiles:
            continue
        hmax = max(t.shape[0] for t in tiles)
        tiles = [np.pad(t, ((0, hmax - t.shape[0]), (0, 0), (0, 0)), constant_values=255) for t in tiles]
        bands.append(np.concatenate(tiles, axis=1))
    width = max(b.shape[1] for b in bands)
    out = []
    for b in bands:
        out += [np.pad(b, ((0, gap), (0, width - b.shape[1]), (0, 0)), constant_values=255)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(out, axis=0)).quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(
        path, optimize=True)


def model_record(family: str, args) -> str:
    """What the evaluated model is, read from the training record shipped beside its weights."""
    folder = Path(args.model_dir.get(family, MODELS[family]))
    rec_path = folder / "training.json"
    if not rec_path.exists():
        return f"`{folder}` (no training record)"
    rec = json.loads(rec_path.read_text())
    a, v = rec["args"], rec.get("vae_record", {})
    params = rec.get("params_unet") or rec.get("params_transformer")
    if family == "sd15":
        arch = (f"UNet2DConditionModel {params / 1e6:.2f}M params, channels {a['unet_channels']}, "
                f"{a['layers_per_block']} layer(s) per block, eps-prediction")
    else:
        arch = (f"FluxTransformer2DModel {params / 1e6:.2f}M params, {a['flux_double']} double + "
                f"{a['flux_single']} single blocks, {a['flux_heads']} heads x {a['flux_head_dim']}, flow matching")
    # A continued model (train_testbed.py --init-from) carries the records of the runs it continues.
    chain = [rec]
    while "init_record" in chain[-1]:
        chain.append(chain[-1]["init_record"])
    chain.reverse()
    secs = sum(r.get("train_seconds_training_run", r["train_seconds_this_run"]) for r in chain)
    steps = " + ".join(f"{r['steps_done']} (lr {r['args']['lr']:g})" for r in chain)
    va = v.get("args", {})
    if "recon_texture_object" in v:
        kept = (f"texture power kept through its round trip on {v['round_trip_pictures']} held-out drawn pictures: "
                f"objects {v['recon_texture_object']:.2f} (in phase {v['recon_texture_object_in_phase']:.2f}), "
                f"background {v['recon_texture_background']:.2f}")
    else:  # a v2 record: detail ratios of the whole-picture ring, on training pictures
        kept = (f"texture kept through its round trip: objects {v.get('recon_object_detail_ratio', float('nan')):.2f}, "
                f"background {v.get('recon_background_detail_ratio', float('nan')):.2f}")
    vae = (f"VAE channels {va.get('vae_channels')}, {va.get('latent_channels', 4)} latent channels, latent factor 4, "
           f"{v.get('steps_done')} steps, {kept}")
    return (f"`{folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder}`: {arch}; "
            f"{steps} steps of batch {a['batch_size']} on {a['n_data']} images, each run a fresh warm-up and "
            f"cosine decay, final loss {rec['final_loss']:.4f}, {secs:.0f} s training; {vae}.")


def run(args) -> dict:
    """Every (model, row) is one job; --jobs single-threaded processes take them from one queue, the
    DiT's (the costlier model) first, so neither core idles while the other still has a model's rows.
    Numbers do not depend on this: each image has its own generator and rows restore the pipeline."""
    t_all = time.time()
    jobs = [(f, i) for f in sorted(args.models, key=lambda f: f != "flux")
            for i in range(len(model_rows(f, args)))]
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(args.threads,)) as ex:
            parts = list(ex.map(run_row, *zip(*jobs), [args] * len(jobs)))
    else:
        parts = [run_row(f, i, args) for f, i in jobs]
    models = [score_model(f, [p for p in parts if p["model"] == f], args) for f in args.models]
    return {"models": models, "wall": time.time() - t_all, "argv": sys.argv[1:], "steps": args.steps,
            "guidance": args.guidance, "seed": seed_base(args), "seeds": args.seeds if args.seed is None else "custom",
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{args.jobs} process(es) x {args.threads} thread(s)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _mean_text(c: dict, key: str, fmt: str) -> str:
    """A cell's mean with its bootstrap interval where the run recorded one."""
    ci = c.get(f"{key}_ci")
    if not ci or not all(map(math.isfinite, ci)):
        return _f(c[key], fmt)
    return f"{_f(c[key], fmt)} [{ci[0]:{fmt}}-{ci[1]:{fmt}}]"


def _ci(lo_hi) -> str:
    return f"{lo_hi[0]:.2f}-{lo_hi[1]:.2f}"


def _f(x, fmt) -> str:
    return "—" if x is None or math.isnan(x) else format(x, fmt)


# What the testbed's models must show (testbed v3): (standing row kind, size, measure, test, bound).
MODEL_CHECKS = (
    ("plain", "1x", "one", ">=", 0.95),
    # the samples really draw the stripes (power against drawn pictures; v2's models read about 0.02)
    ("plain", "1x", "stripes", ">=", 0.5),
    ("plain", "1x", "colour", ">=", 0.97),
    ("plain", "1x", "hue_error", "<=", 5.0),
    ("plain", "1x", "halo", "<=", 0.02),  # drawn pictures and the VAE's round trips stay under these
    ("plain", "1x", "clipped", "<=", 0.002),
    ("plain", "16x", "one", "<=", 0.3),
    ("plain", "16x", "detail", ">=", 0.8),
    ("trivial", "16x", "one", ">=", 0.9),
    ("trivial", "16x", "detail", "<=", 0.3),
)


def standing_cell(m: dict, kind: str, size: str) -> dict | None:
    """Model `m`'s cell of the standing row of `kind` at `size` (None where it is missing or failed)."""
    return next((c for c in m["cells"] if c["kind"] == kind and c["size"] == size and "error" not in c
                 and c.get("group", "standing") == "standing"), None)


def meets(value: float, op: str, bound: float) -> bool:
    """`value op bound` for op ">=" or "<="; a nan value meets neither."""
    return value >= bound if op == ">=" else value <= bound


def model_checks(m: dict) -> list[str]:
    """Markdown rows: each check of MODEL_CHECKS against this run's standing cell of model `m`."""
    out = []
    for kind, size, key, op, bound in MODEL_CHECKS:
        cell = standing_cell(m, kind, size)
        if cell is None or key not in cell:  # a v2 run lacks the v3 measures
            continue
        value = cell[key]
        ok = meets(value, op, bound)
        out.append(f"| {m['model']} | {cell['row']} | {size} | {key} | {op} {bound:g} | {value:.2f} | {cell['n']} "
                   f"| {'yes' if ok else 'no'} |")
    return out


# The fidelity targets of the preset's rows (the automatic preset at the testbed's, the CLI's and the
# family's steps, and the sdxl preset's analogue), at 16x and 64x: (measure, test, bound), the bound a
# number, one per size, or (factor or offset on plain 1x at the row's settings, the testbed's where
# no plain 1x cell samples as the row does).
PRESET_TARGETS = (
    ("one", ">=", {"16x": 0.95, "64x": 0.90}),
    ("colour", ">=", 0.97),
    ("hue_error", "<=", ("+", 3.0)),
    ("halo", "<=", ("x", 1.5)),
    ("clipped", "<=", ("x", 2.0)),
    ("detail", ">=", 0.8),
    ("detail_bg", ">=", 0.8),
)
TARGET_SIZES = ("16x", "64x")


def is_preset_row(c: dict) -> bool:
    return c["kind"] == trows.PRESET or (c.get("group") == "defaults" and c["kind"] == trows.CONFIG)


def target_bound(key: str, target, size: str, plain_1x: dict) -> float:
    if isinstance(target, dict):
        return target[size]
    if isinstance(target, tuple):
        op, amount = target
        return plain_1x[key] + amount if op == "+" else plain_1x[key] * amount
    return target


def preset_targets(m: dict) -> list[tuple[dict, list[tuple[str, str, float, float, bool]]]]:
    """Each preset row's cell at TARGET_SIZES with (measure, test, value, bound, holds) per target."""
    plains = {tuple(c.get("settings", ())): c for c in m["cells"]
              if c["kind"] == trows.PLAIN and c["size"] == "1x" and "error" not in c}
    reference = standing_cell(m, trows.PLAIN, "1x")
    out = []
    for c in m["cells"]:
        if reference is None or not is_preset_row(c) or c["size"] not in TARGET_SIZES or "error" in c:
            continue
        plain_1x = plains.get(tuple(c.get("settings", ())), reference)
        checks = []
        for key, op, target in PRESET_TARGETS:
            if key not in c:
                continue
            value, bound = c[key], target_bound(key, target, c["size"], plain_1x)
            checks.append((key, op, value, bound, meets(value, op, bound)))
        out.append((c, checks))
    return out


def targets_text() -> str:
    """PRESET_TARGETS in words, for the table's legend."""
    def bound(target) -> str:
        if isinstance(target, dict):
            return " / ".join(f"{v:g} at {size}" for size, v in target.items())
        if isinstance(target, tuple):
            op, amount = target
            return f"plain 1x's + {amount:g}" if op == "+" else f"{amount:g}x plain 1x's"
        return f"{target:g}"
    return ", ".join(f"{key} {op} {bound(target)}" for key, op, target in PRESET_TARGETS)


TARGET_FORMATS = {"one": ".2f", "colour": ".2f", "hue_error": ".1f", "halo": ".3f", "clipped": ".5f",
                  "detail": ".2f", "detail_bg": ".2f"}


def target_rows(m: dict) -> list[str]:
    """Markdown rows: each preset row's value per target with its interval where the run has one, its
    bound in parentheses and a cross where it misses."""
    out = []
    for c, checks in preset_targets(m):
        texts = []
        for key, op, _, bound, holds in checks:
            f = TARGET_FORMATS[key]
            texts.append(f"{_mean_text(c, key, f)} {'' if holds else '✗ '}({op} {bound:{f}})")
        missed = ", ".join(k for k, _, _, _, ok in checks if not ok) or "none"
        out.append(f"| {m['model']} | {c['row']} | {c['size']} | {c['n']} | {' | '.join(texts)} | {missed} |")
    return out


def _n_text(n: dict) -> str:
    """Images per cell as the run recorded them: per size, or per row group and size (with the 1x
    reference's count at the top, as v2 runs recorded it, or inside each group)."""
    flat = lambda d: ", ".join(f"{k} {v}" for k, v in d.items())  # noqa: E731
    if not any(isinstance(v, dict) for v in n.values()):
        return f"n per size: {flat(n)}"
    groups = "; ".join(f"{g} rows {flat(v)}" for g, v in n.items() if isinstance(v, dict))
    head = f"1x reference {n['1x']}; " if "1x" in n else ""
    plain = "; plain counts for plain rows above 1x" if "plain" in n else ""
    return f"n: {head}{groups} (technique counts also for combinations{plain})"


def write_markdown(runs: list[dict], path: Path, notes: Path | None = None):
    lines = [
        "# Coherence testbed v3 results",
        "",
        *([notes.read_text().rstrip(), ""] if notes else []),
        ("Generated by `scripts/eval_coherence.py`; do not edit by hand. What the testbed asks: one coherent "
        "subject of the prompted colour *and* detail at the output's own pixel scale, beside the trivial "
        "baseline (base size + bicubic upscale), with no halo and no colour drift."),
        "",
        "## How it was measured",
        "",
        ("- Pictures (`scripts/testbed_common.py`): 64x64, one shape of the prompted colour whose interior "
        f"carries sinusoidal stripes of period {tc.OBJECT_PERIOD:g} px (along x+y), on a grey background "
        f"with a grain of period {tc.BACKGROUND_PERIOD:g} px (along x-y). A model that really draws at a larger "
        "size keeps these periods; an upscaled base image shows them k times too coarse."),
        ("- Metrics (`scripts/testbed_metrics.py`, the same code the tests check on drawn pictures): "
        "*one* = share of images with exactly one object of the prompted colour (8-connected, at least "
        "max(24 px, 0.05% of the image)); *colour* = share whose largest saturated object, whatever its hue, "
        "has the hue nearest the prompted colour among the testbed's four; *shape* = share whose largest "
        "object has the prompted shape (bounding-box fill ratio); *detail* / *bg detail* = RMS contrast of "
        "each region's own texture (the region minus its local mean, zero outside it, so the object's edge "
        "and the other region's texture stay out) in a log-Gabor ring at the training period, inside the "
        "objects / in the background, divided by the mean of 1x plain samples of the same model (for "
        "objects: of the same prompt, image by image; 1.0 = as detailed as native); *stripes* = the objects' "
        f"texture power divided by that of {DRAWN_N} held-out drawn pictures of the same prompt (1.0 = as "
        "striped as the training data; a model that draws no stripes reads ~0 here even where *detail* reads 1); "
        "*halo* = luminance overshoot just outside the largest object's edge beyond the background, as a share "
        "of the object/background contrast; *hue* = |hue error| in degrees and *sat* = |saturation error| of the "
        "largest saturated object against the prompted colour's trained hue and saturation (a green object for "
        "\"red\" reads ~130); *speckle* = share of saturated pixels outside counted objects; *clip* = share of "
        "pixels with a channel at 0 or 255; *border* = the largest shift, in levels, of the background's mean colour "
        "in a 4 px strip along an edge from the 8 px strip just inside it (a tinted band along an edge; v3 runs only); *time* = seconds per image over plain's at the same size and "
        "settings (the testbed's plain row where the table has no plain cell at those settings); *bicubic* = "
        "the trivial baseline's one / colour / detail / bg detail at the row's size and settings (at the "
        "testbed's steps and guidance where no baseline row samples as the row does)."),
        ("- Shares carry a 95% Wilson interval (in brackets), halo and clip a 95% percentile-bootstrap interval of "
        "the mean (runs from 2026-12-08 on); n = images per cell. Image i of a cell uses prompt "
        "i mod 12 (the 12 colour x shape captions) and seed base + 1000*(i mod 12) + i//12, the same in every "
        f"row; base {SEED_SETS['report']} is the reported set (`--seeds report`, the default), base "
        f"{SEED_SETS['tune']} the tuning set (`--seeds tune`)."),
        ("- Rows sample at the run's steps and guidance unless their name says otherwise: at the CLI's defaults "
        "(`hires generate`: 20 steps and no guidance argument, so SD's guidance_scale 7.5 and, on Flux, no true "
        "CFG) and at the family's default steps (SDXL's 50, as the sdxl preset's analogue on the UNet; Flux's 28)."),
        ("- The trivial baseline generates at the training area with the request's aspect (sides multiples "
        "of 16: 64x64 for square sizes, 48x96 for 2:1, 112x32 for 1:3), then bicubic-upscales."),
        "",
    ]
    for i, r in enumerate(runs):
        lines += [f"### Run {i + 1}: `python scripts/eval_coherence.py {shlex.join(r['argv'])}`", "",
                  (f"- {r['date']}, {r['machine']}; wall time {r['wall']:.0f} s; seed set {r.get('seeds', 'report')} "
                  f"(base {r['seed']}); {r['steps']} steps; "
                  f"sd15: DDIM, guidance_scale {r['guidance']['sd15']}; flux: flow-match Euler with Flux's "
                  f"size-dependent shift, true_cfg_scale {r['guidance']['flux']} (negative prompt \"\"), "
                  f"max_sequence_length {MAX_SEQUENCE_LENGTH}. Seconds on a CPU are indicative; "
                  "ratios are taken within the run.")]
        for m in r["models"]:
            lines.append(f"- {m['model']} ({m['seconds']:.0f} s of worker time): {m['record']} {_n_text(m['n'])}.")
        lines.append("")
    checks = [row for r in runs[:1] for m in r["models"] for row in model_checks(m)]
    if checks:
        lines += ["## What the models must show (run 1)", "",
                  "| model | row | size | measure | target | measured | n | holds |", "|---|---|---|---|---|---|---|---|",
                  *checks, ""]
    targets = [row for r in runs[:1] for m in r["models"] for row in target_rows(m)]
    if targets:
        lines += ["## The preset's fidelity targets (run 1)", "",
                  ("Each entry: the value, its 95% interval in brackets (Wilson for shares, a bootstrap of the mean "
                   f"for halo and clip), the bound in parentheses, a cross where it misses. Bounds: {targets_text()}; "
                   "plain 1x at the row's settings, the testbed's where no plain 1x cell samples as the row does."),
                  "",
                  "| model | row | size | n | one | colour | hue | halo | clip | detail | bg detail | missed |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|", *targets, ""]
    for i, r in enumerate(runs):
        for m in r["models"]:
            lines += [f"## {m['model']}" + (f" (run {i + 1})" if len(runs) > 1 else ""), "",
                      ("| row | size | n | one [95%] | colour [95%] | shape [95%] | count | detail | bg detail | stripes "
                      "| halo | hue | sat | speckle | clip | border | time | bicubic: one / colour / detail / bg |"),
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for c in m["cells"]:
                if "error" in c:
                    lines.append(f"| {c['row']} | {c['label']} | 0 | failed: {c['error'][:160]} |" + " |" * 14)
                    continue
                colour = f"{c['colour']:.2f} [{_ci(c['colour_ci'])}]" if "colour" in c else "—"  # v2 runs lack it
                lines.append(
                    f"| {c['row']} | {c['label']} | {c['n']} | {c['one']:.2f} [{_ci(c['one_ci'])}] | {colour} | "
                    f"{c['shape']:.2f} [{_ci(c['shape_ci'])}] | {c['count']:.2f} | {_f(c['detail'], '.2f')} | "
                    f"{_f(c['detail_bg'], '.2f')} | {_f(c.get('stripes'), '.2f')} | {_mean_text(c, 'halo', '.3f')} | "
                    f"{_f(c['hue_error'], '.1f')} | "
                    f"{_f(c['sat_error'], '.3f')} | {c['speckle']:.4f} | {_mean_text(c, 'clipped', '.4f')} | {_f(c.get('border'), '.1f')} | "
                    f"{c['time_ratio']:.2f} | {_baseline_text(c)} |")
            if i:  # contact sheets are written by the first run only
                lines.append("")
                continue
            lines += ["", f"![contact sheet {m['model']}](testbed_sheet_{m['model']}.png)", "",
                      (f"`testbed_sheet_{m['model']}.png`: rows plain diffusers / trivial baseline / automatic preset; "
                      "the first images of the 16x cell, then of the 64x cell (same prompts and seeds in each row), "
                      "at native pixels."), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--model-dir", nargs=2, action="append", metavar=("FAMILY", "PATH"), default=[],
                   help="evaluate another folder for a family, e.g. --model-dir sd15 /tmp/x")
    p.add_argument("--n", type=int, help="images per cell at every size above 1x (default: per row group and size)")
    p.add_argument("--n-1x", type=int, help="images in the 1x reference cell")
    p.add_argument("--sizes", nargs="+", default=[k for k, *_ in SIZES[1:]], choices=[k for k, *_ in SIZES[1:]])
    p.add_argument("--only-rows", nargs="+", metavar="ROW", help="evaluate only these rows (plain always runs)")
    p.add_argument("--seeds", choices=sorted(SEED_SETS), default="report",
                   help="seed set: report (the default; what docs/testbed.md shows) or tune (disjoint, for choosing settings)")
    p.add_argument("--seed", type=int, help="a custom base seed instead of --seeds")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--guidance-sd15", type=float, default=5.0)
    p.add_argument("--guidance-flux", type=float, default=4.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker process")
    p.add_argument("--jobs", type=int, default=2, help="worker processes taking (model, row) jobs from one queue")
    p.add_argument("--md", type=Path, default=REPO / "docs" / "testbed.md")
    p.add_argument("--sheet-dir", type=Path, help="contact sheets; default: beside --md (so a run that does not "
                   "write docs/testbed.md does not overwrite its sheets either)")
    p.add_argument("--sheet-n", type=int, default=2, help="images per size in the contact sheets")
    p.add_argument("--json", type=Path, help="also write the numbers as JSON here")
    p.add_argument("--from-json", type=Path, nargs="+", help="write --md from saved runs, generating nothing")
    p.add_argument("--notes", type=Path, help="hand-written findings (Markdown) placed under the title")
    args = p.parse_args(argv)
    args.model_dir = dict(args.model_dir)
    args.sheet_dir = args.sheet_dir or args.md.parent
    args.guidance = {"sd15": args.guidance_sd15, "flux": args.guidance_flux}
    return args


def main(argv=None):
    args = parse(argv)
    if args.from_json:
        write_markdown([json.loads(f.read_text()) for f in args.from_json], args.md, args.notes)
        print(f"wrote {args.md} from {len(args.from_json)} run(s)")
        return
    torch.set_num_threads(args.threads)
    res = run(args)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    write_markdown([res], args.md, args.notes)
    print(f"wrote {args.md} in {res['wall']:.0f} s")


if __name__ == "__main__":
    main()
