"""The technique record: what each technique declares about itself, in one place.

A technique module defines its installer and one `Technique` record naming its config type, the
order its installer runs in and its capabilities; `hires.runtime.TECHNIQUE_MODULES` lists the
built-in modules. A technique from outside hires registers its record with `register` and its
config goes into `HiresConfig(extensions=(...))`.

This module sits with the configs at the bottom of the layers: it imports nothing of hires.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

# What a technique may declare, and what reads it.
CAPABILITIES = {
    "stages": "runs the call as nested stage calls through the stage engine (hires.sampling.stages)",
    "whole_cfg_batch": "needs both CFG halves in one denoiser call: the memory planner's sequential CFG cannot run beside it",
    "attention_processors": "replaces the denoiser's attention processors",
    "torch_sdpa": "changes torch's scaled_dot_product_attention call (needs a torch SDPA attention backend)",
    "guidance": "combines the CFG pair inside the denoiser hook (hires.techniques.guidance)",
    "scheduler": "changes the scheduler's schedule or shift",
    "vae": "changes how the VAE runs",
}


@dataclasses.dataclass(frozen=True)
class Technique:
    name: str  # the HiresConfig field (built-in) or the extension's own name
    config_type: type
    install: Callable[[Any, Any], None]  # install(attachment, config), from hires.apply
    order: int  # installers run in ascending order; the stage techniques first
    capabilities: frozenset[str] = frozenset()

    def __post_init__(self):
        unknown = sorted(set(self.capabilities) - set(CAPABILITIES))
        if unknown:
            raise ValueError(f"Technique {self.name!r}: unknown capabilities {unknown}; known: {', '.join(CAPABILITIES)}")
        if not (dataclasses.is_dataclass(self.config_type) and "enabled" in
                {f.name for f in dataclasses.fields(self.config_type)}):
            raise TypeError(f"Technique {self.name!r}: config_type={self.config_type!r} must be a dataclass with an "
                            "'enabled' field")


_EXTENSIONS: dict[str, Technique] = {}


def register(technique: Technique) -> Technique:
    """Add a technique from outside hires; its config then goes into `HiresConfig(extensions=...)`."""
    if not isinstance(technique, Technique):
        raise TypeError(f"register({technique!r}) takes a hires.registry.Technique")
    clash = _EXTENSIONS.get(technique.name)
    if clash is not None and clash != technique:
        raise ValueError(f"a technique named {technique.name!r} is registered already; unregister it first")
    _EXTENSIONS[technique.name] = technique
    return technique


def unregister(name: str) -> None:
    _EXTENSIONS.pop(name, None)


def extensions() -> list[Technique]:
    return list(_EXTENSIONS.values())


def extension_for(config_type: type) -> Technique | None:
    return next((t for t in _EXTENSIONS.values() if t.config_type is config_type), None)
