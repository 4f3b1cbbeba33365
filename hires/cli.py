"""The `hires` command line: `hires generate` renders one prompt to a PNG."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "random_sd15"


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (height 768, width 1024): sizes are written width x height, like image editors."""
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise CliError(f"--size {text!r} must look like WIDTHxHEIGHT in pixels, e.g. --size 128x128")
    width, height = (int(p) for p in parts)
    return height, width


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


def write_png_atomically(image, out: Path, text: dict[str, str] | None = None) -> None:
    """Write to a temporary file in the same folder, then rename: no truncated file under `out`."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import hires

    height, width = parse_size(args.size)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise CliError(f"--out {args.out!r} must end in .png")
    if args.steps <= 0:
        raise CliError(f"--steps {args.steps} must be a positive number of denoising steps")

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=args.quiet)
    hires.apply(pipe, hires.HiresConfig())
    info = hires.model_info(pipe)
    try:
        from .config import validate_size

        validate_size("height", height, info.size_multiple, info.name)
        validate_size("width", width, info.size_multiple, info.name)
    except (TypeError, ValueError) as err:
        raise CliError(f"--size {args.size}: {err}") from err

    call = dict(prompt=args.prompt, height=height, width=width, num_inference_steps=args.steps,
                generator=torch.Generator("cpu").manual_seed(args.seed))
    if args.negative is not None:
        call["negative_prompt"] = args.negative
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    image = pipe(**call).images[0]

    parameters = (
        f"{args.prompt}\nNegative prompt: {args.negative or ''}\n"
        f"Steps: {args.steps}, Seed: {args.seed}, Size: {width}x{height}, Model: {args.model}, "
        f"Family: {info.name}" + (f", CFG scale: {args.guidance}" if args.guidance is not None else "")
    )
    write_png_atomically(image, out, {"parameters": parameters})
    if not args.quiet:
        print(f"wrote {out} ({width}x{height}, {info.name}, seed {args.seed})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hires", description="Training-free high-resolution generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="render one prompt to a PNG")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--size", required=True, help="WIDTHxHEIGHT in pixels, e.g. 128x128")
    gen.add_argument("--model", default=str(DEFAULT_MODEL),
                     help="a saved diffusers pipeline folder or a hub id (default: the embedded model)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    gen.add_argument("--out", required=True, help="output .png path")
    gen.add_argument("--quiet", action="store_true")
    gen.set_defaults(run=cmd_generate)
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
