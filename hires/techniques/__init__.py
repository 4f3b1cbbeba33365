"""The catalogue: every built-in technique, one line each, in install order.

A technique is a package here: `config.py` (its config dataclass and checks, torch-free), its
mechanism module(s), and `__init__.py` exporting its `hires.registry.Technique` record. Everything that
dispatches on techniques reads this one list (plus the extensions registered with
`hires.registry.register`): the runtime's installers, HiresConfig's fields and `to_dict` / `from_dict`,
the command line's `--enable` and `hires techniques`, the stage plan. Importing it loads the configs
and records only: mechanisms are imported when a technique is installed.
"""

from __future__ import annotations

import importlib

from .. import registry
from ..registry import Technique
from ..validation import closest_names


def _records(*entries: str) -> tuple[Technique, ...]:
    """Each entry names a package of this one, or "package:RECORD" where it exports more than one."""
    records = []
    for entry in entries:
        package, _, attribute = entry.partition(":")
        records.append(getattr(importlib.import_module(f"{__name__}.{package}"), attribute or "TECHNIQUE"))
    return tuple(records)


BUILT_IN: tuple[Technique, ...] = _records(
    "dilated_sampling",
    "structure_guidance",
    "flow_alignment",
    "bottleneck",
    "skip_residual",
    "redilation",
    "rau_net",
    "window_attention",
    "scale_fusion",
    "entropy_scaling",
    "attention_backend",
    "apg",
    "positions",
    "memory",
    "memory:VAE_TILING",  # the tiled VAE the memory planner chooses: one package with it
)
registry.reserve(BUILT_IN)


def all_techniques() -> list[Technique]:
    """Every technique, built-in and registered, in install order."""
    return sorted((*BUILT_IN, *registry.extensions()), key=lambda record: record.order)


def technique(name: str) -> Technique:
    """The record named `name` (built-in or registered); a ValueError naming the valid ones otherwise."""
    records = {record.name: record for record in all_techniques()}
    if name not in records:
        raise ValueError(f"{name!r} is not a technique; techniques are {', '.join(records)} "
                         f"(closest: {closest_names(name, list(records))})")
    return records[name]


def technique_of(config_type: type) -> Technique | None:
    """The record whose config type is `config_type`, or None."""
    return next((record for record in all_techniques() if record.config_type is config_type), None)
