"""Configuration: frozen dataclasses, and every configuration error raised here.

`HiresConfig` holds one sub-config per technique. A sub-config is a frozen dataclass with an
`enabled` switch; each technique adds its own field here. The default `HiresConfig()` turns every
technique off, so applying it changes no computation.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping


def closest_names(name: str, valid: list[str] | tuple[str, ...], n: int = 3) -> str:
    """A short 'did you mean' hint listing the valid names closest to `name`."""
    close = difflib.get_close_matches(name, list(valid), n=n, cutoff=0.5)
    pool = close or list(valid)[:n]
    return ", ".join(repr(v) for v in pool)


def _from_mapping(cls: type, values: Mapping[str, Any], where: str):
    """Build dataclass `cls` from a mapping; unknown keys are an error, never dropped."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{where} must be a mapping of option names to values, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise TypeError(
                f"unknown option {where}.{key}={value!r}; valid options of {where} are: "
                f"{', '.join(fields)} (closest: {closest_names(key, list(fields))})"
            )
        nested = _SUBCONFIG_TYPES.get(fields[key].type) if isinstance(fields[key].type, str) else None
        kwargs[key] = _from_mapping(nested, value, f"{where}.{key}") if nested and isinstance(value, Mapping) else value
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class HiresConfig:
    """Everything hires does to a pipeline. Each technique owns one field (a frozen sub-config).

    The default turns every technique off: `hires.apply(pipe, HiresConfig())` only validates
    requested sizes and records the per-call state, and the pipeline's output is bit-identical
    to plain diffusers.
    """

    def enabled_techniques(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(getattr(self, f.name), "enabled", False)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "HiresConfig":
        """Build from a nested mapping (e.g. a JSON config file); unknown keys raise `TypeError`."""
        return _from_mapping(cls, values, "HiresConfig")

    def replace(self, **changes: Any) -> "HiresConfig":
        return dataclasses.replace(self, **changes)

    def validate_for(self, family) -> None:
        """Raise if an enabled technique does not apply to `family` (a `hires.families.ModelInfo`)."""
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if getattr(sub, "enabled", False):
                sub.validate_for(family)


# Type names of sub-config fields (as written in annotations) -> class, for `from_dict`.
_SUBCONFIG_TYPES: dict[str, type] = {}


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
            f"(VAE factor x patch size); use {lower} or {lower + multiple}"
        )
