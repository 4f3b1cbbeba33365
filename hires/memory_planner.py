"""The memory planner: peak memory of a request estimated up front, without weights.

Estimates come from the real architecture built on the meta device (no weights, no compute):
the denoiser's or VAE's own forward runs on meta tensors while a dispatch mode tracks the bytes of
every live activation; the peak is the estimate. Scaled-dot-product attention is counted as a
memory-efficient kernel (output plus log-sum-exp), which is what flash / memory-efficient /
xformers backends allocate; the N x N matrix the meta device's math fallback would build is not
counted. On CPU a convolution also holds oneDNN's copy of its input and weight (`_KernelWorkspaces`).
The tiled VAE estimate runs the tiled algorithm itself on meta with one tile per pass.

`plan(...)` turns estimates and a budget into a `MemoryPlan` (tile the VAE? chunk feed-forwards?
sequential CFG?) or raises `MemoryBudgetError` with the numbers and what to try.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

GiB = 2**30


class MemoryBudgetError(ValueError):
    """A request that cannot fit in the memory budget, with the numbers and what to try."""


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


# -- counting live bytes on the meta device --------------------------------------------------------
class _LiveBytes(TorchDispatchMode):
    """Tracks bytes of storages created inside the mode that are still referenced; records the peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._wrappers: dict[int, list[int]] = {}  # storage id -> [python wrappers alive, bytes]

    def _track(self, tensor: torch.Tensor) -> None:
        key = tensor.untyped_storage()._cdata
        entry = self._wrappers.get(key)
        if entry is None:
            entry = self._wrappers[key] = [0, tensor.untyped_storage().nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._wrappers.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._wrappers[key]

    def allocate_transient(self, nbytes: int) -> None:
        self.peak = max(self.peak, self.live + nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(a) for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor) not in inputs:
                self._track(tensor)
        return out


class _KernelWorkspaces(TorchFunctionMode):
    """What kernels allocate besides their outputs: scaled-dot-product attention as a memory-efficient
    kernel; on CPU, convolutions' copies of input and weight in oneDNN's blocked layout (measured:
    a conv's peak is its output plus about its input). CUDA convolution workspaces are not modelled."""

    def __init__(self, counter: _LiveBytes, device_type: str):
        super().__init__()
        self.counter = counter
        self.conv_copies = device_type == "cpu"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = args[0] if args else kwargs["query"]
            value = args[2] if len(args) > 2 else kwargs["value"]
            output = query.new_empty(query.shape[:-1] + value.shape[-1:])
            # log-sum-exp per query row, float32: the kernel's only extra buffer.
            self.counter.allocate_transient(math.prod(query.shape[:-1]) * 4)
            return output
        if func is F.conv2d and self.conv_copies:
            x, weight = (args[0] if args else kwargs["input"]), (args[1] if len(args) > 1 else kwargs["weight"])
            output = func(*args, **kwargs)
            self.counter.allocate_transient(x.numel() * x.element_size() + weight.numel() * weight.element_size())
            return output
        return func(*args, **kwargs)


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def meta_peak_bytes(fn: Callable[[], Any], device_type: str | None = None) -> int:
    """Peak bytes of activations `fn` allocates (run it on meta tensors/modules), beyond its inputs,
    when it runs on `device_type` ("cuda" or "cpu"; default: CUDA if available)."""
    counter = _LiveBytes()
    with torch.no_grad(), counter, _KernelWorkspaces(counter, device_type or default_device_type()):
        result = fn()
        del result
    return counter.peak


def module_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None and tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # torch's own `to`: diffusers' warns about float32-kept modules on every cast, here meaningless
    return torch.nn.Module.to(module, dtype).eval()


def meta_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The same architecture (from its config) on the meta device, in `dtype`; no weights are read."""
    with torch.device("meta"):
        copy = type(module).from_config(module.config)
    return _cast(copy, dtype)


@functools.lru_cache(maxsize=64)
def _meta_vae(config_items: tuple, cls: type, dtype: torch.dtype):
    # Lists come back as lists (frozen to tuples for the cache key): AutoencoderKLQwenImage adds to them.
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config_items}
    with torch.device("meta"):
        vae = cls.from_config(config)
    return _cast(vae, dtype)


def _frozen_config(config) -> tuple:
    def freeze(v):
        return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v

    return tuple(sorted((k, freeze(v)) for k, v in dict(config).items() if not k.startswith("_")))


# -- VAE ------------------------------------------------------------------------------------------
def vae_peak_bytes(vae, kind: str, shape: tuple[int, ...], dtype: torch.dtype, tiled: bool,
                   tile_size: int | None = None, grouping: str = "unit", device_type: str | None = None) -> int:
    """Peak activation bytes of `vae` decoding (kind "decode": shape is the latent's) or encoding
    (kind "encode": shape is the image's), untiled or with hires' tiled path, on `device_type`."""
    if kind not in ("decode", "encode"):
        raise ValueError(f"kind={kind!r} must be 'decode' or 'encode'")
    return _vae_peak_cached(type(vae), _frozen_config(vae.config), kind, tuple(shape), dtype, tiled, tile_size, grouping,
                            device_type or default_device_type())


@functools.lru_cache(maxsize=256)
def _vae_peak_cached(cls, config_items, kind, shape, dtype, tiled, tile_size, grouping, device_type) -> int:
    from .techniques import tiled_vae

    vae = _meta_vae(config_items, cls, dtype)
    x = torch.empty(shape, dtype=dtype, device="meta")
    if has_frame_axis(vae):
        if tiled:
            raise ValueError(f"{cls.__name__} is a video VAE (latents with a frame axis); hires does not tile it")
        fn = (lambda: vae._decode(x)) if kind == "decode" else (lambda: vae._encode(x))  # noqa: E731
        return meta_peak_bytes(fn, device_type)
    if kind == "decode":
        if tiled:
            fn = lambda: tiled_vae.tiled_decode(vae, x, tile_size, grouping)  # noqa: E731
        else:
            fn = lambda: vae.decoder(vae.post_quant_conv(x) if vae.post_quant_conv is not None else x)  # noqa: E731
    else:
        if tiled:
            fn = lambda: tiled_vae.tiled_encode(vae, x, tile_size, grouping)  # noqa: E731
        else:
            fn = lambda: vae._encode(x)  # noqa: E731
    with (tiled_vae.one_tile_per_pass() if tiled else contextlib.nullcontext()):
        return meta_peak_bytes(fn, device_type)


def has_frame_axis(vae) -> bool:
    """Whether `vae` is a video VAE taking (B, C, frames, H, W) (Qwen-Image's causal 3D VAE), which
    hires' tiled decode does not cover."""
    return bool(getattr(vae, "temperal_downsample", None))


def vae_latent_shape(vae, batch: int, latent_h: int, latent_w: int) -> tuple[int, ...]:
    """The latent `vae.decode` receives for one image: a frame axis of 1 for a video VAE."""
    if has_frame_axis(vae):
        return (batch, vae.config.z_dim, 1, latent_h, latent_w)
    return (batch, vae.config.latent_channels, latent_h, latent_w)


# -- denoiser -------------------------------------------------------------------------------------
# Dummy forward inputs per denoiser class (shapes only): text length of the family's usual encoder.
def _unet_inputs(model, batch, latent_h, latent_w, dtype):
    config = model.config
    kwargs = dict(
        sample=torch.empty(batch, config.in_channels, latent_h, latent_w, dtype=dtype),
        timestep=torch.empty(batch),
        encoder_hidden_states=torch.empty(batch, 77, config.cross_attention_dim, dtype=dtype),
    )
    if config.addition_embed_type == "text_time":
        time_ids = 6
        text = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, text, dtype=dtype), "time_ids": torch.empty(batch, time_ids, dtype=dtype)}
    return kwargs


def _pixart_inputs(model, batch, latent_h, latent_w, dtype):
    config = model.config
    return dict(
        hidden_states=torch.empty(batch, config.in_channels, latent_h, latent_w, dtype=dtype),
        encoder_hidden_states=torch.empty(batch, 300, config.caption_channels, dtype=dtype),
        timestep=torch.empty(batch),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def _sd3_inputs(model, batch, latent_h, latent_w, dtype):
    config = model.config
    return dict(
        hidden_states=torch.empty(batch, config.in_channels, latent_h, latent_w, dtype=dtype),
        encoder_hidden_states=torch.empty(batch, 77 + 256, config.joint_attention_dim, dtype=dtype),
        pooled_projections=torch.empty(batch, config.pooled_projection_dim, dtype=dtype),
        timestep=torch.empty(batch),
    )


def _flux_inputs(model, batch, latent_h, latent_w, dtype):
    config = model.config
    tokens, text = (latent_h // 2) * (latent_w // 2), 512
    kwargs = dict(
        hidden_states=torch.empty(batch, tokens, config.in_channels, dtype=dtype),
        encoder_hidden_states=torch.empty(batch, text, config.joint_attention_dim, dtype=dtype),
        pooled_projections=torch.empty(batch, config.pooled_projection_dim, dtype=dtype),
        timestep=torch.empty(batch),
        img_ids=torch.empty(tokens, 3),
        txt_ids=torch.empty(text, 3),
    )
    if config.guidance_embeds:
        kwargs["guidance"] = torch.empty(batch)
    return kwargs


def _qwenimage_inputs(model, batch, latent_h, latent_w, dtype):
    config = model.config
    rows, cols, text = latent_h // 2, latent_w // 2, 512
    return dict(
        hidden_states=torch.empty(batch, rows * cols, config.in_channels, dtype=dtype),
        encoder_hidden_states=torch.empty(batch, text, config.joint_attention_dim, dtype=dtype),
        timestep=torch.empty(batch),
        img_shapes=[[(1, rows, cols)]] * batch,
    )


def _zimage_inputs(model, batch, latent_h, latent_w, dtype):
    config = model.config
    return dict(
        x=[torch.empty(config.in_channels, 1, latent_h, latent_w, dtype=dtype)] * batch,
        t=torch.empty(batch),
        cap_feats=[torch.empty(512, config.cap_feat_dim, dtype=dtype)] * batch,
    )


DENOISER_INPUTS = {
    "UNet2DConditionModel": _unet_inputs,
    "PixArtTransformer2DModel": _pixart_inputs,
    "SD3Transformer2DModel": _sd3_inputs,
    "FluxTransformer2DModel": _flux_inputs,
    "QwenImageTransformer2DModel": _qwenimage_inputs,
    "ZImageTransformer2DModel": _zimage_inputs,
}


def denoiser_peak_bytes(denoiser, latent_h: int, latent_w: int, dtype: torch.dtype, batch: int,
                        feed_forward_chunks: int = 1, device_type: str | None = None) -> int:
    """Peak activation bytes of one forward of `denoiser`'s architecture at a latent size on `device_type`."""
    builder = next((DENOISER_INPUTS[c.__name__] for c in type(denoiser).__mro__ if c.__name__ in DENOISER_INPUTS), None)
    if builder is None:
        raise TypeError(f"denoiser={type(denoiser).__name__} has no memory model; known: {', '.join(DENOISER_INPUTS)}")
    return _denoiser_peak_cached(type(denoiser), _frozen_config(denoiser.config), latent_h, latent_w, dtype, batch,
                                 feed_forward_chunks, builder, device_type or default_device_type())


@functools.lru_cache(maxsize=128)
def _denoiser_peak_cached(cls, config_items, latent_h, latent_w, dtype, batch, chunks, builder, device_type) -> int:
    from .techniques import memory as memory_technique

    with torch.device("meta"):
        model = cls.from_config(dict(config_items))
        model = _cast(model, dtype)
        kwargs = builder(model, batch, latent_h, latent_w, dtype)
    with memory_technique.feed_forward_chunking(model, chunks):
        return meta_peak_bytes(lambda: model(**kwargs, return_dict=False), device_type)


# -- budget and plan ------------------------------------------------------------------------------
def detect_budget(device: torch.device | str | None = None) -> int:
    """Free memory of `device`: CUDA's free bytes, or the host's available RAM for CPU."""
    device = torch.device(device if device is not None else default_device_type())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"cannot read the free memory of {device}: torch sees no CUDA device here; "
                             "pass the budget explicitly (plan(budget=...) or MemoryConfig(max_memory=...))")
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


# The least any call at height x width holds at once: its decoded image in float32 (3 channels).
FLOOR_BYTES_PER_PIXEL = 3 * 4


def check_request(height: int, width: int, device, budget: int | None = None, what: str = "the request") -> None:
    """Refuse at once, by arithmetic and before anything is allocated, a size whose decoded image alone
    exceeds the budget (default: the device's free memory). Fast at any size: no meta tensors."""
    floor = FLOOR_BYTES_PER_PIXEL * height * width
    if budget is None:
        try:
            budget = detect_budget(device)
        except ValueError:
            return  # no way to read the free memory here; the planner, when enabled, asks for a budget
    if floor > budget:
        side = int(math.sqrt(budget / FLOOR_BYTES_PER_PIXEL)) // 64 * 64
        raise MemoryBudgetError(
            f"{what} at {width}x{height} (width x height) cannot fit: its decoded image alone needs "
            f"{format_bytes(floor)} ({width}x{height} pixels x {FLOOR_BYTES_PER_PIXEL} bytes, float32 RGB) and "
            f"{torch.device(device)} has {format_bytes(budget)} free; ask for at most about {side}x{side} pixels "
            "(or that area), or pass a larger MemoryConfig(max_memory=...) if more will be free"
        )


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What the planner estimated and chose for one request (bytes)."""

    height: int
    width: int
    dtype: torch.dtype
    batch: int
    budget: int
    weights: int
    denoiser_peak: int  # activations of one denoiser forward, with the chosen chunking / CFG layout
    vae_untiled_peak: int
    vae_tiled_peak: int | None  # None when not tiling (not estimated)
    tile_vae: bool
    tile_size: int | None
    tile_grouping: str | None  # "unit" (less recompute) or "level" (less memory); see tiled_vae.group_units
    feed_forward_chunks: int
    sequential_cfg: bool

    @property
    def vae_peak(self) -> int:
        return self.vae_tiled_peak if self.tile_vae else self.vae_untiled_peak

    @property
    def peak(self) -> int:
        return self.weights + max(self.denoiser_peak, self.vae_peak)

    def summary(self) -> str:
        return (f"{self.width}x{self.height} {str(self.dtype).removeprefix('torch.')} batch {self.batch}: "
                f"weights {format_bytes(self.weights)} + max(denoiser {format_bytes(self.denoiser_peak)}, "
                f"VAE {format_bytes(self.vae_peak)}{' tiled' if self.tile_vae else ''}) = {format_bytes(self.peak)} "
                f"of {format_bytes(self.budget)}")


TILE_CHOICES = (128, 96, 64, 48, 32)  # latent px, largest first
GROUPINGS = ("unit", "level")  # tiled VAE: least recompute first, least memory second


def tiling_options(tile_size: int | None = None) -> list[tuple[int, str]]:
    """(tile, grouping) pairs in order of preference (fastest first, least memory last)."""
    tiles = (tile_size,) if tile_size else TILE_CHOICES
    return [(t, g) for g in GROUPINGS for t in tiles]
CHUNK_CHOICES = (1, 2, 4, 8, 16)


def plan(denoiser, vae, *, height: int, width: int, latent_factor: int = 8, dtype: torch.dtype = torch.float16,
         batch: int = 1, cfg: bool = True, cfg_batched: bool = True, budget: int | None = None,
         weights: int | None = None, tile_vae: bool | None = None, tile_size: int | None = None,
         feed_forward_chunks: int | None = None, sequential_cfg: bool | None = None,
         name: str = "model", device_type: str | None = None) -> MemoryPlan:
    """Choose VAE tiling, feed-forward chunks and CFG layout so the request fits `budget`, or raise.

    `denoiser` and `vae` are modules (only their classes and configs are read; they may live on
    any device); `weights` defaults to their parameter bytes in `dtype`; `budget` to the free
    memory of `device_type` (default: CUDA if available, else CPU), whose kernels' workspaces are
    counted. Choices given (not None) are kept; the others are searched, cheapest first (no tiling,
    no chunking, batched CFG).
    """
    device_type = device_type or default_device_type()
    for side, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % latent_factor:
            raise ValueError(f"{side}={value!r} must be a positive multiple of the VAE factor {latent_factor}")
    if budget is None:
        budget = detect_budget(device_type)
    if weights is None:
        weights = module_bytes(denoiser, dtype) + module_bytes(vae, dtype)
    latent_h, latent_w = height // latent_factor, width // latent_factor
    latent = vae_latent_shape(vae, batch, latent_h, latent_w)
    cfg_halves = 2 if cfg else 1

    def denoiser_cost(chunks, sequential):
        b = batch * (1 if (sequential or not cfg_batched) else cfg_halves)
        return denoiser_peak_bytes(denoiser, latent_h, latent_w, dtype, b, chunks, device_type)

    untiled = vae_peak_bytes(vae, "decode", latent, dtype, tiled=False, device_type=device_type)
    free = budget - weights
    if tile_vae is None:
        tile_vae = untiled > free and not has_frame_axis(vae)  # a video VAE is decoded whole or refused
    tile, vae_cost = None, untiled
    grouping = None
    if tile_vae:
        (tile, grouping), vae_cost = _first_fitting(
            tiling_options(tile_size),
            lambda o: vae_peak_bytes(vae, "decode", latent, dtype, tiled=True, tile_size=o[0], grouping=o[1], device_type=device_type),
            free)

    # Cheapest first (no chunking, batched CFG); the most frugal choice is tried second, so an
    # impossible request is refused after two estimates.
    sequential_options = (sequential_cfg,) if sequential_cfg is not None else ((False, True) if cfg and cfg_batched else (False,))
    from .techniques.memory import chunkable_blocks

    chunkable = bool(chunkable_blocks(denoiser))
    chunk_options = (feed_forward_chunks,) if feed_forward_chunks is not None else (CHUNK_CHOICES if chunkable else (1,))
    options = [(s, c) for s in sequential_options for c in chunk_options]
    (sequential, chunks), denoiser_cost_ = _first_fitting(options, lambda o: denoiser_cost(o[1], o[0]), free)

    result = MemoryPlan(height=height, width=width, dtype=dtype, batch=batch, budget=budget, weights=weights,
                        denoiser_peak=denoiser_cost_, vae_untiled_peak=untiled,
                        vae_tiled_peak=vae_cost if tile_vae else None,
                        tile_vae=bool(tile_vae), tile_size=tile, tile_grouping=grouping, feed_forward_chunks=chunks,
                        sequential_cfg=sequential)
    if result.peak > budget:
        raise MemoryBudgetError(_refusal(result, name, latent_factor))
    return result


def _first_fitting(options, cost, free):
    """(option, cost) of the first option (in preference order) whose cost fits `free`; the last
    (most frugal) one when none does. Checks the first and the last before searching between."""
    first = cost(options[0])
    if first <= free or len(options) == 1:
        return options[0], first
    last = cost(options[-1])
    if last > free:
        return options[-1], last
    for option in options[1:-1]:
        value = cost(option)
        if value <= free:
            return option, value
    return options[-1], last


def _refusal(result: MemoryPlan, name: str, latent_factor: int) -> str:
    activations = max(result.denoiser_peak, result.vae_peak)
    free = result.budget - result.weights
    tips = []
    if free <= 0:
        tips.append(f"the weights alone ({format_bytes(result.weights)}) exceed the budget: use "
                    f"pipe.enable_model_cpu_offload() or a lower-precision dtype")
    else:
        shrink = math.sqrt(free / activations)
        side = lambda s: max(latent_factor, int(s * shrink) // (latent_factor * 8) * latent_factor * 8)  # noqa: E731
        tips.append(f"a smaller size, about {side(result.width)}x{side(result.height)}")
        if result.dtype == torch.float32:
            tips.append("dtype=torch.bfloat16 (halves weights and activations)")
        tips.append("pipe.enable_model_cpu_offload() (keeps only the running model on the device)")
    return (f"{result.width}x{result.height} {name} {str(result.dtype).removeprefix('torch.')} batch {result.batch} "
            f"needs ≈{format_bytes(result.peak)} (weights {format_bytes(result.weights)}, denoiser activations "
            f"{format_bytes(result.denoiser_peak)} with {result.feed_forward_chunks} feed-forward chunk(s)"
            f"{', sequential CFG' if result.sequential_cfg else ''}, VAE {format_bytes(result.vae_peak)}"
            f"{' tiled' if result.tile_vae else ''}), budget {format_bytes(result.budget)}; try " + "; or ".join(tips))


# -- the per-call tiling decision of VAETilingConfig(mode="auto") -----------------------------------
def vae_tiling_decision(vae, kind: str, shape: tuple[int, ...], dtype: torch.dtype, max_memory: int | None = None,
                        tile_size: int | None = None) -> tuple[int, str] | None:
    """(tile size in latent px, grouping) when the untiled pass would not fit the free memory, else None."""
    device = next(iter(vae.parameters())).device
    free = max_memory - module_bytes(vae) if max_memory is not None else detect_budget(device)
    if vae_peak_bytes(vae, kind, shape, dtype, tiled=False, device_type=device.type) <= free:
        return None
    option, needed = _first_fitting(
        tiling_options(tile_size),
        lambda o: vae_peak_bytes(vae, kind, shape, dtype, tiled=True, tile_size=o[0], grouping=o[1], device_type=device.type),
        free)
    if needed > free:
        raise MemoryBudgetError(
            f"VAE {kind} of a {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')} tensor needs ≈{format_bytes(needed)} "
            f"even tiled ({option[0]} latent px tiles, {option[1]} grouping), free {format_bytes(free)}; try a smaller "
            f"size or pipe.enable_model_cpu_offload()"
        )
    return option


# -- planning one pipeline call (used by the memory technique) -------------------------------------
def pipeline_weights(pipe, device: torch.device) -> int:
    """Bytes of the pipeline's module weights that live on `device`."""
    total = 0
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in list(component.parameters()) + list(component.buffers())
                         if t.device == device)
    return total


def plan_for_call(attachment, config, state, args, kwargs, sequential_allowed: bool = True) -> MemoryPlan:
    """The plan of one running pipeline call, from its state and the denoiser's first inputs."""
    pipe, denoiser = attachment.pipe, attachment.denoiser
    parameter = next(iter(denoiser.parameters()))
    device, dtype = parameter.device, parameter.dtype
    first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    cfg = state.guidance_scale is not None
    batched = attachment.info.family.guidance_layout == "batched"
    batch = max(1, first.shape[0] // (2 if cfg and batched else 1))
    weights = pipeline_weights(pipe, device)
    budget = config.max_memory if config.max_memory is not None else detect_budget(device) + weights
    sequential = config.sequential_cfg if sequential_allowed else False
    tiling = attachment.config.vae_tiling
    tile_vae = None if not tiling.enabled or tiling.mode == "auto" else tiling.mode == "always"
    return plan(denoiser, pipe.vae, height=state.height, width=state.width, latent_factor=attachment.info.latent_factor,
                dtype=dtype, batch=batch, cfg=cfg, cfg_batched=batched, budget=budget, weights=weights,
                feed_forward_chunks=config.feed_forward_chunks, sequential_cfg=sequential, name=attachment.info.name,
                tile_vae=tile_vae, tile_size=tiling.tile_size if tiling.enabled else None, device_type=device.type)
