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
DEFAULT_MODEL = ASSETS / "random_sd15"


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


def config_from_options(config_file: str | None, enable: list[str], disable: list[str]):
    """A HiresConfig from an optional JSON file, then --enable / --disable switches."""
    import hires

    values: dict[str, Any] = {}
    if config_file:
        try:
            values = json.loads(Path(config_file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise CliError(f"--config {config_file!r} cannot be read: {err}") from None
        except json.JSONDecodeError as err:
            raise CliError(f"--config {config_file!r} is not valid JSON: {err.msg} at line {err.lineno}") from None
    try:
        config = hires.HiresConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise CliError(f"--config {config_file!r}: {err}") from None

    techniques = [f.name for f in dataclasses.fields(config)]
    both = sorted(set(enable) & set(disable))
    if both:
        raise CliError(f"--enable and --disable both name {', '.join(both)}; choose one")
    changes = {}
    for name, on in [(n, True) for n in enable] + [(n, False) for n in disable]:
        if name not in techniques:
            from .config import closest_names

            raise CliError(f"--{'enable' if on else 'disable'} {name!r} is not a technique; techniques are "
                           f"{', '.join(techniques)} (closest: {closest_names(name, techniques)})")
        changes[name] = dataclasses.replace(getattr(config, name), enabled=on)
    return config.replace(**changes)


def load_pipeline(model: str):
    from diffusers import DiffusionPipeline

    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise CliError(f"--model {model!r} is a path but holds no diffusers pipeline (no model_index.json)")
        return DiffusionPipeline.from_pretrained(str(path))
    try:
        return DiffusionPipeline.from_pretrained(model)
    except Exception as err:  # the hub raises many error types; the user needs one message
        raise CliError(
            f"--model {model!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}); offline, pass the path of a saved diffusers pipeline"
        ) from err


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

    def __init__(self, model: str, config, device: str | None = None, quiet: bool = False):
        import torch

        import hires

        self.model = model
        self.config = config
        self.pipe = load_pipeline(model)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=quiet, leave=False)
        try:
            hires.apply(self.pipe, config)
        except (TypeError, ValueError) as err:
            raise CliError(f"--model {model!r}: {err}") from None
        self.info = hires.model_info(self.pipe)

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

    def render(self, job: Job, out: Path, extra: dict[str, Any] | None = None) -> None:
        import torch

        from .batch import PNG_JSON_KEY

        call: dict[str, Any] = dict(prompt=job.prompt, height=job.height, width=job.width,
                                    num_inference_steps=job.steps,
                                    generator=torch.Generator("cpu").manual_seed(job.seed))
        if job.negative is not None:
            call["negative_prompt"] = job.negative
        if job.guidance is not None:
            call["guidance_scale"] = job.guidance
        image = self.pipe(**call).images[0]
        record = {**dataclasses.asdict(job), "model": self.model, "family": self.info.name,
                  "hires": {name: dataclasses.asdict(getattr(self.config, name))
                            for name in self.config.enabled_techniques()}, **(extra or {})}
        write_png_atomically(image, out, {"parameters": job.parameters_text(self.model, self.info.name),
                                          PNG_JSON_KEY: json.dumps(record)})


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
    check_output_dir(out.parent, "--out")
    config = config_from_options(args.config, args.enable, args.disable)
    renderer = Renderer(args.model, config, args.device, args.quiet)
    height, width = renderer.size(args.size, args.scale)
    job = Job(args.prompt, args.negative, height, width, args.steps, args.guidance, args.seed)
    renderer.render(job, out)
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
    config = config_from_options(args.config, args.enable, args.disable)

    # Without cpu=True accelerate never forms a multi-process CPU group (gloo).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    device = args.device or (str(state.device) if state.num_processes > 1 or state.device.type != "cpu" else None)
    if state.is_main_process:
        batch.remove_stale_temporaries(out_dir)
    renderer = Renderer(args.model, config, device, args.quiet)
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
    parser.add_argument("--config", default=None, help="a JSON file of HiresConfig options")
    parser.add_argument("--enable", action="append", default=[], metavar="TECHNIQUE",
                        help="switch a technique on (a HiresConfig field, e.g. entropy_scaling); repeatable")
    parser.add_argument("--disable", action="append", default=[], metavar="TECHNIQUE", help="switch a technique off")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hires", description="Training-free high-resolution generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="render one prompt to a PNG")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, help="output .png path")
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
