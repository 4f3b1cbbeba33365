"""Checks every config uses: field types against annotations, choices, fractions and ranges, module maps.

Torch-free, imports nothing of hires: the technique configs (hires.techniques.<name>.config) and
HiresConfig (hires.config) build on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from typing import Any, Mapping


def closest_names(name: str, valid: list[str] | tuple[str, ...], n: int = 3) -> str:
    """A short 'did you mean' hint listing the valid names closest to `name`."""
    close = difflib.get_close_matches(name, list(valid), n=n, cutoff=0.5)
    pool = close or list(valid)[:n]
    return ", ".join(repr(v) for v in pool)


def from_mapping(cls: type, values: Mapping[str, Any], where: str):
    """Build dataclass `cls` from a mapping; unknown keys are an error, never dropped."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{where} must be a mapping of option names to values, got {json_words(values)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in fields:
            raise TypeError(
                f"unknown option {where}.{key}={value!r}; valid options of {where} are: "
                f"{', '.join(fields)} (closest: {closest_names(key, list(fields))})"
            )
    return cls(**values)


def json_words(value: Any) -> str:
    """`value` as a config file spells it (true, null, [1, 2], "text"), where JSON can."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# Field metadata: the field holds per-stage settings (one value, or one per stage) of the technique
# it names, as that technique's config (StructureGuidanceConfig.apg: APGConfigs). HiresConfig checks
# their type against the catalogue and builds them from a config file's mappings.
STAGE_SETTINGS = "hires.stage_settings"


def stage_settings(technique: str) -> dict[str, str]:
    """The metadata of a field holding per-stage settings of `technique`."""
    return {STAGE_SETTINGS: technique}


def is_technique_config(value: Any) -> bool:
    """Whether `value` is a technique config (a dataclass instance with an `enabled` field)."""
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)
            and "enabled" in {f.name for f in dataclasses.fields(value)})


def choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def fraction(owner: str, name: str, value: Any, low_open: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        raise ValueError(f"{owner}.{name}={value!r} must be a fraction of the schedule in {'(0, 1]' if low_open else '[0, 1]'}")


def step_range(owner: str, start: float, stop: float) -> None:
    fraction(owner, "start", start)
    fraction(owner, "stop", stop)
    if start >= stop:
        raise ValueError(f"{owner}.start={start} must be below {owner}.stop={stop} (fractions of the schedule)")


def factor_map(owner: str, name: str, value: Any, minimum: float) -> tuple[tuple[str, float], ...] | None:
    """Accept a dict or pairs of module name -> factor; store as sorted pairs (hashable, frozen)."""
    if value is None:
        return None
    items = value.items() if isinstance(value, Mapping) else value
    pairs = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"{owner}.{name} must map module names to factors, got item {item!r}")
        module, factor = item
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= minimum:
            raise ValueError(f"{owner}.{name}[{module!r}]={factor!r} must be a number >= {minimum}")
        pairs.append((module, float(factor)))
    return tuple(sorted(pairs))


def require_unet(owner: str, info, instead: str) -> None:
    if not info.family.is_unet:
        raise ValueError(
            f"{owner} acts on UNet convolutions; family {info.name!r} is a diffusion transformer "
            f"without them. For {info.name!r} use {instead}"
        )


def require_unmasked_attention(owner: str, info) -> None:
    reason = info.family.attention_masked
    if reason:
        raise ValueError(f"{owner}(enabled=True) does not apply to family {info.name!r}: {reason}; disable it for "
                         "this model")


def require_rewritable_attention(owner: str, info) -> None:
    reason = info.family.attention_unsupported
    if reason:
        raise ValueError(f"{owner}(enabled=True) does not apply to family {info.name!r}: {reason}")


def step_window(owner: str, name: str, value: Any) -> tuple[float, float] | None:
    """A [start, stop) window of schedule fractions; start == stop switches that part off."""
    if value is None:
        return None
    ok = isinstance(value, tuple) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in value) and value[0] <= value[1]
    if not ok:
        raise ValueError(f"{owner}.{name}={value!r} must be (start, stop) fractions of the schedule with "
                         "0 <= start <= stop <= 1, e.g. (0.0, 0.4); (0.0, 0.0) turns that part off")
    return float(value[0]), float(value[1])


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str, name: str) -> int:
    """24 * 2**30, "24GiB", "24 GB" -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("abgikmtB")
        unit = text[len(number):]
        try:
            amount = float(number)
        except ValueError:
            amount = -1
        if unit in _UNITS and amount > 0:
            return int(amount * _UNITS[unit])
    raise ValueError(f"{name}={value!r} must be a positive number of bytes or a string like '24GiB' or '80GB'")


def per_stage(owner: str, name: str, value: Any, check, expected: str) -> Any:
    """A value for every stage, or a tuple with one value per stage; each checked by `check`."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        if v is not None and (isinstance(v, bool) or not check(v)):
            raise ValueError(f"{owner}.{name}={value!r}: each value must be {expected} (one for all stages, or a tuple per stage)")
    return tuple(value) if isinstance(value, list) else value


def positive_number(owner: str, name: str, value: Any, allow_zero: bool = False) -> None:
    if not (value > 0 or (allow_zero and value == 0)):
        raise ValueError(f"{owner}.{name}={value!r} must be a number {'>= 0' if allow_zero else '> 0'}")


def _describe(annotation: str) -> str:
    words = {"bool": "True or False (a JSON boolean)", "int": "an integer", "float": "a number", "str": "a string",
             "None": "None (null)", "tuple[float, float]": "a pair of numbers (low, high)",
             "tuple[float, ...]": "a sequence of numbers", "tuple[str, ...]": "a sequence of strings"}
    return " or ".join(words.get(part.strip(), part.strip()) for part in annotation.split("|"))


def _matches(value: Any, annotation: str) -> bool:
    """Whether `value` is of the field type written as `annotation` (the simple forms configs use)."""
    for part in (p.strip() for p in annotation.split("|")):
        if part == "None" and value is None:
            return True
        if part == "bool" and isinstance(value, bool):
            return True
        if part == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if part == "float" and isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            return True
        if part == "str" and isinstance(value, str):
            return True
        if part.startswith("tuple[") and isinstance(value, tuple):
            inner = [p.strip() for p in part[len("tuple["):-1].split(",")]
            if inner[-1] == "...":
                if all(_matches(v, inner[0]) for v in value):
                    return True
            elif len(value) == len(inner) and all(_matches(v, t) for v, t in zip(value, inner)):
                return True
    return False


def typed(cls: type) -> type:
    """Check every field of a config against its annotation before the class's own checks run: a string
    "no" must not switch a technique on, and a bare number must not stand for a pair. JSON lists are
    taken where a tuple is expected. Fields typed `Any` (or a bare `tuple`) are checked by the class."""
    own = cls.__post_init__

    def __post_init__(self):
        for f in dataclasses.fields(self):
            annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "Any")
            value = getattr(self, f.name)
            if isinstance(value, list) and "tuple" in annotation:
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
                object.__setattr__(self, f.name, value)
            if annotation in ("Any", "tuple", "tuple | None") or STAGE_SETTINGS in f.metadata:
                continue
            if not _matches(value, annotation):
                shown = f"the string {value!r}" if isinstance(value, str) else repr(value)
                raise TypeError(f"{cls.__name__}.{f.name}={shown} is not valid: it must be {_describe(annotation)}")
        own(self)

    cls.__post_init__ = __post_init__
    return cls


def validate_size(name: str, value: Any, multiple: int, family_name: str) -> None:
    """A requested image side must be a positive integer multiple of the family's size multiple."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int (pixels), a positive multiple of {multiple} for {family_name}")
    if value <= 0:
        raise ValueError(f"{name}={value} must be positive: use a positive multiple of {multiple} for {family_name}")
    if value % multiple:
        lower = max(multiple, value - value % multiple)
        raise ValueError(
            f"{name}={value} is not a multiple of {multiple}, which {family_name} requires "
            f"(VAE factor x patch size, and the pipeline's own rule); use {lower} or {lower + multiple}"
        )
