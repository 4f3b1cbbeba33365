"""The `hires` command line.

    hires generate --prompt TEXT --size WxH --out FILE.png [--model PATH_OR_ID] [...]
    hires batch PROMPTS.(txt|jsonl|csv) --out DIR [...]
    hires techniques                       # every technique, its families and options
    accelerate launch -m hires batch ...   # shards the items over processes / GPUs

Order of work: every option and prompt-file value is checked first, then the model's configs are
read (no weights) to check sizes and the HiresConfig, then the output location; only then are
weights loaded. torch and diffusers are imported inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from . import batch
from .batch import check_guidance, check_scale, check_seed, check_steps, parse_size

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "testbed_sd15"  # trained by scripts/train_testbed.py; base 64 px
DTYPES = ("auto", "float32", "float16", "bfloat16")
# The decoded image exists at least twice on the host, tiled VAE or not: float32 RGB from the VAE
# and its 8-bit copy for the PNG.
HOST_BYTES_PER_PIXEL = 3 * 4 + 3


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C: printed as one line (what was kept), exit status 130."""


# -- option values ------------------------------------------------------------------------------
def _number_from_text(text: Any, kind: type) -> Any:
    """An option's text as an int / float where it is one; anything else stays text for the check to name."""
    if not isinstance(text, str):
        return text
    try:
        return kind(text)
    except ValueError:
        return text


def _check(check, value, option: str):
    try:
        return check(value, option)
    except ValueError as err:
        raise CliError(str(err)) from None


@dataclasses.dataclass
class Request:
    """The scalar options of a command, checked; nothing loaded yet."""

    steps: int
    seed: int
    guidance: float | None
    scale: float | None
    size: tuple[int, int] | None  # (height, width)
    base_size: tuple[int, int] | None
    true_cfg: float | None = None  # Flux-style true classifier-free guidance (a second, negative pass)


def read_request(options: argparse.Namespace) -> Request:
    steps = _check(check_steps, _number_from_text(options.steps, int), "--steps")
    seed = _check(check_seed, _number_from_text(options.seed, int), "--seed")
    guidance = None if options.guidance is None else _check(
        check_guidance, _number_from_text(options.guidance, float), "--guidance")
    scale = None if options.scale is None else _check(check_scale, _number_from_text(options.scale, float), "--scale")
    size = None if options.size is None else _check(parse_size, options.size, "--size")
    if size is not None and scale is not None:
        raise CliError(f"--size {options.size} and --scale {options.scale} conflict; give one")
    base = None
    if options.base_size is not None:
        text = options.base_size if "x" in options.base_size.lower() else f"{options.base_size}x{options.base_size}"
        base = _check(parse_size, text, "--base-size")
        if not base_size_supported():
            raise CliError(f"--base-size {options.base_size}: this version of hires has no HiresConfig.base_size, so "
                           "the runtime cannot use a base size other than the one it reads from the model; "
                           "update hires, or leave --base-size out")
    true_cfg = None if options.true_cfg is None else _check(
        check_guidance, _number_from_text(options.true_cfg, float), "--true-cfg")
    return Request(steps, seed, guidance, scale, size, base, true_cfg)


def base_size_supported() -> bool:
    from .config import HiresConfig

    return "base_size" in {f.name for f in dataclasses.fields(HiresConfig)}


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def check_size_bound(height: int, width: int, where: str) -> None:
    """Refuse at once, by arithmetic, a size whose decoded image alone cannot fit in this machine's RAM."""
    ram = host_memory_bytes()
    need = height * width * HOST_BYTES_PER_PIXEL
    if ram is not None and need > ram:
        side = int(math.sqrt(ram / HOST_BYTES_PER_PIXEL))
        raise CliError(f"{where} {width}x{height}: the decoded image alone needs {_format_bytes(need)} of host memory "
                       f"({width}x{height} pixels x {HOST_BYTES_PER_PIXEL} bytes: float32 RGB and its 8-bit copy) and "
                       f"this machine has {_format_bytes(ram)}; use at most about {side}x{side} pixels (or that area)")


# -- output locations ---------------------------------------------------------------------------
def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_creatable_folder(path: Path, option: str) -> None:
    """`path` is a writable folder or can be made one; nothing is created."""
    if path.exists():
        if not path.is_dir():
            raise CliError(f"{option} {str(path)!r} exists and is not a folder; choose a folder")
        anchor = path
    else:
        anchor = _nearest_existing(path)
        if not anchor.is_dir():
            raise CliError(f"{option} {str(path)!r} cannot be created: {str(anchor)!r} is a file, not a folder; "
                           "choose a writable folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        what = "is not writable" if anchor == path else f"cannot be created: {str(anchor)!r} is not writable"
        raise CliError(f"{option} {str(path)!r} {what}; choose a writable folder")


def check_output_file(path: Path, option: str = "--out") -> None:
    if path.suffix.lower() != ".png":
        raise CliError(f"{option} {str(path)!r} must end in .png, e.g. {option} image.png")
    if path.is_dir():
        raise CliError(f"{option} {str(path)!r} is a folder; give a file name, e.g. {option} {path / 'image.png'}")
    if path.exists() and not os.access(path, os.W_OK) and not os.access(path.parent, os.W_OK):
        raise CliError(f"{option} {str(path)!r} exists and cannot be replaced; choose another file")
    check_creatable_folder(path.parent, f"{option} {str(path)!r}: its folder")


# -- devices ------------------------------------------------------------------------------------
def available_devices() -> list[str]:
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += ["xpu"] + [f"xpu:{i}" for i in range(xpu.device_count())]
    return found


def resolve_device(name: str | None) -> str:
    """The device to render on: `name` checked against what this machine has (default: cuda, else cpu)."""
    import torch

    works = available_devices()
    if name is None:
        return "cuda" if "cuda" in works else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {name!r} is not a torch device; available here: {', '.join(works)}") from None
    text = str(device)
    if text not in works and device.type not in works:
        raise CliError(f"--device {name!r} is not available on this machine; available here: {', '.join(works)}")
    if device.index is not None and text not in works:
        raise CliError(f"--device {name!r}: no such {device.type} device index; available here: {', '.join(works)}")
    return text


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


# -- the HiresConfig ------------------------------------------------------------------------------
def technique_names() -> list[str]:
    """Every technique of the catalogue, built-in and registered (hires.techniques)."""
    from .techniques import all_techniques

    return [record.name for record in all_techniques()]


def _check_json_types(cls: type, values: Any, where: str) -> None:
    """Values of a --config file against the annotations of the config dataclasses: a bool only as a JSON
    boolean ("no" is not false), a number never as one. Ranges are HiresConfig's to check."""
    if not isinstance(values, dict):
        return
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        field = fields.get(key)
        nested = _technique_config_class(key) if cls.__name__ == "HiresConfig" else None
        if field is None and nested is None:
            continue  # HiresConfig.from_dict names unknown keys with the valid ones
        kind = str(field.type).replace(" ", "") if field is not None else ""
        nested = nested or next((c for c in _subconfig_classes() if c.__name__ == kind), None)
        if nested is not None:
            _check_json_types(nested, value, f"{where}.{key}")
            continue
        allowed = set(kind.split("|"))
        if value is None and "None" in allowed:
            continue
        if allowed <= {"bool", "None"} and not isinstance(value, bool):
            raise CliError(f"{where}.{key}={json.dumps(value)} must be a JSON boolean (true or false)")
        numeric = allowed & {"int", "float"} and not allowed & {"bool", "Any", "str"}
        if numeric and isinstance(value, bool):
            raise CliError(f"{where}.{key}={json.dumps(value)} must be a number, not a JSON boolean")


def _subconfig_classes() -> list[type]:
    from .techniques import all_techniques

    return [record.config_type for record in all_techniques()]


def _technique_config_class(name: str) -> type | None:
    """The config class of the technique `name` (a --config key), built-in or registered."""
    from .techniques import all_techniques

    return next((record.config_type for record in all_techniques() if record.name == name), None)


def read_config_file(path: str | None) -> dict[str, Any] | None:
    """The --config file's values, type-checked against the config dataclasses (nothing loaded)."""
    if path is None:
        return None
    from .config import HiresConfig

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"--config {path!r} cannot be read: {err}") from None
    try:
        values = json.loads(text, parse_constant=batch._raise_constant)
    except json.JSONDecodeError as err:
        raise CliError(f"--config {path!r} is not valid JSON: {err.msg} at line {err.lineno}") from None
    except ValueError as err:
        raise CliError(f"--config {path!r}: {err}") from None
    if not isinstance(values, dict):
        raise CliError(f"--config {path!r} must hold a JSON object of HiresConfig options, got {type(values).__name__}")
    _check_json_types(HiresConfig, values, f"--config {path!r}: HiresConfig")
    try:
        HiresConfig.from_dict(values)  # every error it knows, before any model is read
    except (TypeError, ValueError) as err:
        raise CliError(f"--config {path!r}: {err}") from None
    return values


def build_config(options: argparse.Namespace, values: dict[str, Any] | None, info, base_size):
    """The HiresConfig of a command: the --config file, else the --preset, then --enable / --disable."""
    from .config import HiresConfig, closest_names
    from .presets import automatic_config

    if values is not None:
        config = HiresConfig.from_dict(values)
    else:
        config = automatic_config(info) if options.preset == "auto" else HiresConfig()
    techniques = technique_names()
    both = sorted(set(options.enable) & set(options.disable))
    if both:
        raise CliError(f"--enable and --disable both name {', '.join(both)}; choose one")
    changes: dict[str, Any] = {}
    for name, on in [(n, True) for n in options.enable] + [(n, False) for n in options.disable]:
        if name not in techniques:
            raise CliError(f"--{'enable' if on else 'disable'} {name!r} is not a technique; techniques are "
                           f"{', '.join(techniques)} (closest: {closest_names(name, techniques)})")
        changes[name] = dataclasses.replace(config.technique(name), enabled=on)
    if base_size is not None:
        changes["base_size"] = base_size[0] if base_size[0] == base_size[1] else base_size
    try:
        config = config.replace(**changes)
        config.validate_for(info)
    except (TypeError, ValueError) as err:
        raise CliError(f"--model {options.model!r}: {err}") from None
    return config


def with_base_size(info, config):
    """`info` with the base size the config sets (HiresConfig.base_size, where this hires has it)."""
    value = getattr(config, "base_size", None)
    if value is None:
        return info
    height, width = (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
    return dataclasses.replace(info, base_height=height, base_width=width)


# -- the model ----------------------------------------------------------------------------------
def local_model(model: str) -> Path | None:
    path = Path(model).expanduser()
    if not path.exists():
        return None
    if not (path / "model_index.json").is_file():
        raise CliError(f"--model {model!r} is a path but holds no diffusers pipeline (no model_index.json)")
    return path


def load_pipeline(model: str, dtype=None):
    from diffusers import DiffusionPipeline

    options = {} if dtype is None else {"dtype": dtype}
    path = local_model(model)
    if path is not None:
        return DiffusionPipeline.from_pretrained(str(path), **options)
    try:
        return DiffusionPipeline.from_pretrained(model, **options)
    except Exception as err:  # the hub raises many error types; the user needs one message
        raise CliError(
            f"--model {model!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(err).__name__}); offline, pass the path of a saved diffusers pipeline"
        ) from err


def load_pipeline_skeleton(path: str | Path):
    """The pipeline with its models on the meta device: configs, tokenizers and scheduler, no weights."""
    import importlib

    import diffusers
    import torch
    import transformers
    from accelerate import init_empty_weights

    path = Path(path).expanduser()
    if not (path / "model_index.json").is_file():
        raise CliError(f"{str(path)!r} is not a local diffusers pipeline folder (no model_index.json)")
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
    pipe = getattr(diffusers, index["_class_name"])(**components)
    pipe.register_to_config(_name_or_path=str(path))  # as from_pretrained records it (hires.json is read there)
    return pipe


@dataclasses.dataclass
class Model:
    """What the checks need to know about a model: its facts and the resolved config."""

    id: str  # the --model value, a local path made absolute (so a rerun from elsewhere matches)
    pipe: Any  # the loaded pipeline, or its weightless skeleton
    info: Any  # hires.ModelInfo, with --base-size applied
    config: Any  # the HiresConfig


def describe_model(options: argparse.Namespace, request: Request, config_values, pipe) -> Model:
    import hires

    try:
        info = hires.model_info(pipe)
    except (TypeError, ValueError) as err:
        raise CliError(f"--model {options.model!r}: {err}") from None
    if request.base_size is not None:
        for side, value in zip(("height", "width"), request.base_size):
            _check_size_multiple(info, side, value, f"--base-size {options.base_size}")
        info = dataclasses.replace(info, base_height=request.base_size[0], base_width=request.base_size[1])
    config = build_config(options, config_values, info, request.base_size)
    info = with_base_size(info, config)
    if request.true_cfg is not None and "true_cfg_scale" not in inspect.signature(type(pipe).__call__).parameters:
        raise CliError(f"--true-cfg {options.true_cfg}: {type(pipe).__name__} has no true classifier-free guidance "
                       "(true_cfg_scale); use --guidance, or leave --true-cfg out")
    path = local_model(options.model)
    return Model(str(path.resolve()) if path is not None else options.model, pipe, info, config)


def _check_size_multiple(info, side: str, value: int, where: str) -> None:
    from .config import validate_size

    try:
        validate_size(side, value, info.size_multiple, info.name)
    except (TypeError, ValueError) as err:
        raise CliError(f"{where}: {err}") from None


def resolve_size(model: Model, size: tuple[int, int] | None, scale: float | None, where: str) -> tuple[int, int]:
    """(height, width) of a request: the given size, the base size times --scale, or the base size."""
    info = model.info
    if scale is not None:
        unit = info.size_multiple
        height = max(unit, round(info.base_height * scale / unit) * unit)
        width = max(unit, round(info.base_width * scale / unit) * unit)
    elif size is not None:
        height, width = size
    else:
        height, width = info.base_height, info.base_width
    check_size_bound(height, width, where)
    for side, value in (("height", height), ("width", width)):
        _check_size_multiple(info, side, value, f"{where} {width}x{height}")
    return height, width


def planned_stages(model: Model, height: int, width: int, steps: int,
                   image_size: tuple[int, int] | None = None) -> list[tuple[int, int, int | None]]:
    """(height, width, steps) of every stage a call runs (steps None: the input image, not denoised), from
    the stage plan an applied pipeline's call would make (hires.runtime.stage_plan)."""

    from .runtime import StageRequest, stage_plan

    parameters = tuple(inspect.signature(type(model.pipe).__call__).parameters)
    request = StageRequest(height, width, steps, parameters=parameters, image_size=image_size)
    try:
        planned = stage_plan(model.info, model.config, request)
    except ValueError as err:
        raise CliError(f"{width}x{height}, {steps} steps: {err}") from None
    stages = [(s.height, s.width, s.planned_steps) for s in planned]
    return [(*image_size, None)] + stages if image_size is not None else stages


# -- progress -----------------------------------------------------------------------------------
class Progress:
    """One display for a whole command: the steps of every stage (and every item of a batch).

    The pipeline's own bars are off; the denoising loop reports each step through the call's step
    callback, and a step index of 0 starts the next stage (each stage is its own pipeline call)."""

    def __init__(self, total: int, quiet: bool, position: int = 0):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=quiet, unit="step", position=position, dynamic_ncols=True, leave=True)
        self.label = ""
        self.stages = 0
        self.stage = 0

    def begin(self, label: str, stages: int) -> None:
        self.label, self.stages, self.stage = label, stages, 0

    def step(self, index: int) -> None:
        if index == 0:
            self.stage += 1
        if self.bar.n >= self.bar.total:  # a plan estimate fell short (e.g. bottleneck re-noise): keep the bar honest
            self.bar.total = self.bar.n + 1
        self.bar.set_description_str(f"{self.label}stage {self.stage}/{max(self.stages, self.stage)}", refresh=False)
        self.bar.update(1)

    def skip(self, steps: int) -> None:
        self.bar.total = max(self.bar.n, self.bar.total - steps)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def callbacks(self, call_parameters) -> dict[str, Any]:
        """The step-callback arguments this pipeline's __call__ takes."""
        if "callback_on_step_end" in call_parameters:
            def on_step_end(pipe, index, timestep, tensors):
                self.step(index)
                return {}
            return {"callback_on_step_end": on_step_end}
        if "callback" in call_parameters:  # PixArt-Sigma: the older callback(step, timestep, latents)
            return {"callback": lambda index, timestep, latents: self.step(index), "callback_steps": 1}
        return {}


@contextlib.contextmanager
def library_output(quiet: bool):
    """--quiet: diffusers' and transformers' logging and loading bars off, warnings ignored; restored after."""
    import warnings

    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        saved = [(lib, lib.get_verbosity()) for lib in (diffusers_logging, transformers_logging)]
        bars = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
        if quiet:
            for lib, _ in saved:
                lib.set_verbosity_error()
                lib.disable_progress_bar()
        try:
            yield
        finally:
            for lib, level in saved:
                lib.set_verbosity(level)
            for lib, enabled in bars:
                if enabled:
                    lib.enable_progress_bar()


# -- rendering ----------------------------------------------------------------------------------
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
    true_cfg: float | None = None

    def parameters(self, model: Model, dtype: str, image_digest: str | None = None) -> dict[str, Any]:
        """What decides the image's pixels (its key is their hash); the device does not change the request."""
        from . import __version__

        return {**dataclasses.asdict(self), "model": model.id, "dtype": dtype, "config": model.config.to_dict(),
                "image": image_digest, "hires_version": __version__}

    def parameters_text(self, model: str, family: str) -> str:
        """The A1111-style 'parameters' text chunk."""
        fields = [f"Steps: {self.steps}", f"Seed: {self.seed}", f"Size: {self.width}x{self.height}",
                  f"Model: {model}", f"Family: {family}"]
        if self.guidance is not None:
            fields.insert(1, f"CFG scale: {self.guidance}")
        return f"{self.prompt}\nNegative prompt: {self.negative or ''}\n" + ", ".join(fields)


class Renderer:
    """A loaded pipeline with hires applied, rendering jobs to PNG files."""

    def __init__(self, model: Model, device: str, dtype):
        import inspect

        import hires

        self.model = model
        self.device = device
        self.dtype = str(dtype).removeprefix("torch.")
        pipe = model.pipe if not _is_skeleton(model.pipe) else load_pipeline(model.id, dtype)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)  # Progress shows all stages in one display
        hires.apply(pipe, model.config)
        self.pipe = pipe
        self.call_parameters = inspect.signature(type(pipe).__call__).parameters

    def render(self, job: Job, out: Path, progress: Progress, extra: dict[str, Any] | None = None,
               image=None, image_digest: str | None = None) -> None:
        import torch

        call: dict[str, Any] = dict(prompt=job.prompt, height=job.height, width=job.width,
                                    num_inference_steps=job.steps,
                                    generator=torch.Generator("cpu").manual_seed(job.seed),
                                    **progress.callbacks(self.call_parameters))
        if job.negative is not None:
            call["negative_prompt"] = job.negative
        if job.guidance is not None:
            call["guidance_scale"] = job.guidance
        if job.true_cfg is not None:
            call["true_cfg_scale"] = job.true_cfg
            call.setdefault("negative_prompt", "")  # true CFG runs only with a negative prompt
        if "use_resolution_binning" in self.call_parameters:
            call["use_resolution_binning"] = False  # --size is the size rendered: PixArt's bins would resize it
        if image is not None:
            from .techniques.structure_guidance import guidance as progressive

            result = progressive.generate(self.pipe, image=image, **call)
        else:
            result = self.pipe(**call)
        picture = result.images[0]
        config = self.model.config
        parameters = job.parameters(self.model, self.dtype, image_digest)
        record = {**dataclasses.asdict(job), "key": batch.parameters_key(parameters), "model": self.model.id,
                  "family": self.model.info.name, "dtype": self.dtype, "device": self.device,
                  "hires": {name: dataclasses.asdict(config.technique(name)) for name in config.enabled_techniques()},
                  "request": parameters, **(extra or {})}
        from .io import write_png_atomically

        write_png_atomically(picture, out, {"parameters": job.parameters_text(self.model.id, self.model.info.name),
                                            batch.PNG_JSON_KEY: batch.dumps(record)})


def _is_skeleton(pipe) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Module) and any(p.is_meta for p in m.parameters())
               for m in pipe.components.values())


def read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise CliError(f"--image {path!r} cannot be read as an image: {err}") from None


def file_digest(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:24]


def model_for(options: argparse.Namespace, request: Request, config_values, dtype) -> Model:
    """The model's facts for the checks: from its configs alone where it is a local folder (no weights
    loaded), else from the loaded pipeline (a hub id must be downloaded before its configs can be read)."""
    path = local_model(options.model)
    pipe = load_pipeline_skeleton(path) if path is not None else load_pipeline(options.model, dtype)
    return describe_model(options, request, config_values, pipe)


# -- commands -----------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    request = read_request(args)
    out = Path(args.out)
    check_output_file(out)
    if request.size is not None:
        check_size_bound(*request.size, "--size")
    if args.image is not None and "structure_guidance" in args.disable:
        raise CliError("--image upscales with structure guidance; it conflicts with --disable structure_guidance")
    if args.dry_run and request.size is None:
        raise CliError("--dry-run needs --size WIDTHxHEIGHT (it reads no weights to resolve --scale)")
    config_values = read_config_file(args.config)
    image = read_image(args.image) if args.image is not None else None
    if image is not None:
        args.enable = [*args.enable, "structure_guidance"]
    with library_output(args.quiet):
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        if args.dry_run:
            return print_plan(args, request, config_values, device, dtype,
                              None if image is None else (image.height, image.width))
        model = model_for(args, request, config_values, dtype)
        height, width = resolve_size(model, request.size, request.scale, "--size")
        stages = planned_stages(model, height, width, request.steps,
                                None if image is None else (image.height, image.width))
        renderer = Renderer(model, device, dtype)
        job = Job(args.prompt, args.negative, height, width, request.steps, request.guidance, request.seed,
                  request.true_cfg)
        progress = Progress(sum(s or 0 for *_, s in stages), args.quiet)
        progress.begin("", sum(s is not None for *_, s in stages))
        try:
            renderer.render(job, out, progress, image=image,
                            image_digest=file_digest(args.image) if args.image is not None else None)
        except KeyboardInterrupt:
            progress.close()
            raise Interrupted(f"interrupted; {out} was not written") from None
        progress.close()
    if not args.quiet:
        print(f"wrote {out} ({width}x{height}, {model.info.name}, seed {request.seed}, {device})")
    return 0


def print_plan(args, request: Request, config_values, device: str, dtype, image_size) -> int:
    """--dry-run: the stages, steps and memory estimate of a request, without loading weights."""
    from .runtime import estimate_adaptations
    from .techniques.memory.estimate import MemoryBudgetError, format_bytes, plan

    path = local_model(args.model)
    if path is None:
        raise CliError(f"--dry-run reads configs only from a local pipeline folder; --model {args.model!r} is not one "
                       "(no model_index.json)")
    model = describe_model(args, request, config_values, load_pipeline_skeleton(path))
    info, config = model.info, model.config
    height, width = resolve_size(model, request.size, None, "--size")
    stages = planned_stages(model, height, width, request.steps, image_size)
    denoiser = getattr(model.pipe, info.family.denoiser_attr)
    print(f"model: {args.model} ({type(model.pipe).__name__}, family {info.name}, base {info.base_width}x"
          f"{info.base_height}, {info.prediction_type} prediction)")
    print(f"request: {width}x{height}, {request.steps} steps, dtype {str(dtype).removeprefix('torch.')}, "
          f"device {device}")
    print(f"techniques: {', '.join(config.enabled_techniques()) or 'none'}")
    # Flux.2 [dev] never runs CFG; true-CFG families run its halves as separate calls
    cfg = info.family.runs_cfg and (request.guidance is None or request.guidance > 1)
    budget = config.memory.max_memory
    adaptations = estimate_adaptations(info, config)  # what the techniques make the denoiser do (SD3's table)
    status = 0
    for number, (h, w, steps) in enumerate(stages):
        label = "input image" if steps is None else f"{steps} steps"
        try:
            estimate = plan(denoiser, model.pipe.vae, height=h, width=w, latent_factor=info.latent_factor, dtype=dtype,
                            cfg=cfg, cfg_batched=info.family.cfg_batched, budget=budget,
                            name=info.name, device_type=device.split(":")[0], adaptations=adaptations).summary()
        except MemoryBudgetError as err:
            estimate, status = f"DOES NOT FIT: {err}", 2
        except ValueError as err:  # e.g. no budget given and no such device to measure
            raise CliError(f"--dry-run on --device {device}: {err}") from None
        print(f"stage {number}: {w}x{h}, {label}; memory {estimate}")
    if budget is None:
        print(f"(budget: free memory of this machine's {'GPU' if device.startswith('cuda') else 'RAM'}; "
              f"set HiresConfig.memory.max_memory to plan for another device, e.g. {format_bytes(80 * 2**30)})")
    return status


def cmd_batch(args: argparse.Namespace) -> int:
    request = read_request(args)
    try:
        items = batch.read_prompt_file(args.file)
    except batch.PromptFileError as err:
        raise CliError(str(err)) from None
    out_dir = Path(args.out)
    check_creatable_folder(out_dir, "--out")
    if request.size is not None:
        check_size_bound(*request.size, "--size")
    config_values = read_config_file(args.config)
    with library_output(args.quiet):
        import torch
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        # Without cpu=True accelerate never forms a multi-process CPU group (gloo).
        on_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available() or device == "cpu"
        state = PartialState(cpu=on_cpu)
        if state.num_processes > 1 and (args.device is None or args.device == state.device.type):
            device = str(state.device)  # each rank its own GPU
        model = model_for(args, request, config_values, dtype)
        jobs = [_batch_job(args, request, model, item) for item in items]  # every item checked before any render
        keys = [batch.parameters_key(job.parameters(model, str(dtype).removeprefix("torch."))) for job in jobs]
        entries = [(item, key, job.parameters(model, str(dtype).removeprefix("torch.")))
                   for item, key, job in zip(items, keys, jobs)]
        out_dir.mkdir(parents=True, exist_ok=True)
        rendered, elsewhere = _render_shard(args, state, model, device, dtype, out_dir, items, jobs, keys, entries)
        state.wait_for_everyone()
        manifest = batch.write_manifest(out_dir, entries, str(args.file))
    if state.is_main_process and not args.quiet:
        busy = f", {elsewhere} being rendered by another process" if elsewhere else ""
        print(f"{manifest['done']}/{manifest['total']} items done in {out_dir} (rendered {rendered} here{busy})")
    return 0


def _batch_job(args, request: Request, model: Model, item: batch.BatchItem) -> Job:
    size = item.overrides.get("size")
    if size is not None:
        height, width = resolve_size(model, parse_size(size, "size"), None, f"{item.where}: size")
    else:
        height, width = resolve_size(model, request.size, request.scale, "--size")
    seed = item.overrides.get("seed")
    if seed is None:
        seed = _check(check_seed, request.seed + item.index, f"{item.where}: seed (--seed {request.seed} + item "
                                                              f"index {item.index})")
    steps = item.overrides.get("steps", request.steps)
    planned_stages(model, height, width, steps)  # a plan the sampling layer would refuse, refused now
    return Job(item.prompt, item.overrides.get("negative", args.negative), height, width, steps,
               item.overrides.get("guidance", request.guidance), seed, request.true_cfg)


def _render_shard(args, state, model, device, dtype, out_dir, items, jobs, keys, entries) -> tuple[int, int]:
    """Render this process's share of the items that are not done; returns (rendered, claimed elsewhere)."""
    with state.split_between_processes(list(range(len(items)))) as mine:
        todo = [i for i in mine if not batch.is_finished(out_dir, items[i], keys[i])]
    if not todo:
        return 0, 0
    renderer = Renderer(model, device, dtype)
    plans = {i: planned_stages(model, jobs[i].height, jobs[i].width, jobs[i].steps) for i in todo}
    progress = Progress(sum(s or 0 for i in todo for *_, s in plans[i]), args.quiet, position=state.process_index)
    rendered = elsewhere = 0
    try:
        for number, i in enumerate(todo, 1):
            item, steps = items[i], sum(s or 0 for *_, s in plans[i])
            claim = batch.try_claim(out_dir, item)
            if claim is None:
                elsewhere += 1
                progress.skip(steps)
                continue
            try:
                if batch.is_finished(out_dir, item, keys[i]):  # finished by another process before our claim
                    progress.skip(steps)
                    continue
                batch.remove_temporaries(out_dir, item)
                rank = f"[{state.process_index}] " if state.num_processes > 1 else ""
                progress.begin(f"{rank}item {number}/{len(todo)} ", len(plans[i]))
                renderer.render(jobs[i], out_dir / item.filename, progress,
                                {"index": item.index, "line": item.line, "process": state.process_index,
                                 "pid": os.getpid()})
                rendered += 1
            finally:
                claim.release()
    except KeyboardInterrupt:
        progress.close()
        manifest = batch.write_manifest(out_dir, entries, str(args.file))
        raise Interrupted(f"interrupted; {manifest['done']}/{manifest['total']} finished PNGs kept in {out_dir} "
                          "(the same command resumes)") from None
    progress.close()
    return rendered, elsewhere


def cmd_techniques(args: argparse.Namespace) -> int:
    """Every technique: its config class, the families it applies to and its options with defaults."""
    from .families import FAMILIES, nominal_info
    from .techniques import all_techniques

    probes = [nominal_info(f) for f in FAMILIES]
    for record in all_techniques():
        name, sub = record.name, record.config_type()
        families = []
        for info in probes:
            try:
                getattr(type(sub)(enabled=True), "validate_for", lambda info: None)(info)
                families.append(info.name)
            except (TypeError, ValueError):
                pass
        summary = (type(sub).__doc__ or "").strip().splitlines()[0] if type(sub).__doc__ else ""
        print(f"{name} ({type(sub).__name__}): {summary}")
        print(f"  families: {', '.join(families) or 'none'}")
        for field in dataclasses.fields(sub):
            print(f"  {name}.{field.name}: {field.type} = {getattr(sub, field.name)!r}")
    print("Switch one on with --enable NAME, off with --disable NAME; set options in a --config JSON file, "
          'e.g. {"entropy_scaling": {"enabled": true, "layers": "all"}}.')
    return 0


# -- the parser ---------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" where there is a meaningful default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "(default" in text or default is None or default is False or default == [] or default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(DEFAULT_MODEL),
                        help="a saved diffusers pipeline folder or a hub id (default: the embedded testbed model, "
                             "hires/assets/testbed_sd15)")
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT in pixels (default: the model's base size)")
    parser.add_argument("--scale", default=None, help="size as a factor of the model's base side, instead of --size")
    parser.add_argument("--base-size", default=None, metavar="SIDE|WxH",
                        help="the size the model was trained at, where its pipeline class reads another "
                             "(default: read from the model's configs)")
    parser.add_argument("--steps", default=20, help="denoising steps of the full schedule")
    parser.add_argument("--true-cfg", default=None, metavar="SCALE",
                        help="true classifier-free guidance scale for pipelines that have it (Flux: true_cfg_scale; "
                             "runs a negative pass, with --negative or an empty negative prompt; default: off)")
    parser.add_argument("--guidance", default=None,
                        help="classifier-free guidance scale, a finite number >= 0 (default: the pipeline's own)")
    parser.add_argument("--seed", default=0, help="random seed in [0, 2**63); batch items without one get seed + index")
    parser.add_argument("--preset", default="auto", choices=("auto", "none"),
                        help="auto: the family's automatic preset (hires.presets); none: every technique off")
    parser.add_argument("--config", default=None, help="a JSON file of HiresConfig options (replaces --preset); "
                                                       "see `hires techniques`")
    parser.add_argument("--enable", action="append", default=[], metavar="TECHNIQUE",
                        help="switch a technique on (a HiresConfig field, e.g. entropy_scaling); repeatable")
    parser.add_argument("--disable", action="append", default=[], metavar="TECHNIQUE",
                        help="switch a technique off; repeatable")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="weights and compute dtype (auto: float16 on CUDA, float32 otherwise)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hires", description="Training-free high-resolution generation.",
                                     formatter_class=_HelpFormatter, allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"hires {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,batch,techniques}")
    gen = sub.add_parser("generate", help="render one prompt to a PNG", formatter_class=_HelpFormatter,
                         allow_abbrev=False)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--out", required=True, help="output .png path")
    gen.add_argument("--image", default=None, help="upscale this picture (structure guidance from it) instead of "
                                                   "generating the base image")
    gen.add_argument("--dry-run", action="store_true",
                     help="print the plan (stages, steps, memory estimate) from the model's configs, load no weights")
    _common_options(gen)
    gen.set_defaults(run=cmd_generate)

    bat = sub.add_parser("batch", help="render every prompt of a .txt / .jsonl / .csv file; a rerun resumes",
                         formatter_class=_HelpFormatter, allow_abbrev=False,
                         description="A rerun keeps each PNG whose parameters (prompt, negative, seed, size, steps, "
                                     "guidance, model, dtype, config, hires version) are unchanged and renders the "
                                     "rest; several runs on one folder share the work.")
    bat.add_argument("file", help="prompt file: .txt (a prompt a line), .jsonl or .csv (prompt + overrides)")
    bat.add_argument("--out", required=True, help="output folder (PNGs and manifest.json)")
    _common_options(bat)
    bat.set_defaults(run=cmd_batch)

    tech = sub.add_parser("techniques", help="list every technique, the families it applies to and its options",
                          formatter_class=_HelpFormatter, allow_abbrev=False)
    tech.set_defaults(run=cmd_techniques)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as err:
        print(f"hires {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"hires {args.command}: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before any image work began
        print(f"hires {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
