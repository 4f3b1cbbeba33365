"""The technique record: what a technique declares about itself, in one place, and the extensions.

A technique is a package `hires/techniques/<name>/` whose `__init__.py` exports its `Technique` record
(its config type, installer, install order, relations to other techniques); the catalogue
(`hires.techniques`) lists the built-in records, one line each. A technique from outside hires
registers its record with `register`, and from then on takes the same path as a built-in one:
`HiresConfig(extensions=(...))`, `to_dict` / `from_dict` under its name, `hires techniques`,
`hires generate --enable NAME` and `--config`.

This module sits with the configs at the bottom of the layers: torch-free, it imports nothing of hires.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable, Mapping

# What a technique may provide, and what reads it.
CAPABILITIES = {
    "stages": "runs the call as stages of the stage engine (hires.sampling.stages); named by the `requires` "
              "of techniques that act on stages",
    "whole_cfg_batch": "needs both CFG halves in one denoiser call: the memory planner's sequential CFG cannot run "
                       "beside it",
    "torch_sdpa": "replaces torch's scaled_dot_product_attention call (needs a torch SDPA attention backend)",
    "softmax_scale": "changes the attention softmax scale (needs a torch "
                     "SDPA backend where the processors do not hand "
                     "queries to diffusers' dispatcher)",
}
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def resolve(target: Callable | str | None) -> Callable | None:
    """`target` itself, or the object a "package.module:name" string names (imported on first use)."""
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class Technique:
    name: str  # the HiresConfig key, the CLI's --enable NAME
    config_type: type  # a dataclass with an `enabled` field
    # install(attachment, config), from hires.apply; a "package.module:function" string is imported on first
    # install, so the catalogue stays torch-free; None: nothing to install beyond its planner
    install: Callable[[Any, Any], None] | str | None
    order: int  # installers (and planners) run in ascending order; the stage techniques first
    capabilities: frozenset[str] = frozenset()  # what it provides (CAPABILITIES)
    # other techniques (by name) or capabilities this one needs an enabled technique for, with the reason
    requires: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # techniques (by name) that cannot be on beside this one, with the reason
    excludes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # planner(info, config, attachment or None) -> its stage planner (hires.sampling.stages): made by the runtime
    # before the installers run (they find it as attachment.stages.planner(name)), and without a pipeline for
    # the stage plan of a dry run; a "package.module:name" string as for `install`
    planner: Callable[..., Any] | str | None = None
    # adapts_estimate(info, config) -> a hashable callable `adaptation(model)` returning a context manager, or
    # None: what the memory planner's meta-device copy of the denoiser must do to run as this technique
    # makes the real one run (SD3's position table past its end); a "package.module:name" string as above
    adapts_estimate: Callable[..., Any] | str | None = None

    def __post_init__(self):
        if not (isinstance(self.name, str) and _NAME.fullmatch(self.name)):
            raise ValueError(f"Technique name={self.name!r} must be a lower-case identifier (it is a HiresConfig key "
                             "and a command-line name), e.g. 'my_technique'")
        object.__setattr__(self, "capabilities", frozenset(self.capabilities))
        unknown = sorted(self.capabilities - set(CAPABILITIES))
        if unknown:
            raise ValueError(f"Technique {self.name!r}: unknown capabilities "
                             f"{unknown}; known: {', '.join(CAPABILITIES)}")
        if not (dataclasses.is_dataclass(self.config_type) and isinstance(self.config_type, type) and "enabled" in
                {f.name for f in dataclasses.fields(self.config_type)}):
            raise TypeError(f"Technique {self.name!r}: config_type={self.config_type!r} must be a dataclass with an "
                            "'enabled' field")
        for relation in ("requires", "excludes"):
            value = getattr(self, relation)
            if not (isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in value.items())):
                raise TypeError(f"Technique {self.name!r}: {relation}={value!r} must map technique names (or, for "
                                "requires, capabilities) to the reason")

    def installer(self) -> Callable[[Any, Any], None] | None:
        return resolve(self.install)

    def estimate_adaptation(self, info, config):
        """What the memory planner's estimate must do to follow this technique on `info` (None: nothing)."""
        return None if self.adapts_estimate is None else resolve(self.adapts_estimate)(info, config)

    def make_planner(self, info, config, attachment=None):
        """This technique's stage planner for `config` (None: it plans no stages)."""
        return None if self.planner is None else resolve(self.planner)(info, config, attachment)


_EXTENSIONS: dict[str, Technique] = {}
_BUILT_IN: dict[str, Technique] = {}  # filled by the catalogue (hires.techniques) when it loads


def reserve(records) -> None:
    """The catalogue's built-in records: extensions cannot take their names or config types."""
    _BUILT_IN.update({record.name: record for record in records})


def register(technique: Technique) -> Technique:
    """Add a technique from outside hires; its config then goes into `HiresConfig(extensions=...)` and
    every surface (to_dict / from_dict, the command line) knows it by its name."""
    if not isinstance(technique, Technique):
        raise TypeError(f"register({technique!r}) takes a hires.registry.Technique")
    built_in = _BUILT_IN.get(technique.name) or next(
        (r for r in _BUILT_IN.values() if r.config_type is technique.config_type), None)
    if built_in is not None:
        raise ValueError(f"technique {technique.name!r} ({technique.config_type.__name__}) clashes with the built-in "
                         f"technique {built_in.name!r} ({built_in.config_type.__name__}); give it a name and config "
                         "type of its own")
    clash = _EXTENSIONS.get(technique.name) or next(
        (r for r in _EXTENSIONS.values() if r.config_type is technique.config_type), None)
    if clash is not None and clash != technique:
        raise ValueError(f"a technique named {clash.name!r} with config {clash.config_type.__name__} is registered "
                         "already; unregister it first")
    _EXTENSIONS[technique.name] = technique
    return technique


def unregister(name: str) -> None:
    _EXTENSIONS.pop(name, None)


def extensions() -> list[Technique]:
    return list(_EXTENSIONS.values())
