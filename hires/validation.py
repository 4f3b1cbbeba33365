"""Checks every config uses: field types against annotations, choices, ranges, module maps.

A config field declares what it takes with `option(default, low=..., high=..., choices=...)`, and
`typed` checks every field of the class before the class's own (cross-field) checks: the type its
annotation names, then the choices, then the range; a float (or each float of a tuple) must be finite
(a config file's 1e309 is inf, refused) unless its range includes inf. Errors name the field, the value
and what would work. Torch-free, imports nothing of hires: the technique configs
(hires.techniques.<name>.config) and HiresConfig (hires.config) build on it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
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


BOUNDS = "hires.bounds"
CHOICES = "hires.choices"


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range of a number: [low, high], either end open or absent. NaN is never in it, inf only where
    `high` is inf and closed (math.inf as a value that means "off")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        infinity_allowed = self.high == math.inf and not self.high_open
        if math.isnan(value) or (math.isinf(value) and not (value > 0 and infinity_allowed)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, integral: bool = False) -> str:
        kind = "an int" if integral else "a finite number"
        if self.low is not None and self.high is not None and math.isfinite(self.high):
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {opening}{_number(self.low)}, {_number(self.high)}{closing}"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_number(self.low)}")
        if self.high is not None and math.isfinite(self.high):
            parts.append(f"{'<' if self.high_open else '<='} {_number(self.high)}")
        text = f"{kind} {' and '.join(parts)}".strip()
        return text + (" (or math.inf)" if self.high == math.inf and not self.high_open else "")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def option(default: Any = None, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, choices: tuple | None = None, **metadata: Any):
    """A config field taking `default`, with its range (of each number, for a tuple) and/or its choices."""
    if low is not None or high is not None:
        metadata[BOUNDS] = Bounds(low, high, low_open, high_open)
    if choices is not None:
        metadata[CHOICES] = tuple(choices)
    return dataclasses.field(default=default, metadata=metadata)


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
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not Bounds(minimum).holds(factor):
            raise ValueError(f"{owner}.{name}[{module!r}]={factor!r} must be a finite number >= {minimum}")
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
    fractions = isinstance(value, tuple) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in value)
    ok = fractions and value[0] <= value[1]
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
        if unit in _UNITS and amount > 0 and math.isfinite(amount):
            return int(amount * _UNITS[unit])
    raise ValueError(f"{name}={value!r} must be a positive number of bytes or a string like '24GiB' or '80GB'")


def per_stage(owner: str, name: str, value: Any, check, expected: str) -> Any:
    """A value for every stage, or a tuple with one value per stage; each checked by `check` (a predicate or
    the `Bounds` of a number: finite where they do not include inf)."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    holds = check.holds if isinstance(check, Bounds) else check
    for v in values:
        number_ok = not isinstance(check, Bounds) or (isinstance(v, (int, float)) and not isinstance(v, bool))
        if v is not None and (isinstance(v, bool) or not number_ok or not holds(v)):
            raise ValueError(f"{owner}.{name}={value!r}: each value must "
                             f"be {expected} (one for all stages, or a tuple "
                             "per stage)")
    return tuple(value) if isinstance(value, list) else value


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
        if part == "float" and isinstance(value,
                                          (int, float)) and not isinstance(value, bool) and not math.isnan(value):
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
    """Check every field of a config before the class's own checks run: its type against its annotation (a
    string "no" must not switch a technique on, a bare number must not stand for a pair), its choices, and
    each number's range (declared with `option`; finite unless the range includes inf). JSON lists are taken
    where a tuple is expected. Fields typed `Any` (or a bare `tuple`) are checked by the class."""
    own = getattr(cls, "__post_init__", None)

    def check(self):
        for f in dataclasses.fields(self):
            annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "Any")
            value = getattr(self, f.name)
            if isinstance(value, list) and "tuple" in annotation:
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
                object.__setattr__(self, f.name, value)
            if annotation in ("Any", "tuple", "tuple | None") or STAGE_SETTINGS in f.metadata:
                continue
            _check_field(cls.__name__, f, value, annotation)

    if own is None:  # the dataclass's __init__ calls no __post_init__: check after it
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            check(self)

        cls.__init__ = __init__
    else:
        @functools.wraps(own)
        def __post_init__(self):
            check(self)
            own(self)

        cls.__post_init__ = __post_init__
    return cls


def _check_field(owner: str, f: dataclasses.Field, value: Any, annotation: str) -> None:
    choices = f.metadata.get(CHOICES)
    listed = f"; choose one of {', '.join(map(repr, choices))}" if choices else ""
    if not _matches(value, annotation):
        shown = f"the string {value!r}" if isinstance(value, str) else repr(value)
        raise TypeError(f"{owner}.{f.name}={shown} is not valid: it must be {_describe(annotation)}{listed}")
    if choices and value is not None and value not in choices:
        raise ValueError(f"{owner}.{f.name}={value!r} is not valid{listed}")
    numbers = value if isinstance(value, tuple) else (value,)
    numbers = [v for v in numbers if isinstance(v, (int, float)) and not isinstance(v, bool)]
    bounds = f.metadata.get(BOUNDS, Bounds())
    integral = "float" not in annotation
    for number in numbers:
        if not bounds.holds(number):
            shown = repr(value) if len(numbers) == 1 and not isinstance(value, tuple) else f"{value!r}: {number!r}"
            raise ValueError(f"{owner}.{f.name}={shown} must be {bounds.describe(integral)}")


def validate_size(name: str, value: Any, multiple: int, family_name: str) -> None:
    """A requested image side must be a positive integer multiple of the family's size multiple."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int (pixels), a "
                        f"positive multiple of {multiple} for {family_name}")
    if value <= 0:
        raise ValueError(f"{name}={value} must be positive: use a positive multiple of {multiple} for {family_name}")
    if value % multiple:
        lower = max(multiple, value - value % multiple)
        raise ValueError(
            f"{name}={value} is not a multiple of {multiple}, which {family_name} requires "
            f"(VAE factor x patch size, and the pipeline's own rule); use {lower} or {lower + multiple}"
        )
