"""Configuration: frozen dataclasses, and every configuration error raised here.

`HiresConfig` holds one sub-config per technique. A sub-config is a frozen dataclass with an
`enabled` switch; each technique adds its own field here. The default `HiresConfig()` turns every
technique off, so applying it changes no computation.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
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
    to plain diffusers. Installers run in their records' order (hires.registry.Technique.order).
    """

    structure_guidance: StructureGuidanceConfig = dataclasses.field(default_factory=lambda: StructureGuidanceConfig())
    flow_alignment: FlowAlignmentConfig = dataclasses.field(default_factory=lambda: FlowAlignmentConfig())
    bottleneck: BottleneckConfig = dataclasses.field(default_factory=lambda: BottleneckConfig())
    skip_residual: SkipResidualConfig = dataclasses.field(default_factory=lambda: SkipResidualConfig())
    dilated_sampling: DilatedSamplingConfig = dataclasses.field(default_factory=lambda: DilatedSamplingConfig())
    redilation: RedilationConfig = dataclasses.field(default_factory=lambda: RedilationConfig())
    entropy_scaling: EntropyScalingConfig = dataclasses.field(default_factory=lambda: EntropyScalingConfig())
    window_attention: WindowAttentionConfig = dataclasses.field(default_factory=lambda: WindowAttentionConfig())
    attention_backend: AttentionBackendConfig = dataclasses.field(default_factory=lambda: AttentionBackendConfig())
    apg: APGConfig = dataclasses.field(default_factory=lambda: APGConfig())
    rau_net: RAUNetConfig = dataclasses.field(default_factory=lambda: RAUNetConfig())
    scale_fusion: ScaleFusionConfig = dataclasses.field(default_factory=lambda: ScaleFusionConfig())
    positions: PositionConfig = dataclasses.field(default_factory=lambda: PositionConfig())
    memory: MemoryConfig = dataclasses.field(default_factory=lambda: MemoryConfig())
    vae_tiling: VAETilingConfig = dataclasses.field(default_factory=lambda: VAETilingConfig())
    # Configs of techniques registered from outside hires (hires.registry.register), one per technique.
    extensions: tuple = ()
    # The model's training size in pixels (a side, or (height, width)) where its configs do not say it
    # (e.g. a Flux fine-tune at 512 px: FluxPipeline assumes 1024); None: read from the model.
    base_size: int | tuple[int, int] | None = None

    def __post_init__(self):
        for f in self._technique_fields():
            expected = _SUBCONFIG_TYPES[f.type]
            value = getattr(self, f.name)
            if not isinstance(value, expected):
                raise TypeError(f"HiresConfig.{f.name}={value!r} must be a hires.{expected.__name__}")
        from .registry import extension_for

        if isinstance(self.base_size, list):
            object.__setattr__(self, "base_size", tuple(self.base_size))
        sides = self.base_size if isinstance(self.base_size, tuple) else (self.base_size,) * 2
        if self.base_size is not None and not (len(sides) == 2 and all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sides)):
            raise TypeError(f"HiresConfig.base_size={self.base_size!r} must be a positive int (pixels per side), a "
                            "(height, width) pair of them, or None to read it from the model")
        if not isinstance(self.extensions, tuple):
            raise TypeError(f"HiresConfig.extensions={self.extensions!r} must be a tuple of registered technique configs")
        seen = set()
        for value in self.extensions:
            if extension_for(type(value)) is None:
                raise TypeError(f"HiresConfig.extensions entry {value!r} is not the config of a registered technique; "
                                "register it with hires.registry.register(Technique(...)) first")
            if type(value) in seen:
                raise ValueError(f"HiresConfig.extensions holds two {type(value).__name__} entries; give one")
            seen.add(type(value))

    @classmethod
    def _technique_fields(cls) -> list:
        return [f for f in dataclasses.fields(cls) if f.type in _SUBCONFIG_TYPES]

    def technique_config(self, technique) -> Any:
        """This config's sub-config for `technique` (a hires.registry.Technique), or None."""
        if technique.name in {f.name for f in self._technique_fields()}:
            return getattr(self, technique.name)
        return next((v for v in self.extensions if type(v) is technique.config_type), None)

    def enabled_techniques(self) -> list[str]:
        names = [f.name for f in self._technique_fields() if getattr(self, f.name).enabled]
        return names + [type(v).__name__ for v in self.extensions if v.enabled]

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
        for sub in [getattr(self, f.name) for f in self._technique_fields()] + list(self.extensions):
            if sub.enabled and hasattr(sub, "validate_for"):
                sub.validate_for(family)
        if self.flow_alignment.enabled and not self.structure_guidance.enabled:
            raise ValueError("FlowAlignmentConfig(enabled=True) guides structure guidance's upscaled stages; enable "
                             "StructureGuidanceConfig(enabled=True) as well (HiresConfig.structure_guidance)")


# Type names of sub-config fields (as written in annotations) -> class, for `from_dict`.
_SUBCONFIG_TYPES: dict[str, type] = {}


def _choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def _fraction(owner: str, name: str, value: Any, low_open: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        raise ValueError(f"{owner}.{name}={value!r} must be a fraction of the schedule in {'(0, 1]' if low_open else '[0, 1]'}")


def _step_range(owner: str, start: float, stop: float) -> None:
    _fraction(owner, "start", start)
    _fraction(owner, "stop", stop)
    if start >= stop:
        raise ValueError(f"{owner}.start={start} must be below {owner}.stop={stop} (fractions of the schedule)")


def _factor_map(owner: str, name: str, value: Any, minimum: float) -> tuple[tuple[str, float], ...] | None:
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


def _require_unet(owner: str, info, instead: str) -> None:
    if info.family.architecture != "unet":
        raise ValueError(
            f"{owner} acts on UNet convolutions; family {info.name!r} is a diffusion transformer "
            f"without them. For {info.name!r} use {instead}"
        )


@dataclasses.dataclass(frozen=True)
class RedilationConfig:
    """Re-dilated / dispersed convolutions and noise-damped guidance (ScaleCrafter), UNets only.

    `None` fields take the family's preset for the requested size (see hires.techniques.redilation).
    """

    enabled: bool = False
    # module name (or block prefix such as "mid_block") -> dilation factor (fractional allowed, >= 1)
    dilations: Any = None
    # dilation is active while the step's fraction of the schedule is below this...
    stop_fraction: float | None = None
    # ...or, instead, while the scheduler timestep is at least this (give one or the other)
    min_timestep: float | None = None
    progressive: bool | None = None  # decay the factor over the active steps, never below 2
    # dispersed convolution: 3x3 kernels mapped to 5x5 by the least-squares map, on these modules
    dispersion_modules: tuple[str, ...] | None = None
    dispersion_stop_fraction: float | None = None
    dispersion_eta: float = 0.05  # weight of the pixel-level term
    # noise-damped guidance: weak-dilation uncond + w * (strong cond - strong uncond)
    noise_damped_guidance: bool | None = None
    ndcfg_dilations: Any = None
    ndcfg_stop_fraction: float | None = None

    def __post_init__(self):
        owner = "RedilationConfig"
        object.__setattr__(self, "dilations", _factor_map(owner, "dilations", self.dilations, 1.0))
        object.__setattr__(self, "ndcfg_dilations", _factor_map(owner, "ndcfg_dilations", self.ndcfg_dilations, 1.0))
        _fraction(owner, "stop_fraction", self.stop_fraction, low_open=True)
        _fraction(owner, "dispersion_stop_fraction", self.dispersion_stop_fraction)
        _fraction(owner, "ndcfg_stop_fraction", self.ndcfg_stop_fraction)
        if self.stop_fraction is not None and self.min_timestep is not None:
            raise ValueError(
                f"{owner}: stop_fraction={self.stop_fraction} and min_timestep={self.min_timestep} conflict; "
                "give one (fraction of the schedule) or the other (timestep threshold)"
            )
        if self.dispersion_modules is not None:
            object.__setattr__(self, "dispersion_modules", tuple(self.dispersion_modules))
        if not (isinstance(self.dispersion_eta, (int, float)) and self.dispersion_eta >= 0):
            raise ValueError(f"{owner}.dispersion_eta={self.dispersion_eta!r} must be a number >= 0")

    def validate_for(self, info) -> None:
        _require_unet("RedilationConfig", info, "EntropyScalingConfig, PositionConfig or progressive structure guidance")


@dataclasses.dataclass(frozen=True)
class EntropyScalingConfig:
    """Scale each attention layer's softmax temperature by sqrt(ln N / ln T) (Jin et al. 2023).

    N is the layer's key count in this call, T its key count at the base size, both clamped >= 2.
    """

    enabled: bool = False
    # "self": image self-attention only (cross-attention keys are text tokens, factor 1); "all": every layer
    layers: str = "self"
    # joint text-image attention (SD3, Flux): "exclude" counts image keys only in N and T; "include" counts
    # the text keys in both
    text_tokens: str = "exclude"

    def __post_init__(self):
        _choice("EntropyScalingConfig", "layers", self.layers, ("self", "all"))
        _choice("EntropyScalingConfig", "text_tokens", self.text_tokens, ("exclude", "include"))

    def validate_for(self, info) -> None:
        _require_rewritable_attention("EntropyScalingConfig", info)


def _require_unmasked_attention(owner: str, info) -> None:
    reason = info.family.attention_masked
    if reason:
        raise ValueError(f"{owner}(enabled=True) does not apply to family {info.name!r}: {reason}; disable it for "
                         "this model")


def _require_rewritable_attention(owner: str, info) -> None:
    reason = info.family.attention_unsupported
    if reason:
        raise ValueError(f"{owner}(enabled=True) does not apply to family {info.name!r}: {reason}")


@dataclasses.dataclass(frozen=True)
class WindowAttentionConfig:
    """Image self-attention in windows holding the base size's token count, shifted per step."""

    enabled: bool = False
    # window side in tokens; None: the layer's base-size token count at the call's aspect ratio
    window: int | None = None
    shift: bool = True  # shift windows every step by offsets drawn from the call's generator

    def __post_init__(self):
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"WindowAttentionConfig.window={self.window!r} must be a positive int (tokens) or None")

    def validate_for(self, info) -> None:
        _require_rewritable_attention("WindowAttentionConfig", info)


ATTENTION_BACKENDS = ("native", "flash", "_native_flash", "_native_efficient", "_native_math", "xformers", "sage", "flex")


@dataclasses.dataclass(frozen=True)
class AttentionBackendConfig:
    """Which attention kernel runs, through diffusers' own attention dispatcher / SDPA backends."""

    enabled: bool = False
    backend: str = "native"

    def __post_init__(self):
        _choice("AttentionBackendConfig", "backend", self.backend, ATTENTION_BACKENDS)

    def validate_for(self, info) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class APGConfig:
    """Adaptive projected guidance (Sadat et al., ICLR 2025) for pipelines running CFG.

    `None` fields take the family preset (see hires.techniques.apg).
    """

    enabled: bool = False
    eta: float | None = None  # weight of the guidance part parallel to the conditional prediction
    norm_threshold: float | None = None  # r: the guidance update's norm is clipped to this (math.inf: off)
    momentum: float | None = None  # beta, negative for the paper's reverse momentum; 0: off
    space: str = "x0"  # "x0": on the denoised prediction as in the paper; "output": on the raw model output
    start: float = 0.0  # active for steps whose schedule fraction is in [start, stop)
    stop: float = 1.0

    def __post_init__(self):
        owner = "APGConfig"
        _choice(owner, "space", self.space, ("x0", "output"))
        _step_range(owner, self.start, self.stop)
        if self.norm_threshold is not None and not (self.norm_threshold > 0):
            raise ValueError(f"{owner}.norm_threshold={self.norm_threshold!r} must be > 0 (math.inf turns clipping off)")
        if self.momentum is not None and not (-1 < self.momentum < 1):
            raise ValueError(f"{owner}.momentum={self.momentum!r} must be in (-1, 1); the paper uses negative values")
        if self.eta is not None and not (self.eta >= 0 and math.isfinite(self.eta)):
            raise ValueError(f"{owner}.eta={self.eta!r} must be a finite number >= 0")

    def validate_for(self, info) -> None:
        if info.family.guidance_layout == "none":
            raise ValueError(
                f"APGConfig changes how classifier-free guidance combines, but family {info.name!r} never runs CFG "
                f"(its {info.family.guidance_scale_name} feeds a distilled guidance embedding); disable APGConfig "
                "for this model"
            )


@dataclasses.dataclass(frozen=True)
class PositionConfig:
    """Positional extrapolation for diffusion transformers (PixArt-Sigma, SD3, Flux).

    `None` fields take the family default (see hires.techniques.positions).
    """

    enabled: bool = False
    # Flux RoPE: "none" (plain integer positions), "interpolation" (PI), "ntk" (NTK-aware base), "yarn"
    rope: str | None = None
    yarn_beta_fast: float | None = None  # YaRN ramp ends, in rotations over the base grid
    yarn_beta_slow: float | None = None
    # SD3's learned table past pos_embed_max_size: "interpolate" (resize the table) or "extrapolate"
    table: str | None = None
    # PixArt-Sigma's sin-cos interpolation scale (positions are i * base / N / scale)
    interpolation_scale: float | None = None
    # flow families' timestep shift at high token counts: "dynamic" (diffusers' own, unbounded),
    # "clamp" (dynamic mu clamped to its value at the base size), "static" (a fixed shift)
    timestep_shift: str | None = None
    shift: float | None = None  # for timestep_shift="static"
    # RoPE families, DyPE: the YaRN ramps / NTK factor follow the noise level of each step
    # (kappa = sigma^2: full extrapolation at pure noise, fading as sigma -> 0); None: off
    timestep_dependent: bool | None = None

    def __post_init__(self):
        owner = "PositionConfig"
        if self.timestep_dependent and self.rope in ("none", "interpolation"):
            raise ValueError(f"{owner}.timestep_dependent=True (DyPE) scales the YaRN ramps or the NTK factor by the "
                             f"noise level; rope={self.rope!r} has neither. Use rope='yarn' (DyPE's default) or 'ntk'")
        if self.rope is not None:
            _choice(owner, "rope", self.rope, ("none", "interpolation", "ntk", "yarn"))
        if self.table is not None:
            _choice(owner, "table", self.table, ("interpolate", "extrapolate"))
        if self.timestep_shift is not None:
            _choice(owner, "timestep_shift", self.timestep_shift, ("dynamic", "clamp", "static"))
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"{owner}.shift={self.shift!r} must be > 0")
        if self.shift is not None and self.timestep_shift not in (None, "static"):
            raise ValueError(f"{owner}.shift={self.shift} conflicts with timestep_shift={self.timestep_shift!r}; "
                             "a fixed shift needs timestep_shift='static'")
        if self.interpolation_scale is not None and not self.interpolation_scale > 0:
            raise ValueError(f"{owner}.interpolation_scale={self.interpolation_scale!r} must be > 0")
        betas = (self.yarn_beta_fast, self.yarn_beta_slow)
        if any(b is not None for b in betas):
            if self.rope not in (None, "yarn"):
                raise ValueError(f"{owner}: yarn_beta_fast/yarn_beta_slow={betas} act only with rope='yarn' "
                                 f"(got rope={self.rope!r}); use rope='yarn' or drop them")
            if None not in betas and not betas[0] > betas[1] > 0:
                raise ValueError(f"{owner}: needs yarn_beta_fast > yarn_beta_slow > 0 (rotations over the base grid), "
                                 f"got yarn_beta_fast={betas[0]!r}, yarn_beta_slow={betas[1]!r}")

    def validate_for(self, info) -> None:
        if info.family.architecture != "dit":
            raise ValueError(
                f"PositionConfig changes a diffusion transformer's positional encoding; family {info.name!r} "
                "is a UNet and has none. For UNets use RedilationConfig, EntropyScalingConfig or progressive "
                "structure guidance"
            )


def _step_window(owner: str, name: str, value: Any) -> tuple[float, float] | None:
    """A [start, stop) window of schedule fractions; start == stop switches that part off."""
    if value is None:
        return None
    ok = isinstance(value, tuple) and len(value) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in value) and value[0] <= value[1]
    if not ok:
        raise ValueError(f"{owner}.{name}={value!r} must be (start, stop) fractions of the schedule with "
                         "0 <= start <= stop <= 1, e.g. (0.0, 0.4); (0.0, 0.0) turns that part off")
    return float(value[0]), float(value[1])


@dataclasses.dataclass(frozen=True)
class RAUNetConfig:
    """RAU-Net (HiDiffusion): in the early steps, a down block's downsampler runs at stride 4 (dilation 2)
    and a cross-attention down block average-pools 2x after its first layer, so the deep UNet levels
    see a base-size feature map; the matching up blocks resize back. UNets only.

    `None` fields take the family's facts for the requested size (hires.families.RAUNetFacts).
    """

    enabled: bool = False
    downsampler: str | None = None  # module name of the strided downsampler, e.g. "down_blocks.0.downsamplers.0"
    downsampler_steps: tuple[float, float] | None = None  # [start, stop) schedule fractions it is active in
    pooled_block: str | None = None  # module name of the pooled down block, e.g. "down_blocks.1"
    pooled_steps: tuple[float, float] | None = None
    upsample_mode: str = "bicubic"  # how the matching up block resizes the pooled features back

    def __post_init__(self):
        owner = "RAUNetConfig"
        object.__setattr__(self, "downsampler_steps", _step_window(owner, "downsampler_steps", self.downsampler_steps))
        object.__setattr__(self, "pooled_steps", _step_window(owner, "pooled_steps", self.pooled_steps))
        _choice(owner, "upsample_mode", self.upsample_mode, ("bicubic", "bilinear", "nearest"))

    def validate_for(self, info) -> None:
        _require_unet("RAUNetConfig", info, "WindowAttentionConfig, EntropyScalingConfig or progressive structure "
                      "guidance")
        if info.family.rau_net is None and (self.downsampler is None or self.pooled_block is None
                                            or self.downsampler_steps is None or self.pooled_steps is None):
            raise ValueError(f"RAUNetConfig: family {info.name!r} has no RAU-Net facts (hires.families.RAUNetFacts); "
                             "give downsampler, downsampler_steps, pooled_block and pooled_steps explicitly")


@dataclasses.dataclass(frozen=True)
class ScaleFusionConfig:
    """FreeScale's scale fusion in image self-attention above the base size: a global branch (full
    attention) for the high frequencies and a local branch (overlapping base-size windows) for the low
    ones, out = G(local) + (global - G(global)) with G a Gaussian blur over the token grid.
    """

    enabled: bool = False
    global_branch: str = "full"  # "full" self-attention, or "dilated": FreeScale's fast mode (interleaved sub-grids)
    window: int | None = None  # local window side in tokens; None: the layer's grid side at the base size
    jitter: bool = True  # shift interior windows by up to 1/8 window, drawn from the call's generator
    blur_sigma: float = 1.0  # G's sigma in tokens; its kernel side is 2 * ceil(scale) - 1 (FreeScale)

    def __post_init__(self):
        owner = "ScaleFusionConfig"
        _choice(owner, "global_branch", self.global_branch, ("full", "dilated"))
        if self.window is not None and self.window < 2:
            raise ValueError(f"{owner}.window={self.window!r} must be an int >= 2 (tokens) or None")
        if not (self.blur_sigma > 0 and math.isfinite(self.blur_sigma)):
            raise ValueError(f"{owner}.blur_sigma={self.blur_sigma!r} must be a finite number > 0")

    def validate_for(self, info) -> None:
        _require_rewritable_attention("ScaleFusionConfig", info)
        _require_unmasked_attention("ScaleFusionConfig", info)


@dataclasses.dataclass(frozen=True)
class VAETilingConfig:
    """Tiled VAE decode/encode with whole-image GroupNorm statistics (no seams, no tone shifts)."""

    enabled: bool = False
    mode: str = "auto"  # "auto": tile when the memory planner says so; "always"; "never"
    tile_size: int | None = None  # tile side in latent pixels; None: chosen by the planner
    halo: int | None = None  # context around each tile in latent pixels; None: enough for exact results

    def __post_init__(self):
        owner = "VAETilingConfig"
        _choice(owner, "mode", self.mode, ("auto", "always", "never"))
        for name in ("tile_size", "halo"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "tile_size" else 0)):
                raise ValueError(f"{owner}.{name}={value!r} must be a {'positive' if name == 'tile_size' else 'non-negative'} int (latent pixels) or None")

    def validate_for(self, info) -> None:
        reason = info.family.vae_untileable
        if reason:
            raise ValueError(f"VAETilingConfig(enabled=True) does not apply to family {info.name!r}: {reason}")


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """The memory planner: estimate peak memory up front, choose tiling / chunking, refuse what cannot fit."""

    enabled: bool = False
    max_memory: int | str | None = None  # bytes or "24GiB"; None: the device's free memory
    feed_forward_chunks: int | None = None  # None: chosen by the planner; 1: no chunking
    sequential_cfg: bool | None = None  # run the uncond/cond halves one after the other; None: planner
    # plan and tile only calls above the model's base area (the automatic preset: base-size calls stay plain diffusers)
    above_base_only: bool = False

    def __post_init__(self):
        owner = "MemoryConfig"
        if self.max_memory is not None:
            object.__setattr__(self, "max_memory", parse_bytes(self.max_memory, f"{owner}.max_memory"))
        if self.feed_forward_chunks is not None and (not isinstance(self.feed_forward_chunks, int) or self.feed_forward_chunks < 1):
            raise ValueError(f"{owner}.feed_forward_chunks={self.feed_forward_chunks!r} must be a positive int or None")

    def validate_for(self, info) -> None:
        reason = info.family.vae_untileable
        if reason:
            raise ValueError(f"MemoryConfig(enabled=True) does not apply to family {info.name!r}: the planner's "
                             f"way out of a large decode is hires' tiled VAE, and {reason}")


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


def _per_stage(owner: str, name: str, value: Any, check, expected: str) -> Any:
    """A value for every stage, or a tuple with one value per stage; each checked by `check`."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        if v is not None and (isinstance(v, bool) or not check(v)):
            raise ValueError(f"{owner}.{name}={value!r}: each value must be {expected} (one for all stages, or a tuple per stage)")
    return tuple(value) if isinstance(value, list) else value


def _apg_entries(owner: str, value: Any) -> Any:
    """Per-stage APG settings read from a config file arrive as mappings: build APGConfigs."""
    def build(entry):
        return _from_mapping(APGConfig, entry, f"{owner}.apg") if isinstance(entry, Mapping) else entry
    return tuple(build(v) for v in value) if isinstance(value, (tuple, list)) else build(value)


@dataclasses.dataclass(frozen=True)
class StructureGuidanceConfig:
    """Progressive structure guidance (DiffuseHigh): base size -> upscale -> re-noise -> guided denoise.

    Each stage's guide is the low-frequency wavelet band of the upscaled previous result. `None`
    fields take the family preset (see hires.sampling.progressive). Per-stage fields accept one
    value for every stage or a tuple with one value per stage after the base generation.
    """

    enabled: bool = False
    # intermediate stages between the base size and the requested size: pixel sides (int: square, or
    # (height, width)) or factors of the base side (float); the requested size is always the last stage
    stages: tuple | None = None
    # fraction of the schedule re-run at each stage, in (0, 1] (DiffuseHigh: 15/50); None: 0.3. On schedules of
    # 8 steps or fewer (distilled models) at least 0.5, so a stage runs two of four steps rather than one
    renoise: Any = None
    guided_steps: Any = None  # steps at the start of each stage that get the low-band swap (DiffuseHigh: 5)
    guided_fraction: float = 1 / 3  # where guided_steps is None: this share of each stage's steps (DiffuseHigh: 5 of 15)
    # how the guide lets go: "fade" moves the low band toward the guide's by 1 - k/g in guided step k (from 0) of g,
    # so no single late step hands the whole low band back to the model's own CFG-extrapolated prediction (on
    # short stages that flipped colours); "hard" swaps it whole in each guided step and not after (DiffuseHigh)
    handover: str = "fade"
    wavelet: str = "db4"
    wavelet_level: int = 1
    sharpen_alpha: float = 1.0  # unsharp mask (1 + a) x - a blur(x) of the upscaled guide; 0: off
    sharpen_sigma: tuple[float, float] = (0.1, 2.0)  # blur sigma drawn per stage from the call's generator
    guidance_scale: Any = None  # CFG scale per stage; None: the call's own
    # APG per stage (an APGConfig); None: HiresConfig.apg, which also rules the base generation;
    # APGConfig(enabled=False): plain CFG in that stage
    apg: Any = None
    space: str = "pixel"  # where the guide's low band is swapped: "pixel" (a VAE round trip per guided step, the paper) or "latent"
    # where the previous stage is upscaled: "pixel" (one decode + encode per stage) or "latent"; None: as `space`
    upscale_space: str | None = None
    upscale: str = "bicubic"
    # clamp the upscaled (and sharpened) guide to the range of the source pixels around it: no ringing halo
    anti_ringing: bool = True
    # stage sizes when `stages` is None: "linear" adds one base side per stage (DiffuseHigh: 1024 -> 2048 -> 3072
    # -> 4096); "doubling" doubles the side per stage (FreeScale, HiFlow: 1024 -> 2048 -> 4096)
    ladder: str = "linear"

    def __post_init__(self):
        owner = "StructureGuidanceConfig"
        if self.stages is not None:
            stages = tuple(self.stages)
            for stage in stages:
                ok = (isinstance(stage, float) and stage > 1) or (isinstance(stage, int) and not isinstance(stage, bool) and stage > 0) or (
                    isinstance(stage, (tuple, list)) and len(stage) == 2 and all(isinstance(v, int) and v > 0 for v in stage))
                if not ok:
                    raise ValueError(f"{owner}.stages entry {stage!r} must be a pixel side (int), (height, width), "
                                     "or a float factor > 1 of the base side")
            object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "renoise", _per_stage(owner, "renoise", self.renoise,
                                                        lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a fraction of the schedule in (0, 1]"))
        object.__setattr__(self, "guided_steps", _per_stage(owner, "guided_steps", self.guided_steps,
                                                             lambda v: isinstance(v, int) and v >= 0, "a whole number of steps >= 0"))
        object.__setattr__(self, "guidance_scale", _per_stage(owner, "guidance_scale", self.guidance_scale,
                                                               lambda v: isinstance(v, (int, float)) and v >= 0, "a guidance scale >= 0"))
        object.__setattr__(self, "apg", _per_stage(owner, "apg", _apg_entries(owner, self.apg),
                                                    lambda v: isinstance(v, APGConfig), "a hires.APGConfig or None"))
        _fraction(owner, "guided_fraction", self.guided_fraction, low_open=True)
        _choice(owner, "space", self.space, ("latent", "pixel"))
        _choice(owner, "handover", self.handover, ("hard", "fade"))
        if self.upscale_space is not None:
            _choice(owner, "upscale_space", self.upscale_space, ("latent", "pixel"))
            if self.space == "pixel" and self.upscale_space == "latent":
                raise ValueError(f"{owner}.upscale_space='latent' cannot feed space='pixel' (a pixel guide needs the "
                                 "upscaled pixels); use upscale_space='pixel' or None, or space='latent'")
        _choice(owner, "upscale", self.upscale, ("bicubic", "bilinear", "lanczos"))
        _choice(owner, "ladder", self.ladder, ("linear", "doubling"))
        if not (isinstance(self.wavelet_level, int) and self.wavelet_level >= 1):
            raise ValueError(f"{owner}.wavelet_level={self.wavelet_level!r} must be an int >= 1")
        if not (isinstance(self.sharpen_alpha, (int, float)) and self.sharpen_alpha >= 0):
            raise ValueError(f"{owner}.sharpen_alpha={self.sharpen_alpha!r} must be a number >= 0")
        low, high = self.sharpen_sigma
        if not (0 < low <= high):
            raise ValueError(f"{owner}.sharpen_sigma={self.sharpen_sigma!r} must be (low, high) with 0 < low <= high")

    def validate_for(self, info) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class BottleneckConfig:
    """Bottleneck sampling (high -> low -> high): most steps at a lower resolution, a fraction of the cost.

    `None` fields take the default schedule (see hires.sampling.bottleneck).
    """

    enabled: bool = False
    # each stage's side as a factor of the requested side; must start and end at 1.0 (the request)
    scales: tuple[float, ...] = (1.0, 0.5, 1.0)
    # share of the call's steps each stage runs (sums to 1); None: the default schedule
    step_fractions: tuple[float, ...] | None = None
    resample: str = "lanczos"  # how latents move between stages: "lanczos" or "bicubic"
    # noise level re-injected at each transition, as a fraction of the schedule; None: default
    renoise: tuple[float, ...] | None = None
    # per-stage timestep shift for flow families; None: default
    shifts: tuple[float, ...] | None = None

    def __post_init__(self):
        owner = "BottleneckConfig"
        scales = tuple(self.scales)
        if len(scales) < 3 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 for v in scales):
            raise ValueError(f"{owner}.scales={self.scales!r} must be 3 or more side factors in (0, 1], e.g. (1.0, 0.5, 1.0)")
        if scales[0] != 1.0 or scales[-1] != 1.0:
            raise ValueError(f"{owner}.scales={self.scales!r} must start and end at 1.0: bottleneck sampling begins "
                             "and returns to the requested size")
        object.__setattr__(self, "scales", scales)
        if self.step_fractions is not None:
            fractions = tuple(self.step_fractions)
            if len(fractions) != len(scales) or any(not (isinstance(v, (int, float)) and v > 0) for v in fractions) \
                    or abs(sum(fractions) - 1) > 1e-6:
                raise ValueError(f"{owner}.step_fractions={self.step_fractions!r} needs one positive share per stage "
                                 f"({len(scales)}) summing to 1")
            object.__setattr__(self, "step_fractions", fractions)
        for name in ("renoise", "shifts"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(value)
            expected = len(scales) - 1 if name == "renoise" else len(scales)
            check = (lambda v: 0 < v <= 1) if name == "renoise" else (lambda v: v > 0)
            if len(value) != expected or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not check(v) for v in value):
                what = "one fraction in (0, 1] per transition" if name == "renoise" else "one positive shift per stage"
                raise ValueError(f"{owner}.{name}={getattr(self, name)!r} needs {what} ({expected})")
            object.__setattr__(self, name, value)
        _choice(owner, "resample", self.resample, ("lanczos", "bicubic"))

    def validate_for(self, info) -> None:
        return None


def _positive_number(owner: str, name: str, value: Any, allow_zero: bool = False) -> None:
    if not (value > 0 or (allow_zero and value == 0)):
        raise ValueError(f"{owner}.{name}={value!r} must be a number {'>= 0' if allow_zero else '> 0'}")


@dataclasses.dataclass(frozen=True)
class SkipResidualConfig:
    """DemoFusion's skip residual: each step of an upscaled stage blended toward its noised start.

    In each stage that starts from an upscaled previous result, every step's latent is blended toward
    that result noised to the step's timestep (one noise draw per stage).

    z = (1 - c1) z + c1 noised_upscaled(t), c1 = cosf(t) ** exponent (hires.sampling.skip_residual).
    It acts on the stages of structure guidance (or bottleneck's upscaling stage), which must be on.
    """

    enabled: bool = False
    exponent: float = 3.0  # DemoFusion's cosine_scale_1; FreeScale uses 2.0

    def __post_init__(self):
        _positive_number("SkipResidualConfig", "exponent", self.exponent)

    def validate_for(self, info) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class DilatedSamplingConfig:
    """DemoFusion's dilated sampling: interleaved sub-lattices denoised at the base size, fused in.

    Above the base size, the latent's s_h x s_w interleaved sub-lattices (stride = scale per side,
    rounded) are denoised as base-size latents in one batched call, from a Gaussian-blurred copy, and
    blended into the full-size prediction with weight cosf(t) ** fusion_exponent; with local_windows
    that prediction is MultiDiffusion's mean over overlapping base-size windows
    (hires.techniques.dilated_sampling).
    """

    enabled: bool = False
    fusion_exponent: float = 1.0  # DemoFusion's cosine_scale_2: weight of the dilated prediction
    sigma: float = 1.0  # blur sigma at pure noise (DemoFusion's code default; its demos use 0.8); 0: no blur
    blur_exponent: float = 1.0  # DemoFusion's cosine_scale_3: sigma * (0.99 cosf ** blur_exponent + 0.01)
    max_batch: int | None = None  # sub-lattices per denoiser call (DemoFusion's view_batch_size); None: all
    # MultiDiffusion local paths: the full-size prediction replaced by the mean over overlapping base-size
    # windows (stride window_stride x window, jittered from the call's generator), batched like the sub-lattices
    local_windows: bool = False
    window_stride: float = 0.5  # DemoFusion: stride 64 of a 128 latent window

    def __post_init__(self):
        owner = "DilatedSamplingConfig"
        _positive_number(owner, "fusion_exponent", self.fusion_exponent)
        _positive_number(owner, "sigma", self.sigma, allow_zero=True)
        _positive_number(owner, "blur_exponent", self.blur_exponent)
        if not 0 < self.window_stride <= 1:
            raise ValueError(f"{owner}.window_stride={self.window_stride!r} must be a fraction of the window in (0, 1]")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"{owner}.max_batch={self.max_batch!r} must be a whole number >= 1, or None for one call")

    def validate_for(self, info) -> None:
        family = info.family
        if family.latent_layout not in ("spatial", "packed") or (family.latent_layout == "packed"
                                                                 and "height" not in family.rope_axis_sides):
            raise ValueError(f"DilatedSamplingConfig: {info.name} latents ({family.latent_layout!r} layout) cannot be "
                             "split into sub-lattices: it needs a spatial latent, or packed tokens whose position ids "
                             "name their height and width axes (Family.rope_axis_sides); disable dilated_sampling")
        if family.packed_grid_source != "img_ids" or family.denoiser_io != "tensor":
            raise ValueError(f"DilatedSamplingConfig: {info.name}'s denoiser takes its token grid from "
                             f"{family.packed_grid_source!r} and its latents as a {family.denoiser_io!r}; the sub-lattice "
                             "pass builds per-lattice position ids for Flux-style img_ids and tensor latents only; "
                             "disable dilated_sampling")
        if family.attention_masked:
            raise ValueError(f"DilatedSamplingConfig: {info.name}: {family.attention_masked}; disable dilated_sampling")


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


def _typed(cls: type) -> type:
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
            if annotation in ("Any", "tuple", "tuple | None") or f.name == "apg":
                continue
            if not _matches(value, annotation):
                shown = f"the string {value!r}" if isinstance(value, str) else repr(value)
                raise TypeError(f"{cls.__name__}.{f.name}={shown} is not valid: it must be {_describe(annotation)}")
        own(self)

    cls.__post_init__ = __post_init__
    return cls


for _cls in (BottleneckConfig, StructureGuidanceConfig, RedilationConfig, EntropyScalingConfig, WindowAttentionConfig,
             AttentionBackendConfig, APGConfig, PositionConfig, VAETilingConfig, MemoryConfig, RAUNetConfig,
             ScaleFusionConfig, SkipResidualConfig, DilatedSamplingConfig):
    _SUBCONFIG_TYPES[_cls.__name__] = _typed(_cls)


@dataclasses.dataclass(frozen=True)
class FlowAlignmentConfig:
    """HiFlow's flow-aligned guidance in structure guidance's upscaled stages, flow-matching families only.

    Each step of such a stage, the predicted velocity v is aligned with the reference flow toward the
    stage's upscaled clean latent x_ref (v_ref = (x_t - x_ref) / sigma): its low band moves to v_ref's
    by alpha, then v += beta (v_prev + v_ref - v_ref_prev - v). Both weights decay linearly over the
    stage's steps, (N - i) / N. Per-stage fields take one value for every stage after the base or a
    tuple with one per stage; `None` takes HiFlow's (see hires.sampling.flow_alignment).
    """

    enabled: bool = False
    alphas: Any = None  # direction alignment per stage; None: 1.0 in the first upscaled stage, 0.25 after
    betas: Any = None  # acceleration alignment per stage; None: 0.5
    band: str = "fft"  # "fft": Butterworth low-pass of the 2D FFT; "dwt": the level-1 Haar approximation
    cutoff: float = 0.2  # Butterworth cutoff, as a fraction of the half-band (HiFlow: 0.2)
    order: int = 4  # Butterworth order (HiFlow: 4)

    def __post_init__(self):
        owner = "FlowAlignmentConfig"
        _choice(owner, "band", self.band, ("fft", "dwt"))
        object.__setattr__(self, "alphas", _per_stage(owner, "alphas", self.alphas,
                                                       lambda v: isinstance(v, (int, float)) and 0 <= v <= 1,
                                                       "a weight in [0, 1]"))
        object.__setattr__(self, "betas", _per_stage(owner, "betas", self.betas,
                                                      lambda v: isinstance(v, (int, float)) and 0 <= v <= 1,
                                                      "a weight in [0, 1]"))
        if not 0 < self.cutoff <= 1:
            raise ValueError(f"{owner}.cutoff={self.cutoff!r} must be in (0, 1] (a fraction of the half-band; HiFlow: 0.2)")
        if self.order < 1:
            raise ValueError(f"{owner}.order={self.order!r} must be an int >= 1 (HiFlow: 4)")

    def validate_for(self, info) -> None:
        if info.prediction_type != "flow":
            raise ValueError(
                f"FlowAlignmentConfig aligns a flow-matching model's velocity; family {info.name!r} predicts "
                f"{info.prediction_type!r}. For {info.name!r} use StructureGuidanceConfig alone"
            )


_SUBCONFIG_TYPES[FlowAlignmentConfig.__name__] = _typed(FlowAlignmentConfig)


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
