"""The `hires` command line.

    hires generate --prompt TEXT --size WxH --out FILE.png [--model PATH_OR_ID] [...]
    hires batch PROMPTS.(txt|jsonl|csv) --out DIR [...]
    hires techniques                       # every technique, its families and options
    accelerate launch -m hires batch ...   # shards the items over processes / GPUs

Order of work: every option and prompt-file value is checked first, then the model's configs and
files are read (no weights) to check sizes, steps and the HiresConfig, then the output location is
proven (a probe file, name lengths, free space); only then are weights loaded. A render with
non-finite output is never written (hires.guards). torch and diffusers are imported inside the
commands, so `--help` is instant.
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
from .validation import check_strength

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


class RenderFailed(Exception):
    """A render that produced no image worth keeping, or whose file could not be written: one line, exit
    status 1. `kept`: where the image was kept instead, if it was; `stops_batch`: the output folder took
    no file, so a batch stops there (a non-finite render fails only its own item)."""

    def __init__(self, message: str, kept: Path | None = None, stops_batch: bool = False):
        super().__init__(message)
        self.kept = kept
        self.stops_batch = stops_batch


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


# PNG bytes of a height x width render at most: zlib never grows 8-bit RGB rows (one filter byte
# each) by more than a little, plus the text chunks (parameters, the request record).
PNG_TEXT_BYTES = 256 * 1024


def png_bytes_bound(height: int, width: int) -> int:
    raw = height * (3 * width + 1)
    return raw + raw // 1000 + PNG_TEXT_BYTES


def prove_output_folder(folder: Path, names: list[str], need: int, option: str, images: int = 1) -> None:
    """Show, before any weights load, that the PNGs can be written: the folder exists (missing folders
    are created now, and removed again if the proof fails), a probe file can be created and removed in
    it (`os.access` says nothing on procfs or a read-only mount), every file name hires writes there
    fits the file system's name limit, and `need` bytes are free."""
    import shutil
    import tempfile

    from .io import longest_sibling_name

    created = []
    try:
        missing = [p for p in [folder, *folder.parents] if not p.exists()]
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:  # another process of the same batch made it meanwhile
                continue
            except OSError as err:
                raise CliError(f"{option} {str(folder)!r}: the folder {str(path)!r} cannot be created "
                               f"({err.strerror or err}); choose a writable folder") from None
            created.append(path)
        try:
            fd, probe = tempfile.mkstemp(prefix=".hires-probe-", dir=folder)
            try:
                os.write(fd, b"hires")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as err:
            raise CliError(f"{option} {str(folder)!r}: a file cannot be created there ({err.strerror or err}); "
                           "choose a writable folder") from None
        try:
            name_max = os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError, AttributeError):
            name_max = None
        for name in names:
            length = longest_sibling_name(name)
            if name_max is not None and length > name_max:
                raise CliError(f"{option} {str(folder)!r}: the file name {name!r} ({len(name.encode())} bytes) and "
                               f"the temporary file written beside it ({length} bytes) exceed this file system's "
                               f"limit of {name_max} bytes a name; use a file name of at most "
                               f"{name_max - (length - len(name.encode()))} bytes")
        free = shutil.disk_usage(folder).free
        if need > free:
            what = "the PNG needs" if images == 1 else f"the {images} PNGs to render need"
            raise CliError(f"{option} {str(folder)!r}: {what} up to {_format_bytes(need)} and the file system has "
                           f"{_format_bytes(free)} free; free some space or choose another folder")
    except BaseException:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def keep_render(picture, out: Path, text: dict[str, str]) -> Path | None:
    """Where a render whose final write failed is kept instead: the temporary folder, else beside it."""
    import tempfile

    from .io import write_png_atomically

    for folder in (Path(tempfile.gettempdir()) / "hires-recovered", out.parent):
        target = folder / (out.name if folder != out.parent else f"{out.stem}.recovered{out.suffix}")
        try:
            write_png_atomically(picture, target, text)
            return target
        except OSError:
            continue
    return None


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
            if not isinstance(value, dict):
                raise CliError(f"{where}.{key}={json.dumps(value)} must be a JSON object of {key} options, e.g. "
                               f'"{key}": {{"enabled": true}} (`hires techniques` lists them)')
            _check_json_types(nested, value, f"{where}.{key}")
            continue
        allowed = set(kind.split("|"))
        if value is None and "None" in allowed:
            continue
        if allowed <= {"str", "None"} and not isinstance(value, str):
            choices = _string_choices(cls, key)
            raise CliError(f"{where}.{key}={json.dumps(value)} must be a JSON string"
                           + (f", one of {choices}" if choices else "")
                           + ("" if "None" not in allowed else " (or null)"))
        if allowed <= {"bool", "None"} and not isinstance(value, bool):
            raise CliError(f"{where}.{key}={json.dumps(value)} must be a JSON boolean (true or false)")
        numeric = allowed & {"int", "float"} and not allowed & {"bool", "Any", "str"}
        if numeric and isinstance(value, bool):
            raise CliError(f"{where}.{key}={json.dumps(value)} must be a number, not a JSON boolean")


def _string_choices(cls: type, key: str) -> str | None:
    """The values a string option accepts, as the config's own check words them (None if it names none)."""
    try:
        cls(**{key: "\x00"})
    except (TypeError, ValueError) as err:
        text = str(err)
        if "choose one of " in text:
            return text.split("choose one of ", 1)[1].split(";")[0].strip().rstrip(".")
    return None


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

    from .io import ReadError, loads_strict, read_text

    try:
        text = read_text(Path(path), "--config")
    except ReadError as err:
        raise CliError(str(err)) from None
    try:
        values = loads_strict(text, "HiresConfig")
    except json.JSONDecodeError as err:
        raise CliError(f"--config {path!r} is not valid JSON: {err.msg} at line {err.lineno}") from None
    except ValueError as err:
        raise CliError(f"--config {path!r}: {err}") from None
    if not isinstance(values, dict):
        raise CliError(f"--config {path!r} must hold a JSON object of HiresConfig options, "
                       f"got {type(values).__name__}")
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
MODEL_INDEX = "model_index.json"
# What ModularPipeline.save_pretrained writes; a folder with a model_index.json too loads as the classic pipeline.
MODULAR_INDEX = "modular_model_index.json"


def local_model(model: str) -> Path | None:
    path = Path(model).expanduser()
    if not path.exists():
        return None
    if not (path / MODEL_INDEX).is_file() and not (path / MODULAR_INDEX).is_file():
        raise CliError(f"--model {model!r} is a path but holds no diffusers pipeline (no {MODEL_INDEX}, nor the "
                       f"{MODULAR_INDEX} of a Modular Diffusers pipeline)")
    return path


def is_modular_folder(path: Path) -> bool:
    return not (path / MODEL_INDEX).is_file() and (path / MODULAR_INDEX).is_file()


def load_pipeline(model: str, dtype=None):
    from diffusers import DiffusionPipeline

    options = {} if dtype is None else {"dtype": dtype}
    path = local_model(model)
    if path is not None and is_modular_folder(path):
        return load_modular_pipeline(path, dtype)
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
    path = Path(path).expanduser()
    if is_modular_folder(path):
        return load_modular_skeleton(path)
    if not (path / MODEL_INDEX).is_file():
        raise CliError(f"{str(path)!r} is not a local diffusers pipeline folder (no {MODEL_INDEX})")
    index = read_model_index(path)
    components: dict[str, Any] = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        component = (isinstance(value, list) and len(value) == 2
                     and all(part is None or isinstance(part, str) for part in value))
        if not component:  # plain __init__ arguments: requires_safety_checker, Krea-2's text_encoder_select_layers
            components[name] = value
            continue
        library, class_name = value
        if library is None or class_name is None:
            components[name] = None
            continue
        components[name] = _skeleton_component(path, name, name, library, class_name)
    pipeline_cls = _named_class(path, "diffusers", index["_class_name"], "the pipeline")
    pipe = pipeline_cls(**components)
    pipe.register_to_config(_name_or_path=str(path))  # as from_pretrained records it (hires.json is read there)
    return pipe


def _skeleton_component(path: Path, name: str, subfolder: str, library: str, class_name: str,
                        index: str = MODEL_INDEX):
    """One component of a model folder from its files: a model on the meta device (its config, and its weights
    file checked against it), anything else (tokenizer, scheduler) loaded."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    component_cls = _named_class(path, library, class_name, f"{name} ({library}.{class_name})", index)
    folder = path / subfolder
    is_module = issubclass(component_cls, torch.nn.Module)
    check_component_folder(path, subfolder, class_name, is_module, index)
    try:
        if is_module:
            with init_empty_weights():
                if library == "diffusers":
                    config = component_cls.load_config(folder)
                    _check_config_class(path, subfolder, component_cls, config.get("_class_name"), index)
                    component = component_cls.from_config(config)
                else:
                    component = component_cls(transformers.AutoConfig.from_pretrained(folder))
            if library == "diffusers":  # transformers renames checkpoint keys while loading: not comparable
                _check_weight_shapes(path, subfolder, component)
            return component
        return component_cls.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:  # a config missing, not JSON or not this class's
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CliError(f"--model {str(path)!r}: {subfolder}/ ({class_name}) cannot be read from its files: {first}; "
                       "re-download or re-save the model") from None


def _named_class(path: Path, library: str, class_name: str, what: str, index: str = MODEL_INDEX) -> type:
    """A class the model index names, or one line saying it does not exist in what is installed."""
    import importlib

    if not (isinstance(library, str) and isinstance(class_name, str)):
        raise CliError(f"--model {str(path)!r}: {index} names {what} as {[library, class_name]}, not "
                       '["library", "ClassName"]; re-download or re-save the model')
    try:
        module = importlib.import_module(library)
    except ImportError:
        raise CliError(f"--model {str(path)!r}: {index} names {what} from the library {library!r}, which is "
                       f"not installed; install it (pip install {library}) or check the model") from None
    value = getattr(module, class_name, None)
    if not isinstance(value, type):
        version = getattr(module, "__version__", None)
        raise CliError(f"--model {str(path)!r}: {index} names {what}, but {library}"
                       f"{' ' + version if version else ''} has no class {class_name!r}; update {library} or "
                       "check the model")
    return value


def _check_config_class(path: Path, name: str, cls: type, written: Any, index: str = MODEL_INDEX) -> None:
    """A component's config describes the class the model index names (not, say, a VAE's config in unet/)."""
    import diffusers

    other = getattr(diffusers, written, None) if isinstance(written, str) else None
    if isinstance(other, type) and not (issubclass(other, cls) or issubclass(cls, other)):
        raise CliError(f"--model {str(path)!r}: {name}/config.json describes a {written}, but {index} names "
                       f"{name} a {cls.__name__}; re-download or re-save the model")


def _check_weight_shapes(path: Path, name: str, module) -> None:
    """A diffusers model's weights file (its header's tensor names and shapes) fits the model its config
    builds: weights of another model in a folder fail here, not after loading."""
    from .io import ReadError, safetensors_shapes, weights_files

    files = [f for f in weights_files(path / name) if f.name == "diffusion_pytorch_model.safetensors"]
    if not files:
        return  # sharded, variant or pickled weights: their loader checks them
    try:
        stored = safetensors_shapes(files[0])
    except ReadError as err:
        raise CliError(f"--model {str(path)!r}: {err}") from None
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    common = set(stored) & set(expected)
    if not common:
        raise CliError(f"--model {str(path)!r}: {name}/{files[0].name} holds none of the tensors its config's "
                       f"{type(module).__name__} has (e.g. {next(iter(expected), '?')}); the file belongs to another "
                       "model: re-download or re-save it")
    for key in sorted(common):
        if stored[key] != expected[key]:
            raise CliError(f"--model {str(path)!r}: {name}/{files[0].name} does not fit {name}/config.json: {key} is "
                           f"{list(stored[key])} in the file and {list(expected[key])} in the model; re-download or "
                           "re-save the model")


def read_model_index(path: Path) -> dict[str, Any]:
    from .io import ReadError, loads_strict, read_text

    try:
        index = loads_strict(read_text(path / "model_index.json", "model index"))
    except (ReadError, ValueError) as err:
        raise CliError(f"--model {str(path)!r}: model_index.json cannot be read: {err}") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise CliError(f"--model {str(path)!r}: model_index.json names no pipeline class (_class_name); "
                       "re-download or re-save the model")
    return index


def read_modular_index(path: Path) -> dict[str, Any]:
    """modular_model_index.json, strictly read, naming a Modular Diffusers pipeline class diffusers has."""
    from diffusers import ModularPipeline

    from .io import ReadError, loads_strict, read_text

    try:
        index = loads_strict(read_text(path / MODULAR_INDEX, "modular model index"))
    except (ReadError, ValueError) as err:
        raise CliError(f"--model {str(path)!r}: {MODULAR_INDEX} cannot be read: {err}") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise CliError(f"--model {str(path)!r}: {MODULAR_INDEX} names no pipeline class (_class_name); "
                       "re-save the pipeline (ModularPipeline.save_pretrained)")
    pipeline_cls = _named_class(path, "diffusers", index["_class_name"], "the pipeline", MODULAR_INDEX)
    if not issubclass(pipeline_cls, ModularPipeline):
        raise CliError(f"--model {str(path)!r}: {MODULAR_INDEX} names {index['_class_name']}, which is not a "
                       "Modular Diffusers pipeline (a classic one is saved with a model_index.json)")
    return index


def modular_components(path: Path) -> dict[str, str]:
    """component -> its subfolder, for every component modular_model_index.json lists. Each must lie in this
    folder: the checks that run before any weights load read its files (a saved pipeline's index points at the
    folder it was saved to; a copied one may still point at the hub)."""
    folders = {}
    for name, value in read_modular_index(path).items():
        if name.startswith("_") or not isinstance(value, list):
            continue  # the graph's config values
        if len(value) != 3 or not isinstance(value[2], dict):
            raise CliError(f"--model {str(path)!r}: {MODULAR_INDEX} lists {name} as {value!r}, not [library, "
                           "class, loading spec]; re-save the pipeline (ModularPipeline.save_pretrained)")
        if value[0] is None and value[1] is None:
            continue  # a component the graph can take that the pipeline was saved without (a ControlNet)
        spec = value[2]
        subfolder = spec.get("subfolder") or ""
        inside = isinstance(subfolder, str) and (path / subfolder).resolve().is_relative_to(path.resolve())
        if not inside or not subfolder or not (path / subfolder).is_dir():
            where = spec.get("pretrained_model_name_or_path")
            raise CliError(f"--model {str(path)!r}: {MODULAR_INDEX} lists {name} ({value[1]}) from "
                           f"{where!r}{f' ({subfolder}/)' if subfolder else ''}, whose files are not in this "
                           "folder; save the pipeline with every component loaded (load_components(), then "
                           "save_pretrained(folder))")
        folders[name] = subfolder
    return folders


def _modular_from_folder(path: Path):
    from diffusers import ModularPipeline

    try:
        return ModularPipeline.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CliError(f"--model {str(path)!r}: {MODULAR_INDEX} describes no pipeline diffusers can build: {first}; "
                       "re-save the pipeline (ModularPipeline.save_pretrained)") from None


def load_modular_skeleton(path: Path):
    """A saved Modular Diffusers pipeline with its models on the meta device, as load_pipeline_skeleton."""
    from .modular import drop_unloaded_steps

    index = read_modular_index(path)
    folders = modular_components(path)
    pipe = _modular_from_folder(path)
    parts = {name: _skeleton_component(path, name, folder, index[name][0], index[name][1], MODULAR_INDEX)
             for name, folder in folders.items()}
    with library_output(True):  # update_components says each part was made without a ComponentSpec
        pipe.update_components(**parts)
    drop_unloaded_steps(pipe)
    return pipe


def load_modular_pipeline(path: Path, dtype=None):
    """`ModularPipeline.from_pretrained(folder)` and `load_components()`, without the steps whose models the
    folder does not hold (hires.modular.drop_unloaded_steps: Flux 3's prompt upsampler, a model of its own)."""
    from .modular import drop_unloaded_steps

    modular_components(path)
    pipe = _modular_from_folder(path)
    pipe.load_components(**({} if dtype is None else {"torch_dtype": dtype}))
    drop_unloaded_steps(pipe)
    return pipe


def call_parameter_names(pipe) -> tuple[str, ...]:
    """What a call of `pipe` takes by name: its __call__'s parameters, or a modular pipeline's graph inputs."""
    from .modular import is_modular

    if is_modular(pipe):
        return tuple(dict.fromkeys(p.name for p in pipe._blocks.inputs if p.name))
    return tuple(inspect.signature(type(pipe).__call__).parameters)


def check_component_folder(path: Path, name: str, class_name: str, is_module: bool, index: str = MODEL_INDEX) -> None:
    """A component the model index lists is on disk: its folder, and for a model a whole weights file,
    so a damaged folder is one line naming the file, not a loader's traceback after minutes."""
    from .io import ReadError, weights_file_identity, weights_files

    folder = path / name
    if not folder.is_dir():
        raise CliError(f"--model {str(path)!r}: {index} lists {name} ({class_name}) but the folder "
                       f"{str(folder)!r} is missing; re-download or re-save the model")
    if not is_module:
        return
    files = weights_files(folder)
    if not files:
        raise CliError(f"--model {str(path)!r}: {str(folder)!r} holds no weights file (*.safetensors, *.bin); "
                       "re-download or re-save the model")
    for file in files:
        try:
            weights_file_identity(file)
        except ReadError as err:
            raise CliError(f"--model {str(path)!r}: {err}") from None


def weights_identity(path: Path) -> str:
    """A digest of every weights file of a model folder: its name, size, mtime and (safetensors) header
    hash. Cheap (stat and a header read per file), so a rerun that renders nothing reads no weights;
    weights replaced in place change it, so their images are rendered again."""
    import hashlib

    from .io import ReadError, weights_file_identity, weights_files

    entries = []
    if is_modular_folder(path):
        subfolders = sorted(set(modular_components(path).values()))
    else:
        subfolders = [name for name, value in sorted(read_model_index(path).items())
                      if not name.startswith("_") and isinstance(value, list)]
    for name in subfolders:
        folder = path / name
        if not folder.is_dir():
            continue
        for file in weights_files(folder):
            try:
                entries.append([f"{name}/{file.name}", *weights_file_identity(file)])
            except (ReadError, OSError) as err:
                raise CliError(f"--model {str(path)!r}: {err}") from None
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:24]


def hub_weights_identity(model: str) -> str | None:
    """The weights' identity of a hub model already in the local cache (its snapshot folder), if found."""
    try:
        from diffusers import DiffusionPipeline

        folder = Path(DiffusionPipeline.download(model, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a hub id: the key then holds the id alone
        return None
    try:
        return weights_identity(folder)
    except CliError:
        return None


@dataclasses.dataclass
class Model:
    """What the checks need to know about a model: its facts and the resolved config."""

    id: str  # the --model value, a local path made absolute (so a rerun from elsewhere matches)
    pipe: Any  # the loaded pipeline, or its weightless skeleton
    info: Any  # hires.ModelInfo, with --base-size applied
    config: Any  # the HiresConfig
    max_steps: int | None = None  # the scheduler's num_train_timesteps: diffusers refuses more steps
    weights: Any = None  # the weights' identity (hires.io.weights_identity), part of every resume key


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
    names = call_parameter_names(pipe)
    if request.true_cfg is not None and "true_cfg_scale" not in names:
        raise CliError(f"--true-cfg {options.true_cfg}: {type(pipe).__name__} has no true classifier-free guidance "
                       "(true_cfg_scale); use --guidance, or leave --true-cfg out")
    from .modular import is_modular

    if is_modular(pipe):
        if (request.guidance is not None and "guidance_scale" not in names
                and getattr(pipe, "guider", None) is None):
            raise CliError(f"--guidance {options.guidance}: {type(pipe).__name__} runs no guidance (it takes no "
                           "guidance_scale and has no guider); leave --guidance out")
        if options.negative is not None and "negative_prompt" not in names:
            raise CliError(f"--negative: {type(pipe).__name__} takes no negative prompt; leave --negative out")
    path = local_model(options.model)
    scheduler = getattr(pipe, "scheduler", None)
    max_steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if isinstance(max_steps, int) and max_steps < 1:
        raise CliError(f"--model {options.model!r}: its scheduler config says num_train_timesteps={max_steps}, so no "
                       "step can run; re-download or re-save the model")
    return Model(str(path.resolve()) if path is not None else options.model, pipe, info, config,
                 max_steps=max_steps if isinstance(max_steps, int) and max_steps > 0 else None)


def check_steps_for_model(model: Model, steps: int, where: str) -> None:
    """More steps than the scheduler's training timesteps: diffusers would refuse them after loading."""
    if model.max_steps is not None and steps > model.max_steps:
        raise CliError(f"{where}={steps}: this model's scheduler ({type(model.pipe.scheduler).__name__}) was trained "
                       f"with {model.max_steps} timesteps, so at most {model.max_steps} steps can run; "
                       f"use e.g. {min(20, model.max_steps)} to 50")


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
        height = round(info.base_height * scale / unit) * unit
        width = round(info.base_width * scale / unit) * unit
        if height < unit or width < unit:
            smallest = unit / min(info.base_height, info.base_width)
            raise CliError(f"--scale {scale:g} of the {info.base_width}x{info.base_height} base gives "
                           f"{width}x{height} pixels; the smallest size is {unit}x{unit} pixels "
                           f"(--scale {smallest:g})")
    elif size is not None:
        height, width = size
    else:
        height, width = info.base_height, info.base_width
    check_size_bound(height, width, where)
    for side, value in (("height", height), ("width", width)):
        _check_size_multiple(info, side, value, f"{where} {width}x{height}")
    return height, width


def _stage_plan(model: Model, height: int, width: int, steps: int, image_size: tuple[int, int] | None = None,
                strength: float | None = None) -> list:
    """The stages an applied pipeline's call would plan (hires.runtime.stage_plan), from the configs."""
    from .runtime import StageRequest, stage_plan

    parameters = call_parameter_names(model.pipe)
    request = StageRequest(height, width, steps, parameters=parameters, image_size=image_size, strength=strength)
    try:
        return stage_plan(model.info, model.config, request)
    except ValueError as err:
        raise CliError(f"{width}x{height}, {steps} steps: {err}") from None


def planned_stages(model: Model, height: int, width: int, steps: int, image_size: tuple[int, int] | None = None,
                   strength: float | None = None) -> list[tuple[int, int, int | None]]:
    """(height, width, steps) of every stage a call runs (steps None: the input image, not denoised)."""
    stages = [(s.height, s.width, s.planned_steps)
              for s in _stage_plan(model, height, width, steps, image_size, strength)]
    return [(*image_size, None)] + stages if image_size is not None else stages


# -- the memory planner's verdict, from the configs ------------------------------------------------
def _uses_cfg(model: Model, guidance: float | None, true_cfg: float | None) -> bool:
    """Whether the call runs classifier-free guidance, as the pipeline would decide it."""
    family = model.info.family
    if not family.runs_cfg:
        return False
    name = family.guidance_scale_name
    scale = true_cfg if name == "true_cfg_scale" else guidance
    guider = getattr(model.pipe, "guider", None)
    if scale is None and family.cfg_separate and guider is not None:  # a modular pipeline: its guider's scale
        scale = guider.guidance_scale
    elif scale is None:
        parameter = inspect.signature(type(model.pipe).__call__).parameters.get(name)
        scale = parameter.default if parameter is not None and isinstance(parameter.default, (int, float)) else None
    if scale is None or scale + family.guidance_scale_offset <= 1:
        return False
    # true CFG runs only with a negative prompt, which the CLI passes (empty) with --true-cfg
    return not (family.cfg_separate and family.cfg_switch) or true_cfg is not None


def _sequential_cfg_allowed(model: Model) -> bool:
    """As the memory technique decides it: batched CFG may be split unless a technique needs both halves at once."""
    from .runtime import installed_techniques

    if not model.info.family.cfg_batched or model.config.memory.sequential_cfg is False:
        return False
    return not any("whole_cfg_batch" in record.capabilities for record, _ in installed_techniques(model.config))


def _plan_call(model: Model, height: int, width: int, steps: int, cfg: bool, dtype, device: str, budget):
    """The whole call's memory plan, as the memory technique plans it at run time, from the skeleton's configs."""
    import torch

    from .techniques.memory import estimate as mp
    from .runtime import estimate_adaptations
    from .techniques.memory.install import call_passes

    info, config, pipe = model.info, model.config, model.pipe
    denoiser = getattr(pipe, info.family.denoiser_attr)
    stages = _stage_plan(model, height, width, steps)
    passes, vae_passes = call_passes(info, stages, 1, pipe.vae.config.latent_channels, uses_cfg=lambda stage: cfg)
    others = sum(mp.module_bytes(m, dtype) for name, m in pipe.components.items()
                 if isinstance(m, torch.nn.Module) and m is not denoiser and m is not pipe.vae)
    tiling = config.vae_tiling
    return mp.plan_call(
        denoiser, pipe.vae, denoiser_passes=passes, vae_passes=vae_passes, latent_factor=info.latent_factor,
        dtype=dtype, batch=1, cfg=cfg, cfg_batched=info.family.cfg_batched, budget=budget,
        other_weights=others,
        tile_vae=None if not tiling.enabled or tiling.mode == "auto" else tiling.mode == "always",
        tile_size=tiling.tile_size if tiling.enabled else None, feed_forward_chunks=config.memory.feed_forward_chunks,
        sequential_cfg=config.memory.sequential_cfg if _sequential_cfg_allowed(model) else False,
        name=f"{width}x{height} {info.name}", device_type=device.split(":")[0],
        adaptations=estimate_adaptations(info, config))


def check_memory(model: Model, height: int, width: int, steps: int, guidance: float | None, true_cfg: float | None,
                 dtype, device: str, where: str, cache: dict | None = None) -> None:
    """Refuse, before any weights load, what the runtime would refuse after loading them: a decoded image
    beyond the free memory (above the base size), and, with MemoryConfig on, the planner's whole-call plan
    (every stage, every VAE pass). One line with the numbers and command-line remedies."""
    from .techniques.memory import estimate as mp

    info, memory = model.info, model.config.memory
    above = height * width > info.base_height * info.base_width
    budget = memory.max_memory if memory.enabled and memory.max_memory else None
    planned = memory.enabled and (above or not memory.above_base_only)
    if not above and not planned:
        return
    cfg = _uses_cfg(model, guidance, true_cfg)
    key = (height, width, steps, cfg)
    if cache is not None and key in cache:
        if cache[key] is not None:
            raise CliError(f"{where} {width}x{height}: {cache[key]}")
        return
    problem = None
    try:
        if above:
            mp.check_request(height, width, device, budget, "the request")
        if planned:
            _plan_call(model, height, width, steps, cfg, dtype, device, budget)
    except mp.MemoryBudgetError as err:
        problem = _memory_remedies(model, str(err), height, width, steps, cfg, dtype, device, budget)
    except ValueError as err:  # e.g. no budget given and no way to read this device's free memory
        problem = f"the memory planner cannot plan it on {device}: {err}"
    if cache is not None:
        cache[key] = problem
    if problem is not None:
        raise CliError(f"{where} {width}x{height}: {problem}")


def _memory_remedies(model: Model, refusal: str, height: int, width: int, steps: int, cfg: bool, dtype, device: str,
                     budget) -> str:
    """The planner's numbers without its Python advice, and what to do on the command line."""
    import torch

    from .techniques.memory import estimate as mp

    numbers = refusal.split("; try ")[0].split("; ask for at most")[0]
    unit = model.info.size_multiple

    def side(value: float) -> int:  # round sides: the planner's tiled estimates are fastest on them
        step = 256 if value >= 512 and 256 % unit == 0 else unit
        return max(unit, int(value) // step * step)

    fitting = None
    for attempt in range(1, 7):  # sides x 0.7, 0.49, ...: a size that fits, verified by the same plan
        h, w = side(height * 0.7 ** attempt), side(width * 0.7 ** attempt)
        try:
            mp.check_request(h, w, device, budget, "the request")
            if model.config.memory.enabled:
                _plan_call(model, h, w, steps, cfg, dtype, device, budget)
            fitting = (w, h)
            break
        except (mp.MemoryBudgetError, CliError):
            continue
    remedies = [f"--size {fitting[0]}x{fitting[1]} fits" if fitting else "a much smaller --size"]
    if dtype == torch.float32 and "decoded image alone" not in numbers:  # the float32 image floor stays
        remedies.append("--dtype bfloat16 halves the weights and activations")
    if budget is not None:
        remedies.append("a larger memory.max_memory in --config, if that much will be free")
    else:
        remedies.append('if more memory will be free when it runs, say how much in --config, e.g. {"memory": '
                        '{"enabled": true, "max_memory": "48GiB"}}')
    return f"does not fit in memory: {numbers}; try " + "; or ".join(remedies)


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
    strength: float | None = None  # with an input image: how much of it is redrawn (None: the stages' renoise)

    def parameters(self, model: Model, dtype: str, image_digest: str | None = None) -> dict[str, Any]:
        """What decides the image's pixels (its key is their hash); the device does not change the request."""
        from . import __version__

        own = dataclasses.asdict(self)
        if own["strength"] is None:  # absent, not null: renders made before strength existed keep their key
            del own["strength"]
        return {**own, "model": model.id, "weights": model.weights, "dtype": dtype,
                "config": model.config.to_dict(), "image": image_digest, "hires_version": __version__}

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

        from .modular import is_modular, loop_blocks

        self.model = model
        self.device = device
        self.dtype = str(dtype).removeprefix("torch.")
        pipe = model.pipe if not _is_skeleton(model.pipe) else load_pipeline(model.id, dtype)
        pipe.to(device)
        self.modular = is_modular(pipe)
        if self.modular:  # each denoise loop has its own bar (nested ones too)
            for loop in loop_blocks(pipe._blocks):
                loop.set_progress_bar_config(disable=True)
        else:
            pipe.set_progress_bar_config(disable=True)  # Progress shows all stages in one display
        hires.apply(pipe, model.config)
        self.pipe = pipe
        self.guider = getattr(pipe, "guider", None) if self.modular else None  # the folder's own, for items without
        self.call_parameters = (call_parameter_names(pipe) if self.modular
                                else inspect.signature(type(pipe).__call__).parameters)

    def render(self, job: Job, out: Path, progress: Progress, extra: dict[str, Any] | None = None,
               image=None, image_digest: str | None = None) -> None:
        import torch

        call: dict[str, Any] = dict(prompt=job.prompt, height=job.height, width=job.width,
                                    num_inference_steps=job.steps,
                                    generator=torch.Generator("cpu").manual_seed(job.seed),
                                    **progress.callbacks(self.call_parameters))
        if job.negative is not None:
            call["negative_prompt"] = job.negative
        if self.guider is not None and "guidance_scale" not in self.call_parameters:
            self._use_guider_scale(job.guidance)  # a modular pipeline's CFG scale is its guider's
        elif job.guidance is not None:
            call["guidance_scale"] = job.guidance
        if job.true_cfg is not None:
            call["true_cfg_scale"] = job.true_cfg
            call.setdefault("negative_prompt", "")  # true CFG runs only with a negative prompt
        if "use_resolution_binning" in self.call_parameters:
            call["use_resolution_binning"] = False  # --size is the size rendered: PixArt's bins would resize it
        from .guards import NonFiniteOutputError

        try:
            if image is not None:
                from .techniques.structure_guidance import guidance as progressive

                result = progressive.generate(self.pipe, image=image, strength=job.strength, **call)
            elif self.modular:
                result = None
                picture = self.pipe(**call, output="images")[0]
            else:
                result = self.pipe(**call)
        except NonFiniteOutputError as err:
            raise RenderFailed(non_finite_message(err, job, self.model, self.dtype)) from None
        if result is not None:
            picture = result.images[0]
        config = self.model.config
        parameters = job.parameters(self.model, self.dtype, image_digest)
        record = {**dataclasses.asdict(job), "key": batch.parameters_key(parameters), "model": self.model.id,
                  "family": self.model.info.name, "dtype": self.dtype, "device": self.device,
                  "hires": {name: dataclasses.asdict(config.technique(name)) for name in config.enabled_techniques()},
                  "request": parameters, **(extra or {})}
        from .io import write_png_atomically

        text = {"parameters": job.parameters_text(self.model.id, self.model.info.name),
                batch.PNG_JSON_KEY: batch.dumps(record)}
        try:
            write_png_atomically(picture, out, text)
        except OSError as err:
            kept = keep_render(picture, out, text)
            where = f"the render is kept at {kept}" if kept else "it could not be kept anywhere either"
            raise RenderFailed(f"{out} could not be written ({err.strerror or err}); {where}", kept,
                               stops_batch=True) from None


    def _use_guider_scale(self, scale: float | None) -> None:
        """The folder's guider, at `scale` where one is given (a batch item without one gets the folder's)."""
        guider = self.guider
        if scale is not None and scale != guider.guidance_scale:
            guider = type(guider).from_config({**guider.config, "guidance_scale": scale})
        if self.pipe.guider is not guider:
            self.pipe.update_components(guider=guider)


# Each call argument the guard may blame, as the command line spells it.
CLI_OPTIONS = {"guidance_scale": "--guidance", "true_cfg_scale": "--true-cfg"}


def non_finite_message(err, job: Job, model: Model, dtype: str) -> str:
    """A NonFiniteOutputError in the command line's words: its options and remedies."""
    nan, inf, total = err.counts
    what = "non-finite latents" if err.stage == "latents" else "a non-finite decoded image"
    head = (f"the render of {job.width}x{job.height} (seed {job.seed}) ended with {what} ({nan} NaN and "
            f"{inf} infinite of {total} values); no PNG was written")
    if err.kind == "guidance":
        cause = f"{CLI_OPTIONS.get(err.parameter, err.parameter)} {err.value!r} overflows; use a scale of 1 to 20"
    elif err.kind == "weights":
        cause = (f"the weights of {err.component} hold NaN or infinity ({err.component}.{err.tensor}): the files of "
                 f"--model {model.id!r} are damaged or come from a diverged training run; re-download or re-save them")
    elif err.kind == "float16":
        cause = "float16 arithmetic overflowed; use --dtype bfloat16 (or --dtype float32)"
    else:
        cause = str(err).split("likely cause: ", 1)[-1]
    return f"{head}; likely cause: {cause}"


def _is_skeleton(pipe) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Module) and any(p.is_meta for p in m.parameters())
               for m in pipe.components.values())


def read_image(path: str, option: str = "--image"):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError:
        raise CliError(f"{option} {path!r} declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels, as a decompression "
                       "bomb does; scale it down first (hires upscales it)") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:  # PIL's ways of saying "damaged"
        raise CliError(f"{option} {path!r} cannot be read as an image: {err}") from None


def file_digest(path: str) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:24]


def model_for(options: argparse.Namespace, request: Request, config_values, dtype) -> Model:
    """The model's facts for the checks: from its configs alone where it is a local folder (no weights
    loaded), else from the loaded pipeline (a hub id must be downloaded before its configs can be read)."""
    path = local_model(options.model)
    pipe = load_pipeline_skeleton(path) if path is not None else load_pipeline(options.model, dtype)
    model = describe_model(options, request, config_values, pipe)
    model.weights = weights_identity(path) if path is not None else hub_weights_identity(options.model)
    return model


# -- commands -----------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    request = read_request(args)
    out = Path(args.out)
    check_output_file(out)
    if request.size is not None:
        check_size_bound(*request.size, "--size")
    if args.image is not None and "structure_guidance" in args.disable:
        raise CliError("--image upscales with structure guidance; it conflicts with --disable structure_guidance")
    strength = None if args.strength is None else _check(
        check_strength, _number_from_text(args.strength, float), "--strength")
    if strength is not None and args.image is None:
        raise CliError(f"--strength {args.strength} needs --image: it says how much of that picture is redrawn")
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
                              None if image is None else (image.height, image.width), strength)
        model = model_for(args, request, config_values, dtype)
        check_steps_for_model(model, request.steps, "--steps")
        if image is not None:
            check_picture_size(model, image, f"--image {args.image!r}")
        if image is not None and request.scale is not None:  # with --image, --scale is a factor of the picture
            height, width = picture_scaled(model, image, request.scale)
        else:
            height, width = resolve_size(model, request.size, request.scale, "--size")
        stages = planned_stages(model, height, width, request.steps,
                                None if image is None else (image.height, image.width), strength)
        if image is None:  # an upscale's own passes start from the picture: the runtime plans those
            check_memory(model, height, width, request.steps, request.guidance, request.true_cfg, dtype, device,
                         "--size")
        prove_output_folder(out.parent, [out.name], png_bytes_bound(height, width), f"--out {str(out)!r}: its folder")
        renderer = Renderer(model, device, dtype)
        job = Job(args.prompt, args.negative, height, width, request.steps, request.guidance, request.seed,
                  request.true_cfg, strength)
        progress = Progress(sum(s or 0 for *_, s in stages), args.quiet)
        progress.begin("", sum(s is not None for *_, s in stages))
        try:
            renderer.render(job, out, progress, image=image,
                            image_digest=file_digest(args.image) if args.image is not None else None)
        except KeyboardInterrupt:
            progress.close()
            raise Interrupted(f"interrupted; {out} was not written") from None
        finally:
            progress.close()
    if not args.quiet:
        print(f"wrote {out} ({width}x{height}, {model.info.name}, seed {request.seed}, {device})")
    return 0


def check_picture_size(model: Model, image, where: str) -> None:
    from .modular import is_modular

    if is_modular(model.pipe):
        raise CliError(f"{where}: {type(model.pipe).__name__} is a Modular Diffusers pipeline, where hires' staged "
                       "techniques refuse image-to-image calls; generate without a picture")
    unit = model.info.size_multiple
    if min(image.width, image.height) < unit:
        raise CliError(f"{where} is {image.width}x{image.height} pixels; an upscale starts from at least "
                       f"{unit}x{unit} (this model's size multiple)")


def picture_scaled(model: Model, image, scale: float) -> tuple[int, int]:
    """(height, width) of --scale times the --image picture, at the model's size multiple."""
    unit = model.info.size_multiple
    height, width = (max(unit, round(side * scale / unit) * unit) for side in (image.height, image.width))
    check_size_bound(height, width, f"--scale {scale:g}")
    for side, value in (("height", height), ("width", width)):
        _check_size_multiple(model.info, side, value, f"--scale {scale:g} of the {image.width}x{image.height} picture")
    return height, width


def print_plan(args, request: Request, config_values, device: str, dtype, image_size, strength=None) -> int:
    """--dry-run: the stages, steps and memory estimate of a request, without loading weights."""
    from .runtime import estimate_adaptations
    from .techniques.memory.estimate import MemoryBudgetError, format_bytes, plan

    path = local_model(args.model)
    if path is None:
        raise CliError(f"--dry-run reads configs only from a local pipeline folder; --model {args.model!r} is not one "
                       f"(no {MODEL_INDEX} or {MODULAR_INDEX})")
    model = describe_model(args, request, config_values, load_pipeline_skeleton(path))
    check_steps_for_model(model, request.steps, "--steps")
    info, config = model.info, model.config
    height, width = resolve_size(model, request.size, None, "--size")
    stages = planned_stages(model, height, width, request.steps, image_size, strength)
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
    if image_size is None:
        try:  # the same check a run makes before it loads the weights
            check_memory(model, height, width, request.steps, request.guidance, request.true_cfg, dtype, device,
                         "--size")
            print("verdict: a run would load the weights and render (the whole-call memory check passes)")
        except CliError as err:
            print(f"verdict: a run would stop before loading the weights: {err}")
            status = 2
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
    with_picture = next((item for item in items if "image" in item.overrides), None)
    if with_picture is not None:  # as --image does: its upscale is structure guidance's
        if "structure_guidance" in args.disable:
            raise CliError(f"{with_picture.where}: 'image' upscales with structure guidance; it conflicts with "
                           "--disable structure_guidance")
        args.enable = [*args.enable, "structure_guidance"]
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
        verdicts: dict = {}  # one memory plan per distinct size, steps and guidance
        pictures: dict = {}  # item index -> (path, digest, (height, width)) of its input picture
        jobs = [_batch_job(args, request, model, item, dtype, device, verdicts, pictures)
                for item in items]  # every item checked before any render
        digests = [pictures[item.index][1] if item.index in pictures else None for item in items]
        dtype_name = str(dtype).removeprefix("torch.")
        keys = [batch.parameters_key(job.parameters(model, dtype_name, d)) for job, d in zip(jobs, digests)]
        entries = [(item, key, job.parameters(model, dtype_name, d))
                   for item, key, job, d in zip(items, keys, jobs, digests)]
        records = {item.filename: batch.read_png_record(out_dir / item.filename) for item in items}
        for item in items:  # hires replaces its own renders only, never a file it did not write
            target = out_dir / item.filename
            if records[item.filename] is None and (target.exists() or target.is_symlink()):
                raise CliError(f"{item.where}: {str(target)!r} exists and is not a hires render (it carries no hires "
                               "record); move it away or give the item another 'name'")
        pending = [(item, job) for item, key, job in zip(items, keys, jobs)
                   if (records[item.filename] or {}).get("key") != key]
        prove_output_folder(out_dir, [item.filename for item in items] + [batch.MANIFEST],
                            sum(png_bytes_bound(job.height, job.width) for _, job in pending) + 2**20, "--out",
                            images=len(pending))
        lease = batch.lease_folder(out_dir, batch.parameters_fingerprint(entries),
                                   {"file": str(Path(args.file).absolute()), "options": _batch_options(args, model)})
        try:
            rendered, elsewhere, lost = _render_shard(args, state, model, device, dtype, out_dir, items, jobs, keys,
                                                      entries, pictures)
            state.wait_for_everyone()
            manifest = _write_manifest(out_dir, entries, str(args.file), lost)
        finally:
            lease.release()
    failed = [e for e in manifest["items"] if e["status"] == "failed"]
    if state.is_main_process:
        if not args.quiet:
            busy = f", {elsewhere} being rendered by another process" if elsewhere else ""
            print(f"{manifest['done']}/{manifest['total']} items done in {out_dir} (rendered {rendered} here{busy})")
        for entry in failed:
            print(f"hires batch: error: {args.file}:{entry['line']}: {entry['error'].get('error', '?')}",
                  file=sys.stderr)
        if failed:
            print(f"hires batch: {len(failed)} of {manifest['total']} items failed (no PNG written; see "
                  f"{out_dir / batch.MANIFEST}); the same command retries them", file=sys.stderr)
    if lost is not None:
        raise lost
    return 1 if failed else 0


def _batch_options(args, model: Model) -> dict[str, Any]:
    """The options a batch's items share, for telling a second batch on its folder what differs."""
    return {"--steps": args.steps, "--seed": args.seed, "--size": args.size, "--scale": args.scale,
            "--guidance": args.guidance, "--true-cfg": args.true_cfg, "--negative": args.negative,
            "--model": model.id, "weights": model.weights, "--dtype": args.dtype,
            "config": batch.parameters_key(model.config.to_dict())}


def _write_manifest(out_dir: Path, entries, source: str, lost: RenderFailed | None) -> dict[str, Any]:
    try:
        return batch.write_manifest(out_dir, entries, source)
    except OSError as err:
        if lost is None:
            raise RenderFailed(f"{out_dir / batch.MANIFEST} could not be written ({err.strerror or err}); the PNGs "
                               "stay, and the same command rewrites it") from None
        raise lost from None


def _batch_job(args, request: Request, model: Model, item: batch.BatchItem, dtype=None, device: str = "cpu",
               verdicts: dict | None = None, pictures: dict | None = None) -> Job:
    size = item.overrides.get("size")
    path = item.overrides.get("image")
    image = None
    if path is not None:  # read now, so a picture that cannot be used stops the batch before its first render
        image = read_image(path, f"{item.where}: image")
        check_picture_size(model, image, f"{item.where}: image {path!r}")
        if pictures is not None:
            pictures[item.index] = (path, file_digest(path), (image.height, image.width))
    if size is not None:
        height, width = resolve_size(model, parse_size(size, "size"), None, f"{item.where}: size")
    elif image is not None and request.scale is not None:
        height, width = picture_scaled(model, image, request.scale)
    else:
        height, width = resolve_size(model, request.size, request.scale, "--size")
    seed = item.overrides.get("seed")
    if seed is None:
        seed = _check(check_seed, request.seed + item.index, f"{item.where}: seed (--seed {request.seed} + item "
                                                              f"index {item.index})")
    steps = item.overrides.get("steps", request.steps)
    check_steps_for_model(model, steps, f"{item.where}: steps" if "steps" in item.overrides else "--steps")
    strength = item.overrides.get("strength")
    picture_size = None if image is None else (image.height, image.width)
    try:  # a plan the sampling layer would refuse, refused now
        planned_stages(model, height, width, steps, picture_size, strength)
    except CliError as err:
        raise CliError(f"{item.where}: {err}") from None
    job = Job(item.prompt, item.overrides.get("negative", args.negative), height, width, steps,
              item.overrides.get("guidance", request.guidance), seed, request.true_cfg, strength)
    if dtype is not None and image is None:  # an upscale's own passes start from the picture: the runtime plans those
        check_memory(model, height, width, steps, job.guidance, job.true_cfg, dtype, device,
                     f"{item.where}: {'size' if size is not None else '--size'}", verdicts)
    return job


def _render_shard(args, state, model, device, dtype, out_dir, items, jobs, keys, entries, pictures=None):
    """Render this process's share of the items that are not done; returns (rendered, claimed elsewhere,
    the RenderFailed that stopped it or None). An item whose render is non-finite is recorded as failed
    and the others go on; a PNG that cannot be written stops the batch (its folder took no more)."""
    with state.split_between_processes(list(range(len(items)))) as mine:
        done = {i for i in mine if batch.is_finished(out_dir, items[i], keys[i])}
        for i in done:
            if batch.has_leftovers(out_dir, items[i]):
                batch.clean_leftovers(out_dir, items[i])
        todo = [i for i in mine if i not in done]
    if not todo:
        return 0, 0, None
    renderer = Renderer(model, device, dtype)
    pictures = pictures or {}
    plans = {i: planned_stages(model, jobs[i].height, jobs[i].width, jobs[i].steps,
                               pictures[items[i].index][2] if items[i].index in pictures else None, jobs[i].strength)
             for i in todo}
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
                start = progress.bar.n
                try:
                    picture = _batch_picture(item, pictures.get(item.index))
                    renderer.render(jobs[i], out_dir / item.filename, progress,
                                    {"index": item.index, "line": item.line, "process": state.process_index,
                                     "pid": os.getpid()}, image=picture,
                                    image_digest=pictures[item.index][1] if picture is not None else None)
                except RenderFailed as err:
                    progress.skip(max(0, steps - (progress.bar.n - start)))
                    extra = {"kept": str(err.kept)} if err.kept else {}
                    batch.record_failure(out_dir, item, keys[i], str(err), **extra)
                    if err.stops_batch:
                        return rendered, elsewhere, RenderFailed(f"{item.where}: {err}; the batch stopped there "
                                                                 "(the same command resumes)", err.kept)
                    continue
                batch.clear_failure(out_dir, item)
                rendered += 1
            finally:
                claim.release()
    except KeyboardInterrupt:
        progress.close()
        manifest = batch.write_manifest(out_dir, entries, str(args.file))
        raise Interrupted(f"interrupted; {manifest['done']}/{manifest['total']} finished PNGs kept in {out_dir} "
                          "(the same command resumes)") from None
    finally:
        progress.close()
    return rendered, elsewhere, None


def _batch_picture(item: batch.BatchItem, picture):
    """An item's input picture, read again at its render: the one the batch was checked with, or a failed item."""
    if picture is None:
        return None
    path, digest, _ = picture
    try:
        changed = file_digest(path) != digest
    except OSError as err:
        raise RenderFailed(f"image {path!r} cannot be read any more ({err.strerror or err})") from None
    if changed:
        raise RenderFailed(f"image {path!r} changed after the batch was checked; the same command renders it anew")
    return read_image(path, f"{item.where}: image")


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
                        help="a saved diffusers pipeline folder (classic or Modular Diffusers) or a hub id "
                             "(default: the embedded testbed model, "
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
    parser.add_argument("--seed", default=0,
                        help="random seed in [0, 2**63); batch items without one get seed + index")
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
                                                   "generating the base image; --scale is then a factor of its size")
    gen.add_argument("--strength", default=None,
                     help="with --image: how much of the picture is redrawn, 0 (the upscaled picture through the VAE) "
                          "to 1 (regenerated from noise, guided by the picture's low band); default: structure "
                          "guidance's renoise (the family preset's, hires.presets; 0.5 or more at 8 steps or fewer)")
    gen.add_argument("--dry-run", action="store_true",
                     help="print the plan (stages, steps, memory estimate) from the model's configs, load no weights")
    _common_options(gen)
    gen.set_defaults(run=cmd_generate)

    bat = sub.add_parser("batch", help="render every prompt of a .txt / .jsonl / .csv file; a rerun resumes",
                         formatter_class=_HelpFormatter, allow_abbrev=False,
                         description="A rerun keeps each PNG whose parameters (prompt, negative, seed, size, "
                                     "steps, guidance, model and its weights, dtype, config, hires version) are "
                                     "unchanged and renders the rest; several runs of one parameter set on one "
                                     "folder share the work. Exit status: 0 all done, 1 a render failed (see "
                                     "manifest.json), 2 an input error.")
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
    except RenderFailed as err:
        print(f"hires {args.command}: error: {err}", file=sys.stderr)
        return 1
    except batch.FolderBusy as err:
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
