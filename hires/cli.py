"""The `hires` command line.

    hires generate --prompt TEXT --size WxH --out FILE.png [--model PATH_OR_ID] [...]
    hires batch PROMPTS.(txt|jsonl|csv) --out DIR [...]
    accelerate launch -m hires batch ...   # shards the items over processes / GPUs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from .io import write_png_atomically

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "testbed_sd15"  # trained by scripts/train_testbed.py; base 64 px


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# -- options -> values ---------------------------------------------------------------------------
def parse_size(text: str, option: str = "--size") -> tuple[int, int]:
    """'1024x768' -> (height 768, width 1024): sizes are written width x height, like image editors."""
    parts = str(text).lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise CliError(f"{option} {text!r} must look like WIDTHxHEIGHT in pixels, e.g. {option} 128x128")
    width, height = (int(p) for p in parts)
    return height, width


def config_from_options(options: argparse.Namespace, info):
    """The HiresConfig of a command: the --config file, else the --preset, then --enable / --disable."""
    import hires

    from .presets import automatic_config

    if options.config:
        try:
            values = json.loads(Path(options.config).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise CliError(f"--config {options.config!r} cannot be read: {err}") from None
        except json.JSONDecodeError as err:
            raise CliError(f"--config {options.config!r} is not valid JSON: {err.msg} at line {err.lineno}") from None
        try:
            config = hires.HiresConfig.from_dict(values)
        except (TypeError, ValueError) as err:
            raise CliError(f"--config {options.config!r}: {err}") from None
    else:
        config = automatic_config(info) if options.preset == "auto" else hires.HiresConfig()

    techniques = [f.name for f in dataclasses.fields(config)]
    both = sorted(set(options.enable) & set(options.disable))
    if both:
        raise CliError(f"--enable and --disable both name {', '.join(both)}; choose one")
    changes = {}
    for name, on in [(n, True) for n in options.enable] + [(n, False) for n in options.disable]:
        if name not in techniques:
            from .config import closest_names

            raise CliError(f"--{'enable' if on else 'disable'} {name!r} is not a technique; techniques are "
                           f"{', '.join(techniques)} (closest: {closest_names(name, techniques)})")
        changes[name] = dataclasses.replace(getattr(config, name), enabled=on)
    config = config.replace(**changes)
    try:
        config.validate_for(info)
    except (TypeError, ValueError) as err:
        raise CliError(f"--model {options.model!r}: {err}") from None
    return config


DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_pipeline(model: str, dtype=None):
    from diffusers import DiffusionPipeline

    options = {} if dtype is None else {"torch_dtype": dtype}
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise CliError(f"--model {model!r} is a path but holds no diffusers pipeline (no model_index.json)")
        return DiffusionPipeline.from_pretrained(str(path), **options)
    try:
        return DiffusionPipeline.from_pretrained(model, **options)
    except Exception as err:  # the hub raises many error types; the user needs one message
        raise CliError(
            f"--model {model!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}); offline, pass the path of a saved diffusers pipeline"
        ) from err


def load_pipeline_skeleton(model: str):
    """The pipeline with its models on the meta device: configs, tokenizers and scheduler, no weights."""
    import importlib

    import diffusers
    import torch
    import transformers
    from accelerate import init_empty_weights

    path = Path(model).expanduser()
    if not (path / "model_index.json").is_file():
        raise CliError(f"--dry-run reads configs only from a local pipeline folder; --model {model!r} is not one "
                       "(no model_index.json)")
    index = json.loads((path / "model_index.json").read_text())
    components: dict[str, Any] = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(value, list):  # plain __init__ arguments such as requires_safety_checker
            components[name] = value
            continue
        library, class_name = value
        if library is None or class_name is None:
            components[name] = None
            continue
        component_cls = getattr(importlib.import_module(library), class_name)
        folder = path / name
        if issubclass(component_cls, torch.nn.Module):
            with init_empty_weights():
                if library == "diffusers":
                    components[name] = component_cls.from_config(component_cls.load_config(folder))
                else:
                    components[name] = component_cls(transformers.AutoConfig.from_pretrained(folder))
        else:
            components[name] = component_cls.from_pretrained(folder)
    return getattr(diffusers, index["_class_name"])(**components)


def print_plan(options: argparse.Namespace, height: int, width: int, device: str,
               image_size: tuple[int, int] | None) -> int:
    """--dry-run: the stages, steps and memory estimate of a request, without loading weights."""
    import hires

    from .memory_planner import MemoryBudgetError, format_bytes, plan

    model, steps, guidance, dtype_name = options.model, options.steps, options.guidance, options.dtype
    pipe = load_pipeline_skeleton(model)
    try:
        info = hires.model_info(pipe)
    except (TypeError, ValueError) as err:
        raise CliError(f"--model {model!r}: {err}") from None
    config = config_from_options(options, info)
    from .config import validate_size

    for side, value in (("height", height), ("width", width)):
        try:
            validate_size(side, value, info.size_multiple, info.name)
        except ValueError as err:
            raise CliError(f"--size: {err}") from None
    dtype = resolve_dtype(dtype_name, device)
    denoiser = getattr(pipe, info.family.denoiser_attr)
    print(f"model: {model} ({type(pipe).__name__}, family {info.name}, base {info.base_width}x{info.base_height}, "
          f"{info.prediction_type} prediction)")
    print(f"request: {width}x{height}, {steps} steps, dtype {str(dtype).removeprefix('torch.')}, device {device}")
    print(f"techniques: {', '.join(config.enabled_techniques()) or 'none'}")
    if config.structure_guidance.enabled:
        from .sampling import progressive

        sizes = progressive.stage_sizes(info, config.structure_guidance, height, width, start=image_size)
        renoise = progressive.per_stage(config.structure_guidance, "renoise", len(sizes) - 1)
        from .sampling import schedules

        stages = [(sizes[0], None if image_size else steps)] + [
            (size, schedules.stage_steps(steps, r if r is not None else progressive.DEFAULT_RENOISE))
            for size, r in zip(sizes[1:], renoise)]
    else:
        stages = [((height, width), steps)]
    cfg = guidance is None or guidance > 1
    budget = config.memory.max_memory
    status = 0
    for number, ((h, w), stage_steps) in enumerate(stages):
        label = "input image" if stage_steps is None else f"{stage_steps} steps"
        try:
            estimate = plan(denoiser, pipe.vae, height=h, width=w, latent_factor=info.latent_factor, dtype=dtype,
                            cfg=cfg, budget=budget, name=info.name, device_type=device.split(":")[0]).summary()
        except MemoryBudgetError as err:
            estimate, status = f"DOES NOT FIT: {err}", 2
        except ValueError as err:  # e.g. no budget given and no such device to measure
            raise CliError(f"--dry-run on --device {device}: {err}") from None
        print(f"stage {number}: {w}x{h}, {label}; memory {estimate}")
    if budget is None:
        print(f"(budget: free memory of this machine's {'GPU' if device.startswith('cuda') else 'RAM'}; "
              f"set HiresConfig.memory.max_memory to plan for another device, e.g. {format_bytes(80 * 2**30)})")
    return status


@dataclasses.dataclass
class Job:
    """One image to render: everything that determines it."""

    prompt: str
    negative: str | None
    height: int
    width: int
    steps: int
    guidance: float | None
    seed: int

    def parameters_text(self, model: str, family: str) -> str:
        """The A1111-style 'parameters' text chunk."""
        fields = [f"Steps: {self.steps}", f"Seed: {self.seed}", f"Size: {self.width}x{self.height}",
                  f"Model: {model}", f"Family: {family}"]
        if self.guidance is not None:
            fields.insert(1, f"CFG scale: {self.guidance}")
        return f"{self.prompt}\nNegative prompt: {self.negative or ''}\n" + ", ".join(fields)


class Renderer:
    """A loaded pipeline with hires applied, rendering jobs to PNG files."""

    def __init__(self, options: argparse.Namespace, device: str | None = None):
        import torch

        import hires

        self.model = options.model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = None if options.dtype == "auto" and self.device == "cpu" else resolve_dtype(options.dtype, self.device)
        self.pipe = load_pipeline(self.model, dtype)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=options.quiet, leave=False)
        try:
            self.info = hires.model_info(self.pipe)
        except TypeError as err:
            raise CliError(f"--model {self.model!r}: {err}") from None
        self.config = config_from_options(options, self.info)
        hires.apply(self.pipe, self.config)

    def size(self, size_text: str | None, scale: float | None, option: str = "--size") -> tuple[int, int]:
        from .config import validate_size

        if size_text is not None and scale is not None:
            raise CliError(f"{option} {size_text} and --scale {scale} conflict; give one")
        if scale is not None:
            if not scale > 0:
                raise CliError(f"--scale {scale} must be > 0 (a factor of the model's base side)")
            unit = self.info.size_multiple
            height = max(unit, round(self.info.base_height * scale / unit) * unit)
            width = max(unit, round(self.info.base_width * scale / unit) * unit)
        elif size_text is not None:
            height, width = parse_size(size_text, option)
        else:
            height, width = self.info.base_height, self.info.base_width
        try:
            validate_size("height", height, self.info.size_multiple, self.info.name)
            validate_size("width", width, self.info.size_multiple, self.info.name)
        except (TypeError, ValueError) as err:
            raise CliError(f"{option} {size_text or ''}: {err}".replace(" : ", ": ")) from None
        return height, width

    def render(self, job: Job, out: Path, extra: dict[str, Any] | None = None, image=None) -> None:
        import torch

        from .batch import PNG_JSON_KEY

        call: dict[str, Any] = dict(prompt=job.prompt, height=job.height, width=job.width,
                                    num_inference_steps=job.steps,
                                    generator=torch.Generator("cpu").manual_seed(job.seed))
        if job.negative is not None:
            call["negative_prompt"] = job.negative
        if job.guidance is not None:
            call["guidance_scale"] = job.guidance
        if image is not None:
            from .sampling import progressive

            result = progressive.generate(self.pipe, image=image, **call)
        else:
            result = self.pipe(**call)
        image = result.images[0]
        record = {**dataclasses.asdict(job), "model": self.model, "family": self.info.name,
                  "hires": {name: dataclasses.asdict(getattr(self.config, name))
                            for name in self.config.enabled_techniques()}, **(extra or {})}
        write_png_atomically(image, out, {"parameters": job.parameters_text(self.model, self.info.name),
                                          PNG_JSON_KEY: json.dumps(record)})


def read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise CliError(f"--image {path!r} cannot be read as an image: {err}") from None


def check_output_dir(path: Path, option: str) -> None:
    import os

    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"{option} {str(path)!r} cannot be created: {err.strerror}; choose a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CliError(f"{option} {str(path)!r} is not writable; choose a writable folder")


# -- commands ------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CliError(f"--out {args.out!r} must end in .png")
    if args.steps <= 0:
        raise CliError(f"--steps {args.steps} must be a positive number of denoising steps")
    image = None
    if args.image is not None:
        if "structure_guidance" in args.disable:
            raise CliError("--image upscales with structure guidance; it conflicts with --disable structure_guidance")
        image = read_image(args.image)
        args.enable = [*args.enable, "structure_guidance"]
    if args.dry_run:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.scale is not None or args.size is None:
            raise CliError("--dry-run needs --size WIDTHxHEIGHT (it reads no weights to resolve --scale)")
        height, width = parse_size(args.size)
        return print_plan(args, height, width, device, None if image is None else (image.height, image.width))
    check_output_dir(out.parent, "--out")
    renderer = Renderer(args)
    height, width = renderer.size(args.size, args.scale)
    job = Job(args.prompt, args.negative, height, width, args.steps, args.guidance, args.seed)
    renderer.render(job, out, image=image)
    if not args.quiet:
        print(f"wrote {out} ({width}x{height}, {renderer.info.name}, seed {args.seed})")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm.auto import tqdm

    from . import batch

    if args.steps <= 0:
        raise CliError(f"--steps {args.steps} must be a positive number of denoising steps")
    try:
        items = batch.read_prompt_file(args.file)
    except batch.PromptFileError as err:
        raise CliError(str(err)) from None
    out_dir = Path(args.out)
    check_output_dir(out_dir, "--out")

    # Without cpu=True accelerate never forms a multi-process CPU group (gloo).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    device = args.device or (str(state.device) if state.num_processes > 1 or state.device.type != "cpu" else None)
    if state.is_main_process:
        batch.remove_stale_temporaries(out_dir)
    renderer = Renderer(args, device)
    # Every process splits the whole list the same way, then skips what is already done.
    with state.split_between_processes(items) as mine:
        todo = [item for item in mine if not batch.is_finished(out_dir, item)]
        jobs = []
        for item in todo:  # validate every item before rendering any
            size = item.overrides.get("size")
            height, width = renderer.size(size if size is not None else args.size, None if size else args.scale,
                                          option=f"{args.file}:{item.line}: size" if size else "--size")
            jobs.append((item, Job(item.prompt, item.overrides.get("negative", args.negative), height, width,
                                   item.overrides.get("steps", args.steps),
                                   item.overrides.get("guidance", args.guidance),
                                   item.overrides.get("seed", args.seed + item.index))))
        progress = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"batch [{state.process_index}]",
                        disable=args.quiet, position=state.process_index)
        for item, job in jobs:
            renderer.render(job, out_dir / item.filename,
                            {"index": item.index, "line": item.line, "process": state.process_index})
            progress.update()
        progress.close()
    state.wait_for_everyone()
    if state.is_main_process:
        manifest = batch.write_manifest(out_dir, items, str(args.file))
        if not args.quiet:
            print(f"{manifest['done']}/{manifest['total']} items done in {out_dir}")
    return 0


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="a saved diffusers pipeline folder or a hub id (default: the embedded model)")
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT in pixels (default: the model's base size)")
    parser.add_argument("--scale", type=float, default=None, help="size as a factor of the model's base side")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="auto", choices=("auto", "none"),
                        help="auto: the family's automatic preset (hires.presets); none: every technique off")
    parser.add_argument("--config", default=None, help="a JSON file of HiresConfig options (replaces --preset)")
    parser.add_argument("--enable", action="append", default=[], metavar="TECHNIQUE",
                        help="switch a technique on (a HiresConfig field, e.g. entropy_scaling); repeatable")
    parser.add_argument("--disable", action="append", default=[], metavar="TECHNIQUE", help="switch a technique off")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights and compute dtype (auto: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hires", description="Training-free high-resolution generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="render one prompt to a PNG")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, help="output .png path")
    gen.add_argument("--image", default=None, help="upscale this picture (structure guidance from it) instead of "
                                                   "generating the base image")
    gen.add_argument("--dry-run", action="store_true",
                     help="print the plan (stages, steps, memory estimate) from the model's configs, load no weights")
    _common_options(gen)
    gen.set_defaults(run=cmd_generate)

    bat = sub.add_parser("batch", help="render every prompt of a .txt / .jsonl / .csv file; a rerun resumes")
    bat.add_argument("file", help="prompt file: .txt (a prompt a line), .jsonl or .csv (prompt + overrides)")
    bat.add_argument("--out", required=True, help="output folder (PNGs and manifest.json)")
    _common_options(bat)
    bat.set_defaults(run=cmd_batch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as err:
        print(f"hires {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
