"""HiresConfig: one frozen sub-config per technique of the catalogue, composed here.

Each technique's config class lives in its package (`hires.techniques.<name>.config`) and the checks
they share in `hires.validation`; HiresConfig's fields are the catalogue's built-in techniques, in
install order, and `extensions` holds the configs of techniques registered from outside hires. Both
kinds take the same path through `technique`, `enabled_techniques`, `to_dict` / `from_dict` (keyed by
the technique's name), `replace` and `validate_for`, which also checks the relations the records
declare (`requires`, `excludes`). The default `HiresConfig()` turns every technique off, so applying
it changes no computation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .techniques import BUILT_IN, all_techniques, technique_of
from .techniques import technique as technique_named
from .validation import STAGE_SETTINGS, closest_names, from_mapping, json_words, parse_bytes, validate_size

# Every built-in technique's config class by name (hires.StructureGuidanceConfig, ...).
CONFIG_CLASSES: dict[str, type] = {record.config_type.__name__: record.config_type for record in BUILT_IN}
globals().update(CONFIG_CLASSES)
_FIELDS = {record.name: record for record in BUILT_IN}
_OWN_KEYS = ("extensions", "base_size")

__all__ = ["HiresConfig", *CONFIG_CLASSES, "closest_names", "parse_bytes", "validate_size"]


class _Composition:
    """HiresConfig's methods (its fields come from the catalogue, see below)."""

    def __post_init__(self):
        for name, record in _FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, record.config_type):
                raise TypeError(f"HiresConfig.{name}={value!r} must be a hires.{record.config_type.__name__}")
        if isinstance(self.base_size, list):
            object.__setattr__(self, "base_size", tuple(self.base_size))
        sides = self.base_size if isinstance(self.base_size, tuple) else (self.base_size,) * 2
        if self.base_size is not None and not (len(sides) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides)):
            raise TypeError(f"HiresConfig.base_size={self.base_size!r} must be a positive int (pixels per side), a "
                            "(height, width) pair of them, or None to read it from the model")
        if isinstance(self.extensions, list):
            object.__setattr__(self, "extensions", tuple(self.extensions))
        if not isinstance(self.extensions, tuple):
            raise TypeError(f"HiresConfig.extensions={self.extensions!r} "
                            f"must be a tuple of registered technique configs")
        seen = set()
        for value in self.extensions:
            record = technique_of(type(value))
            if record is None or record.name in _FIELDS:
                raise TypeError(f"HiresConfig.extensions entry {value!r} is not the config of a registered technique; "
                                "register it with hires.registry.register(Technique(...)) first"
                                + (f" (it is HiresConfig.{record.name})" if record is not None else ""))
            if type(value) in seen:
                raise ValueError(f"HiresConfig.extensions holds two {type(value).__name__} entries; give one")
            seen.add(type(value))
        for record, name, entries, target in self._stage_entries():
            for entry in entries:
                if entry is not None and not isinstance(entry, target.config_type):
                    raise TypeError(f"{record.config_type.__name__}.{name} entry {entry!r} must be a "
                                    f"hires.{target.config_type.__name__} (the "
                                    f"per-stage settings of {target.name}) or None")

    # -- one path for built-in and registered techniques ----------------------------------------
    def technique(self, name: str) -> Any:
        """The sub-config of the technique called `name` (an extension left out: its default config)."""
        record = technique_named(name)
        config = self.technique_config(record)
        return config if config is not None else record.config_type()

    def technique_config(self, record) -> Any:
        """This config's sub-config for `record` (a hires.registry.Technique), or None for an extension left out."""
        if record.name in _FIELDS:
            return getattr(self, record.name)
        return next((v for v in self.extensions if type(v) is record.config_type), None)

    def enabled_techniques(self) -> list[str]:
        """Names of the enabled techniques, in install order."""
        return [record.name for record in all_techniques()
                if (config := self.technique_config(record)) is not None and config.enabled]

    def stage_settings(self) -> dict[str, list]:
        """Per-stage settings that enabled techniques carry for other techniques (e.g.
        StructureGuidanceConfig.apg), by the name of the technique they configure."""
        found: dict[str, list] = {}
        for record, _, entries, target in self._stage_entries():
            if self.technique_config(record).enabled:
                found.setdefault(target.name, []).extend(e for e in entries if e is not None)
        return found

    def stage_settings_fields(self, name: str) -> list[str]:
        """The fields ("StructureGuidanceConfig.apg") through which enabled techniques set `name` per stage."""
        return [f"{record.config_type.__name__}.{field}" for record, field, _, target in self._stage_entries()
                if target.name == name and self.technique_config(record).enabled]

    def _stage_entries(self):
        """(record, field, entries, record of the technique they configure) of every stage-settings field."""
        for record in all_techniques():
            config = self.technique_config(record)
            if config is None:
                continue
            for f in dataclasses.fields(config):
                target = f.metadata.get(STAGE_SETTINGS)
                if target is not None:
                    value = getattr(config, f.name)
                    yield record, f.name, value if isinstance(value, tuple) else (value,), technique_named(target)

    def to_dict(self) -> dict[str, Any]:
        """Every technique's options under its name (extensions too), and base_size: what from_dict reads."""
        values = {name: dataclasses.asdict(getattr(self, name)) for name in _FIELDS}
        values.update({technique_of(type(v)).name: dataclasses.asdict(v) for v in self.extensions})
        values["base_size"] = self.base_size
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "HiresConfig":
        """Build from a nested mapping (e.g. a JSON config file) keyed by technique names, built-in or
        registered; unknown keys raise `TypeError`."""
        if not isinstance(values, Mapping):
            raise TypeError(f"HiresConfig must be a mapping of technique names to their options, got "
                            f"{json_words(values)}")
        fields, extensions = {}, []
        for key, value in values.items():
            if key == "base_size":
                fields[key] = value
                continue
            names = [record.name for record in all_techniques()]
            if key not in names:
                raise TypeError(f"unknown option HiresConfig.{key}={value!r}; valid options of HiresConfig are: "
                                f"{', '.join(names + ['base_size'])} (closest: {closest_names(key, names)})")
            record = technique_named(key)
            if not isinstance(value, Mapping):
                raise TypeError(f"HiresConfig.{key}={json_words(value)} is not valid: expected an object of options "
                                'such as {"enabled": true}')
            config = from_mapping(record.config_type, _stage_settings_built(record.config_type, value, key),
                                  f"HiresConfig.{key}")
            if key in _FIELDS:
                fields[key] = config
            else:
                extensions.append(config)
        return cls(**fields, extensions=tuple(extensions))

    def replace(self, **changes: Any) -> "HiresConfig":
        """A copy with `changes`: fields, base_size, or any technique by name (extensions too)."""
        extensions = {type(v): v for v in self.extensions}
        fields = {}
        for name, value in changes.items():
            if name in _FIELDS or name in _OWN_KEYS:
                fields[name] = value
                continue
            record = technique_named(name)
            if not isinstance(value, record.config_type):
                raise TypeError(f"HiresConfig.{name}={value!r} must be a {record.config_type.__name__}")
            extensions[record.config_type] = value
        if "extensions" not in fields:
            fields["extensions"] = tuple(extensions.values())
        return dataclasses.replace(self, **fields)

    def validate_for(self, family) -> None:
        """Raise if an enabled technique does not apply to `family` (a `hires.families.ModelInfo`) or its
        record's relations (`requires`, `excludes`) are not met."""
        enabled = [technique_named(name) for name in self.enabled_techniques()]
        for record in enabled:
            config = self.technique_config(record)
            if hasattr(config, "validate_for"):
                config.validate_for(family)
        names = {record.name for record in enabled}
        provided = set().union(*(record.capabilities for record in enabled)) if enabled else set()
        for record in enabled:
            own = record.config_type.__name__
            for needed, why in record.requires.items():
                if needed not in names and needed not in provided:
                    raise ValueError(f"{own}(enabled=True) needs {needed}: {why}; {_remedy(needed)}")
            for other, why in record.excludes.items():
                if other in names:
                    other_config = technique_named(other).config_type.__name__
                    raise ValueError(f"{own} and {other_config} cannot both be enabled: {why}")


def _remedy(needed: str) -> str:
    """How to meet a requirement: enable the technique, or one that provides the capability."""
    records = {record.name: record for record in all_techniques()}
    chosen = [records[needed]] if needed in records else [r for r in records.values() if needed in r.capabilities]
    if not chosen:
        return f"no known technique provides {needed!r}"
    return (f"enable {' or '.join(f'{r.config_type.__name__}(enabled=True)' for r in chosen)} as well "
            f"(HiresConfig.{' / '.join(r.name for r in chosen)})")


def _stage_settings_built(cls: type, values: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """`values` with the per-stage settings a config file gives as mappings built into their technique's
    config (e.g. StructureGuidanceConfig.apg entries into APGConfigs)."""
    built = dict(values)
    for f in dataclasses.fields(cls):
        target = f.metadata.get(STAGE_SETTINGS)
        if target is None or f.name not in built:
            continue
        record = technique_named(target)

        def build(entry, name=f.name):
            return from_mapping(record.config_type, entry, f"{where}.{name}") if isinstance(entry, Mapping) else entry

        value = built[f.name]
        built[f.name] = tuple(build(v) for v in value) if isinstance(value, (list, tuple)) else build(value)
    return built


# The fields: one per built-in technique (its config class, default: off), then extensions and base_size.
HiresConfig = dataclasses.make_dataclass(
    "HiresConfig",
    [(record.name, record.config_type.__name__, dataclasses.field(default_factory=record.config_type))
     for record in BUILT_IN]
    + [
        # Configs of techniques registered from outside hires (hires.registry.register), one per technique.
        ("extensions", "tuple", dataclasses.field(default=())),
        # The model's training size in pixels (a side, or (height, width)) where its configs do not say it
        # (e.g. a Flux fine-tune at 512 px: FluxPipeline assumes 1024); None: read from the model.
        ("base_size", "int | tuple[int, int] | None", dataclasses.field(default=None)),
    ],
    bases=(_Composition,), frozen=True, kw_only=True,
    namespace={"__doc__": """Everything hires does to a pipeline: one frozen sub-config per technique of the catalogue
    (hires.techniques), configs of registered techniques in `extensions`, and `base_size`.

    The default turns every technique off: `hires.apply(pipe, HiresConfig())` only validates
    requested sizes and records the per-call state, and the pipeline's output is bit-identical
    to plain diffusers. Installers run in their records' order (hires.registry.Technique.order).
    """},
)
HiresConfig.__module__ = __name__  # make_dataclass names its caller's module only from Python 3.12 on
