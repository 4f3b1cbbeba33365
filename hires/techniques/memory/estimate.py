"""The memory planner: peak memory of a request estimated up front, without weights.

Estimates come from the real architecture built on the meta device (no weights, no compute):
the denoiser's or VAE's own forward runs on meta tensors while a dispatch mode tracks the bytes of
every live activation; the peak is the estimate. Scaled-dot-product attention is counted as a
memory-efficient kernel (output plus log-sum-exp), which is what flash / memory-efficient /
xformers backends allocate; the N x N matrix the meta device's math fallback would build is not
counted. On CPU a convolution also holds oneDNN's copy of its input and weight (`_KernelWorkspaces`).
The tiled VAE estimate runs the tiled algorithm itself on meta with one tile per pass.

`plan(...)` turns estimates and a budget into a `MemoryPlan` (tile the VAE? chunk feed-forwards?
sequential CFG?) or raises `MemoryBudgetError` with the numbers and what to try. `plan_call(...)`
plans a whole call: every denoiser size (`DenoiserPass`) and every VAE decode and encode
(`VAEPass`), each against what stays resident meanwhile (the denoiser too), the VAE in float32
where a float16 pipeline's VAE asks for the upcast (`vae_compute_dtype`); its `CallPlan` says the
choice per pass and which pass is the peak. hires.techniques.memory.install derives a staged call's passes.
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

from ...families import FAMILIES, denoiser_family, vae_kind
from ...sampling.latent_space import needs_upcast

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
        cast = dtype is not None and tensor.is_floating_point()
        size = torch.empty((), dtype=dtype).element_size() if cast else tensor.element_size()
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
                   tile_size: int | None = None, grouping: str = "unit", device_type: str | None = None,
                   storage: torch.dtype | None = None) -> int:
    """Peak activation bytes of `vae` decoding (kind "decode": shape is the latent's) or encoding
    (kind "encode": shape is the image's), untiled or with hires' tiled path, on `device_type`;
    `storage` is the tiled path's dtype for the tensors it holds whole (None: `dtype`)."""
    if kind not in ("decode", "encode"):
        raise ValueError(f"kind={kind!r} must be 'decode' or 'encode'")
    return _vae_peak_cached(type(vae), _frozen_config(vae.config), kind,
                            tuple(shape), dtype, tiled, tile_size, grouping,
                            device_type or default_device_type(), storage if tiled else None)


@functools.lru_cache(maxsize=256)
def _vae_peak_cached(cls, config_items, kind, shape, dtype, tiled, tile_size, grouping, device_type, storage) -> int:
    from . import tiled_vae

    vae = _meta_vae(config_items, cls, dtype)
    x = torch.empty(shape, dtype=dtype, device="meta")
    if vae_kind(vae).frame_axis:
        if tiled:
            raise ValueError(f"{cls.__name__} is a video VAE (latents with a frame axis); hires does not tile it")
        fn = (lambda: vae._decode(x)) if kind == "decode" else (lambda: vae._encode(x))  # noqa: E731
        return meta_peak_bytes(fn, device_type)
    if kind == "decode":
        if tiled:
            fn = lambda: tiled_vae.tiled_decode(vae, x, tile_size, grouping, storage_dtype=storage)  # noqa: E731
        else:
            fn = lambda: vae.decoder(vae.post_quant_conv(x) if vae.post_quant_conv is not None else x)  # noqa: E731
    else:
        if tiled:
            fn = lambda: tiled_vae.tiled_encode(vae, x, tile_size, grouping, storage_dtype=storage)  # noqa: E731
        else:
            fn = lambda: vae._encode(x)  # noqa: E731
    with (tiled_vae.one_tile_per_pass() if tiled else contextlib.nullcontext()):
        return meta_peak_bytes(fn, device_type)


def vae_latent_shape(vae, batch: int, latent_h: int, latent_w: int) -> tuple[int, ...]:
    """The latent `vae.decode` receives for one image: a frame axis of 1 for a video VAE."""
    if vae_kind(vae).frame_axis:
        return (batch, vae.config.z_dim, 1, latent_h, latent_w)
    return (batch, vae.config.latent_channels, latent_h, latent_w)


# -- denoiser -------------------------------------------------------------------------------------
# Dummy forward inputs per denoiser class (shapes only); `family` gives the text length of its encoders and
# the position-id axes (hires.families).
def _unet_inputs(model, family, batch, latent_h, latent_w, dtype):
    config = model.config
    kwargs = dict(
        sample=torch.empty(batch, config.in_channels, latent_h, latent_w, dtype=dtype),
        timestep=torch.empty(batch),
        encoder_hidden_states=torch.empty(batch, family.text_tokens, config.cross_attention_dim, dtype=dtype),
    )
    if config.addition_embed_type == "text_time":
        time_ids = 6
        text = config.projection_class_embeddings_input_dim - time_ids * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, text, dtype=dtype),
                                       "time_ids": torch.empty(batch, time_ids, dtype=dtype)}
    return kwargs


def _pixart_inputs(model, family, batch, latent_h, latent_w, dtype):
    config = model.config
    return dict(
        hidden_states=torch.empty(batch, config.in_channels, latent_h, latent_w, dtype=dtype),
        encoder_hidden_states=torch.empty(batch, family.text_tokens, config.caption_channels, dtype=dtype),
        timestep=torch.empty(batch),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def _sd3_inputs(model, family, batch, latent_h, latent_w, dtype):
    config = model.config
    return dict(
        hidden_states=torch.empty(batch, config.in_channels, latent_h, latent_w, dtype=dtype),
        encoder_hidden_states=torch.empty(batch, family.text_tokens, config.joint_attention_dim, dtype=dtype),
        pooled_projections=torch.empty(batch, config.pooled_projection_dim, dtype=dtype),
        timestep=torch.empty(batch),
    )


def _packed_ids_inputs(model, family, batch, latent_h, latent_w, dtype):
    """Flux, Flux.2, Chroma, Flux 3: packed tokens with a position id per token on the layout's id axes."""
    config = model.config
    patch, axes, text = family.layout.patch_size, len(family.layout.id_axes), family.text_tokens
    tokens = (latent_h // patch) * (latent_w // patch)
    kwargs = dict(
        hidden_states=torch.empty(batch, tokens, config.in_channels, dtype=dtype),
        encoder_hidden_states=torch.empty(batch, text, config.joint_attention_dim, dtype=dtype),
        timestep=torch.empty(batch),
        img_ids=torch.empty(tokens, axes),
        txt_ids=torch.empty(text, axes),
    )
    if getattr(config, "pooled_projection_dim", None):
        kwargs["pooled_projections"] = torch.empty(batch, config.pooled_projection_dim, dtype=dtype)
    if getattr(config, "guidance_embeds", False):
        kwargs["guidance"] = torch.empty(batch)
    if getattr(config, "flow_map", False):  # Flux 3's distilled model also takes the step's target timestep
        kwargs["target_timestep"] = torch.empty(batch)
    if family.attention_masked:  # ChromaPipeline passes its text padding mask; the model expands it per block
        kwargs["attention_mask"] = torch.empty(batch, text + tokens, dtype=dtype)
    return kwargs


def _packed_shapes_inputs(model, family, batch, latent_h, latent_w, dtype):
    """Qwen-Image: packed tokens whose grid is given as img_shapes."""
    config = model.config
    patch = family.layout.patch_size
    rows, cols = latent_h // patch, latent_w // patch
    return dict(
        hidden_states=torch.empty(batch, rows * cols, config.in_channels, dtype=dtype),
        encoder_hidden_states=torch.empty(batch, family.text_tokens, config.joint_attention_dim, dtype=dtype),
        timestep=torch.empty(batch),
        img_shapes=[[(1, rows, cols)]] * batch,
    )


def _packed_position_ids_inputs(model, family, batch, latent_h, latent_w, dtype):
    """Krea-2: packed tokens, one position_ids tensor (text rows, then image rows), its text padding mask, and
    text embeddings of several tapped encoder layers."""
    config = model.config
    patch, text = family.layout.patch_size, family.text_tokens
    tokens = (latent_h // patch) * (latent_w // patch)
    return dict(
        hidden_states=torch.empty(batch, tokens, config.in_channels, dtype=dtype),  # in_channels: 4C per token
        encoder_hidden_states=torch.empty(batch, text, config.num_text_layers, config.text_hidden_dim, dtype=dtype),
        timestep=torch.empty(batch),
        position_ids=torch.empty(text + tokens, len(family.layout.id_axes)),
        encoder_attention_mask=torch.ones(batch, text, dtype=torch.bool),
    )


def _zimage_inputs(model, family, batch, latent_h, latent_w, dtype):
    config = model.config
    return dict(
        x=[torch.empty(config.in_channels, 1, latent_h, latent_w, dtype=dtype)] * batch,
        t=torch.empty(batch),
        cap_feats=[torch.empty(family.text_tokens, config.cap_feat_dim, dtype=dtype)] * batch,
    )


def _one_expert_dispatch(moe, x, expert_indices, expert_weights):
    k = moe.num_activated_experts
    return moe.experts[0](x.repeat_interleave(k, dim=0)).view(x.shape[0], k, -1).sum(dim=1)


def _hidream_inputs(model, family, batch, latent_h, latent_w, dtype):
    config = model.config
    patch = config.patch_size
    if latent_h != latent_w:  # as hires runs it: a non-square grid padded to at least its own token count
        model.max_seq = max(model.max_seq, (latent_h // patch) * (latent_w // patch))
    # Its sparse feed-forward sorts tokens by expert with bincount, which has no meta kernel: counted as every
    # token through one routed expert num_activated_experts times (all routed to one expert: the largest batch).
    for module in model.modules():
        if type(module).__name__ == "MOEFeedForwardSwiGLU":
            module.moe_infer = functools.partial(_one_expert_dispatch, module)
    # Its un-patchify reads each image's grid from a tensor (.item(), which the meta device has no value for).
    model.unpatchify = lambda x, sizes, training: torch.empty(x.shape[0], config.out_channels, latent_h, latent_w,
                                                              dtype=x.dtype, device=x.device)
    t5_width, llama_width = config.caption_channels
    return dict(
        hidden_states=torch.empty(batch, config.in_channels, latent_h, latent_w, dtype=dtype),
        timesteps=torch.empty(batch),
        encoder_hidden_states_t5=torch.empty(batch, family.text_tokens, t5_width, dtype=dtype),
        encoder_hidden_states_llama3=torch.empty(max(config.llama_layers) + 1, batch, family.text_tokens,
                                                 llama_width, dtype=dtype),
        pooled_embeds=torch.empty(batch, config.text_emb_dim, dtype=dtype),
    )


def _ernie_image_inputs(model, family, batch, latent_h, latent_w, dtype):
    config = model.config
    # Its RoPE turns autocast off for the ids' device type, which torch has none of for "meta": the angles (a
    # few bytes per token) come as an empty tensor of their shape, (batch, tokens, 1, head dim).
    head_dim = sum(model.pos_embed.axes_dim)
    model.pos_embed.forward = lambda ids: torch.empty(*ids.shape[:-1], 1, head_dim, device=ids.device)
    return dict(
        hidden_states=torch.empty(batch, config.in_channels, latent_h, latent_w, dtype=dtype),
        timestep=torch.empty(batch),
        text_bth=torch.empty(batch, family.text_tokens, config.text_in_dim, dtype=dtype),
        text_lens=torch.full((batch,), family.text_tokens, dtype=torch.long),
    )


def _qwenimage21_inputs(model, family, batch, latent_h, latent_w, dtype):
    raise TypeError(f"denoiser={type(model).__name__} has no memory model: it lays out its joint sequence from the "
                    "values of its img_mask (a boolean scatter), which the meta device holds none of")


# Denoisers whose inputs are their own; the others take their layout's (a new family of Flux's layout
# needs no entry here).
DENOISER_INPUTS = {
    "UNet2DConditionModel": _unet_inputs,
    "PixArtTransformer2DModel": _pixart_inputs,
    "SD3Transformer2DModel": _sd3_inputs,
    "ZImageTransformer2DModel": _zimage_inputs,
    "ErnieImageTransformer2DModel": _ernie_image_inputs,
    "HiDreamImageTransformer2DModel": _hidream_inputs,
    "QwenImage21Transformer2DModel": _qwenimage21_inputs,
}
LAYOUT_INPUTS = {"img_ids": _packed_ids_inputs, "img_shapes": _packed_shapes_inputs,
                 "position_ids": _packed_position_ids_inputs}


def denoiser_peak_bytes(denoiser, latent_h: int, latent_w: int, dtype: torch.dtype, batch: int,
                        feed_forward_chunks: int = 1, device_type: str | None = None, adaptations: tuple = ()) -> int:
    """Peak activation bytes of one forward of `denoiser`'s architecture at a latent size on `device_type`.

    `adaptations`: what the installed techniques make the denoiser do that its meta-device copy must do too
    (hires.registry.Technique.adapts_estimate; SD3's table past its end), each `adaptation(model)` a context."""
    names = [c.__name__ for c in type(denoiser).__mro__]
    family = denoiser_family(denoiser)
    builder = next((DENOISER_INPUTS[name] for name in names if name in DENOISER_INPUTS), None)
    if builder is None and family is not None:
        builder = LAYOUT_INPUTS.get(family.layout.packed_grid)
    if builder is None:
        known = list(dict.fromkeys(f.denoiser_class for f in FAMILIES))
        raise TypeError(f"denoiser={type(denoiser).__name__} has no memory model; known: {', '.join(known)}")
    return _denoiser_peak_cached(type(denoiser), _frozen_config(denoiser.config), family, latent_h, latent_w, dtype,
                                 batch, feed_forward_chunks, builder, device_type or default_device_type(),
                                 tuple(adaptations))


@functools.lru_cache(maxsize=128)
def _denoiser_peak_cached(cls, config_items, family, latent_h, latent_w, dtype, batch, chunks, builder,
                          device_type, adaptations) -> int:
    from . import chunking as memory_technique

    with torch.device("meta"):
        model = cls.from_config(dict(config_items))
        model = _cast(model, dtype)
        kwargs = builder(model, family, batch, latent_h, latent_w, dtype)
    with contextlib.ExitStack() as stack:
        for adaptation in adaptations:
            stack.enter_context(adaptation(model))
        stack.enter_context(memory_technique.feed_forward_chunking(model, chunks))
        return meta_peak_bytes(lambda: model(**kwargs, return_dict=False), device_type)


# -- budget and plan ------------------------------------------------------------------------------
def detect_budget(device: torch.device | str | None = None) -> int:
    """Free memory of `device`: CUDA's free bytes plus what torch's allocator holds unused, or the
    host's available RAM for CPU."""
    device = torch.device(device if device is not None else default_device_type())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"cannot read the free memory of {device}: torch sees no CUDA device here; "
                             "pass the budget explicitly (plan(budget=...) or MemoryConfig(max_memory=...))")
        free, _ = torch.cuda.mem_get_info(device)
        # blocks torch's caching allocator keeps after a pass are free to the next one
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
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


def vae_compute_dtype(vae, dtype: torch.dtype) -> torch.dtype:
    """The dtype a VAE pass computes in for a pipeline in `dtype`: float32 where the VAE's config asks
    for it (`force_upcast`, as SDXL's does: its float16 activations overflow) and `dtype` is float16,
    as hires' own VAE passes and diffusers' SDXL decode run it; else `dtype`."""
    return torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else dtype


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
    tile_storage: torch.dtype | None = None  # bfloat16: tensors held whole in bfloat16 (tiled_vae docstring)
    vae_weights_extra: int = 0  # VAE weights added while it runs upcast to float32

    @property
    def vae_peak(self) -> int:
        return self.vae_tiled_peak if self.tile_vae else self.vae_untiled_peak

    @property
    def peak(self) -> int:
        return self.weights + max(self.denoiser_peak, self.vae_peak + self.vae_weights_extra)

    def summary(self) -> str:
        return (f"{self.width}x{self.height} {str(self.dtype).removeprefix('torch.')} batch {self.batch}: "
                f"weights {format_bytes(self.weights)} + max(denoiser {format_bytes(self.denoiser_peak)}, "
                f"VAE {format_bytes(self.vae_peak)}{' tiled' if self.tile_vae else ''}) = {format_bytes(self.peak)} "
                f"of {format_bytes(self.budget)}")


TILE_CHOICES = (128, 96, 64, 48, 32)  # latent px, largest first
GROUPINGS = ("unit", "level")  # tiled VAE: least recompute first, least memory second


def tiling_options(tile_size: int | None = None,
                   dtype: torch.dtype = torch.float32) -> list[tuple[int, str, torch.dtype | None]]:
    """(tile, grouping, storage dtype) in order of preference (fastest and exact first, least memory
    last): whole tensors held in the compute dtype `dtype`, then, when nothing else fits and `dtype`
    is float32, in bfloat16."""
    tiles = (tile_size,) if tile_size else TILE_CHOICES
    exact = [(t, g, None) for g in GROUPINGS for t in tiles]
    return exact + ([(t, "level", torch.bfloat16) for t in tiles] if dtype == torch.float32 else [])


CHUNK_CHOICES = (1, 2, 4, 8, 16)


def _check_size(height: int, width: int, latent_factor: int) -> None:
    for side, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % latent_factor:
            raise ValueError(f"{side}={value!r} must be a positive multiple of the VAE factor {latent_factor}")


def _denoiser_choice(denoiser, latent_h, latent_w, dtype, batch, cfg, cfg_batched, free, feed_forward_chunks,
                     sequential_cfg, device_type, adaptations=()) -> tuple[tuple[bool, int], int]:
    """((sequential CFG, feed-forward chunks), activations): cheapest first (batched CFG, no
    chunking); the most frugal choice is tried second, so an impossible request costs two estimates."""
    from .chunking import chunkable_blocks

    cfg_halves = 2 if cfg else 1

    def cost(option):
        sequential, chunks = option
        b = batch * (1 if (sequential or not cfg_batched) else cfg_halves)
        return denoiser_peak_bytes(denoiser, latent_h, latent_w, dtype, b, chunks, device_type, adaptations)

    sequential_options = (sequential_cfg,
                          ) if sequential_cfg is not None else ((False, True) if cfg and cfg_batched else (False,))
    chunk_options = ((feed_forward_chunks,) if feed_forward_chunks is not None
                     else (CHUNK_CHOICES if chunkable_blocks(denoiser) else (1,)))
    return _first_fitting([(s, c) for s in sequential_options for c in chunk_options], cost, free)


def _vae_choice(vae, kind, shape, dtype, free, tile_vae, tile_size, device_type, tiled_dtype=None):
    """(tiling or None, activations, untiled activations) of one VAE pass; `tiled_dtype` is the dtype
    hires' tiled path computes in (float32 for an upcast VAE), default `dtype`."""
    untiled = vae_peak_bytes(vae, kind, shape, dtype, tiled=False, device_type=device_type)
    if tile_vae is None:
        tile_vae = untiled > free and not vae_kind(vae).frame_axis  # a video VAE is decoded whole or refused
    if not tile_vae:
        return None, untiled, untiled
    option, cost = _first_fitting(
        tiling_options(tile_size, tiled_dtype or dtype),
        lambda o: vae_peak_bytes(vae, kind, shape, tiled_dtype or dtype, tiled=True, tile_size=o[0], grouping=o[1],
                                 storage=o[2], device_type=device_type),
        free)
    return option, cost, untiled


def plan(denoiser, vae, *, height: int, width: int, latent_factor: int = 8, dtype: torch.dtype = torch.float16,
         batch: int = 1, cfg: bool = True, cfg_batched: bool = True, budget: int | None = None,
         weights: int | None = None, tile_vae: bool | None = None, tile_size: int | None = None,
         feed_forward_chunks: int | None = None, sequential_cfg: bool | None = None,
         name: str = "model", device_type: str | None = None, adaptations: tuple = ()) -> MemoryPlan:
    """Choose VAE tiling, feed-forward chunks and CFG layout so the request (its denoiser and one
    decode at its size) fits `budget`, or raise. `plan_call` plans every pass of a call.

    `denoiser` and `vae` are modules (only their classes and configs are read; they may live on
    any device); `weights` defaults to their parameter bytes in `dtype`; `budget` to the free
    memory of `device_type` (default: CUDA if available, else CPU), whose kernels' workspaces are
    counted. Choices given (not None) are kept; the others are searched, cheapest first (no tiling,
    no chunking, batched CFG). The decode runs in `vae_compute_dtype(vae, dtype)`; `adaptations` as for
    `denoiser_peak_bytes`.
    """
    device_type = device_type or default_device_type()
    _check_size(height, width, latent_factor)
    if budget is None:
        budget = detect_budget(device_type)
    if weights is None:
        weights = module_bytes(denoiser, dtype) + module_bytes(vae, dtype)
    vae_dtype = vae_compute_dtype(vae, dtype)
    extra = module_bytes(vae, vae_dtype) - module_bytes(vae, dtype)
    latent_h, latent_w = height // latent_factor, width // latent_factor
    latent = vae_latent_shape(vae, batch, latent_h, latent_w)
    free = budget - weights
    tiling, vae_cost, untiled = _vae_choice(vae, "decode", latent, vae_dtype,
                                            free - extra, tile_vae, tile_size, device_type)
    (sequential, chunks), denoiser_cost = _denoiser_choice(denoiser, latent_h, latent_w,
                                                           dtype, batch, cfg, cfg_batched,
                                                           free, feed_forward_chunks, sequential_cfg, device_type,
                                                           adaptations)
    result = MemoryPlan(height=height, width=width, dtype=dtype, batch=batch, budget=budget, weights=weights,
                        denoiser_peak=denoiser_cost, vae_untiled_peak=untiled,
                        vae_tiled_peak=vae_cost if tiling else None, tile_vae=tiling is not None,
                        tile_size=tiling[0] if tiling else None, tile_grouping=tiling[1] if tiling else None,
                        feed_forward_chunks=chunks, sequential_cfg=sequential,
                        tile_storage=tiling[2] if tiling else None, vae_weights_extra=extra)
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


def _tips(dtype, weights, budget, activations, width, height, latent_factor) -> list[str]:
    free = budget - weights
    if free <= 0:
        return [f"pipe.enable_model_cpu_offload() or a lower-precision dtype: the weights alone "
                f"({format_bytes(weights)}) exceed the budget"]
    shrink = math.sqrt(free / max(activations, 1))
    side = lambda s: max(latent_factor, int(s * shrink) // (latent_factor * 8) * latent_factor * 8)  # noqa: E731
    tips = [f"a smaller size, about {side(width)}x{side(height)}"]
    if dtype == torch.float32:
        tips.append("dtype=torch.bfloat16 (halves weights and activations)")
    tips.append("pipe.enable_model_cpu_offload() (keeps only the running model on the device)")
    return tips


def _refusal(result: MemoryPlan, name: str, latent_factor: int) -> str:
    activations = max(result.denoiser_peak, result.vae_peak + result.vae_weights_extra)
    tips = _tips(result.dtype, result.weights, result.budget, activations, result.width, result.height, latent_factor)
    return (f"{result.width}x{result.height} {name} {str(result.dtype).removeprefix('torch.')} batch {result.batch} "
            f"needs ≈{format_bytes(result.peak)} (weights {format_bytes(result.weights)}, denoiser activations "
            f"{format_bytes(result.denoiser_peak)} with {result.feed_forward_chunks} feed-forward chunk(s)"
            f"{', sequential CFG' if result.sequential_cfg else ''}, VAE {format_bytes(result.vae_peak)}"
            f"{' tiled' if result.tile_vae else ''}), budget {format_bytes(result.budget)}; try " + "; or ".join(tips))


# -- whole-call plans: every denoiser size and every VAE pass of one pipeline call -----------------
@dataclasses.dataclass(frozen=True)
class DenoiserPass:
    """The denoiser's steps at one size (a stage, or the call itself)."""

    height: int
    width: int
    what: str = "denoiser"
    cfg: bool | None = None  # None: the call's


@dataclasses.dataclass(frozen=True)
class VAEPass:
    """One VAE pass: kind "decode" (shape: the latent's) or "encode" (shape: the image's)."""

    kind: str
    shape: tuple[int, ...]
    what: str = ""

    def __post_init__(self):
        if self.kind not in ("decode", "encode"):
            raise ValueError(f"VAEPass.kind={self.kind!r} must be 'decode' or 'encode'")


@dataclasses.dataclass(frozen=True)
class PassPlan:
    """One pass as planned: what stays on the device meanwhile, its activations, its choices (bytes)."""

    what: str
    kind: str  # "denoiser", "decode" or "encode"
    shape: tuple[int, ...]  # denoiser: (height, width) in pixels; VAE: the input tensor's shape
    dtype: torch.dtype  # the pass's compute dtype
    resident: int  # weights on the device during the pass
    activations: int
    untiled: int | None = None  # VAE passes: activations untiled
    tiling: tuple | None = None  # VAE passes: (tile latent px, grouping, storage dtype), None: untiled
    feed_forward_chunks: int | None = None  # denoiser passes
    sequential_cfg: bool | None = None  # denoiser passes with CFG; None without CFG

    @property
    def peak(self) -> int:
        return self.resident + self.activations

    def choice(self) -> str:
        if self.kind == "denoiser":
            cfg = "sequential" if self.sequential_cfg else "batched"
            layout = "" if self.sequential_cfg is None else f", {cfg} CFG"
            return f"FF chunks {self.feed_forward_chunks}{layout}"
        if self.tiling is None:
            return "untiled"
        tile, grouping, storage = self.tiling
        held = f", held in {str(storage).removeprefix('torch.')}" if storage is not None else ""
        return f"tiled {tile} latent px {grouping}{held}"

    def line(self) -> str:
        shape = f"{self.shape[1]}x{self.shape[0]}" if self.kind == "denoiser" else "x".join(map(str, self.shape))
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"{self.what} ({self.kind} {shape} {dtype}, {self.choice()}): {format_bytes(self.resident)} weights "
                f"+ {format_bytes(self.activations)} = {format_bytes(self.peak)}")


@dataclasses.dataclass(frozen=True)
class CallPlan:
    """The plan of a whole call: one `PassPlan` per denoiser size and per VAE pass."""

    name: str
    budget: int
    dtype: torch.dtype
    vae_dtype: torch.dtype  # what the VAE passes compute in (float32 where upcast)
    batch: int
    passes: tuple[PassPlan, ...]

    @property
    def peak_pass(self) -> PassPlan:
        return max(self.passes, key=lambda p: p.peak)

    @property
    def peak(self) -> int:
        return self.peak_pass.peak

    def vae_passes(self) -> list[PassPlan]:
        return [p for p in self.passes if p.kind != "denoiser"]

    def denoiser_passes(self) -> list[PassPlan]:
        return [p for p in self.passes if p.kind == "denoiser"]

    def summary(self) -> str:
        peak = self.peak_pass
        head = (f"{self.name} {str(self.dtype).removeprefix('torch.')} batch {self.batch}, VAE in "
                f"{str(self.vae_dtype).removeprefix('torch.')}: peak "
                f"{format_bytes(self.peak)} ({self.peak / 1e9:.2f} GB) "
                f"in {peak.what} of {format_bytes(self.budget)} ({self.budget / 1e9:.2f} GB)")
        return "\n".join([head] + ["  " + p.line() for p in self.passes])


def plan_call(denoiser, vae, *, denoiser_passes, vae_passes, latent_factor: int = 8,
              dtype: torch.dtype = torch.float16, batch: int = 1, cfg: bool = True, cfg_batched: bool = True,
              budget: int | None = None, other_weights: int = 0, tile_vae: bool | None = None,
              tile_size: int | None = None, feed_forward_chunks: int | None = None,
              sequential_cfg: bool | None = None, name: str = "model", device_type: str | None = None,
              adaptations: tuple = ()) -> CallPlan:
    """Plan every pass of one call, or raise `MemoryBudgetError` with each pass's numbers.

    `denoiser_passes`: `DenoiserPass`es (or (height, width) pairs), one per size the denoiser runs
    at; `vae_passes`: `VAEPass`es (or (kind, shape) pairs), every decode and encode of the call.
    Each pass is planned on its own against what stays resident meanwhile: the denoiser's weights
    in `dtype`, the VAE's (in float32 while it runs upcast, see `vae_compute_dtype`) and
    `other_weights` (text encoders and the like on the device). Every VAE pass is tiled where its
    untiled estimate does not fit (`tile_vae=None`), with the least costly tiling that fits. The
    call's peak is the largest pass's. `adaptations` as for `denoiser_peak_bytes`.
    """
    device_type = device_type or default_device_type()
    if budget is None:
        budget = detect_budget(device_type)
    vae_dtype = vae_compute_dtype(vae, dtype)
    denoiser_weights = module_bytes(denoiser, dtype)
    during_steps = other_weights + denoiser_weights + module_bytes(vae, dtype)
    during_vae = other_weights + denoiser_weights + module_bytes(vae, vae_dtype)
    passes = []
    for entry in denoiser_passes:
        entry = entry if isinstance(entry, DenoiserPass) else DenoiserPass(*entry)
        _check_size(entry.height, entry.width, latent_factor)
        uses_cfg = cfg if entry.cfg is None else entry.cfg
        (sequential, chunks), cost = _denoiser_choice(
            denoiser, entry.height // latent_factor, entry.width // latent_factor, dtype, batch, uses_cfg, cfg_batched,
            budget - during_steps, feed_forward_chunks, sequential_cfg, device_type, adaptations)
        passes.append(PassPlan(entry.what, "denoiser", (entry.height, entry.width), dtype, during_steps, cost,
                               feed_forward_chunks=chunks,
                               sequential_cfg=sequential if uses_cfg and cfg_batched else None))
    for entry in vae_passes:
        entry = entry if isinstance(entry, VAEPass) else VAEPass(*entry)
        tiling, cost, untiled = _vae_choice(vae, entry.kind, tuple(entry.shape), vae_dtype, budget - during_vae,
                                            tile_vae, tile_size, device_type)
        passes.append(PassPlan(entry.what or entry.kind, entry.kind, tuple(entry.shape), vae_dtype, during_vae, cost,
                               untiled=untiled, tiling=tiling))
    result = CallPlan(name=name, budget=budget, dtype=dtype, vae_dtype=vae_dtype, batch=batch, passes=tuple(passes))
    if result.peak > budget:
        peak = result.peak_pass
        pixels = 1 if peak.kind == "encode" else latent_factor  # an encode's input is the image itself
        size = peak.shape if peak.kind == "denoiser" else (peak.shape[-2] * pixels, peak.shape[-1] * pixels)
        tips = _tips(dtype, peak.resident, budget, peak.activations, size[1], size[0], latent_factor)
        over = [p for p in passes if p.peak > budget]
        raise MemoryBudgetError(
            f"{name} {str(dtype).removeprefix('torch.')} batch {batch} needs ≈{format_bytes(result.peak)} in "
            f"{peak.what}, budget {format_bytes(budget)}; {len(over)} "
            f"of its {len(passes)} passes do not fit even with "
            f"the most frugal choice: " + "; ".join(p.line() for p in over) + "; try " + "; or ".join(tips))
    return result


# -- the per-pass tiling decision of VAETilingConfig(mode="auto") -----------------------------------
def vae_tiling_decision(vae, kind: str, shape: tuple[int, ...], dtype: torch.dtype, max_memory: int | None = None,
                        tile_size: int | None = None, resident: int = 0) -> tuple[int, str, torch.dtype | None] | None:
    """(tile size in latent px, grouping, storage dtype) when the untiled pass would not fit the free
    memory, else None. The free memory is `max_memory` less the VAE's weights and `resident` (the
    other weights on its device), or the device's free memory. The tiled path computes in float32
    where the VAE needs the upcast (latent_space.needs_upcast), so it is estimated so."""
    device = next(iter(vae.parameters())).device
    tiled_dtype = torch.float32 if needs_upcast(vae) else dtype
    upcast_extra = module_bytes(vae, tiled_dtype) - module_bytes(vae) if tiled_dtype != vae.dtype else 0
    if max_memory is not None:
        free = max_memory - resident - module_bytes(vae) - upcast_extra
    else:
        free = detect_budget(device) - upcast_extra
    option, needed, _ = _vae_choice(vae, kind, shape, dtype, free, None, tile_size, device.type, tiled_dtype)
    if option is not None and needed > free:
        raise MemoryBudgetError(
            f"VAE {kind} of a {'x'.join(map(str, shape))} {str(tiled_dtype).removeprefix('torch.')} tensor needs "
            f"≈{format_bytes(needed)} even tiled ({option[0]} latent px tiles, {option[1]} grouping, held in "
            f"{str(option[2] or tiled_dtype).removeprefix('torch.')}), free {format_bytes(free)}; try a smaller "
            f"size or pipe.enable_model_cpu_offload()"
        )
    return option


# -- planning one pipeline call (used by the memory technique) -------------------------------------
def pipeline_weights(pipe, device: torch.device) -> int:
    """Bytes of the pipeline's module weights that live on `device`."""
    total = 0
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            total += bytes_on_device(component, device)
    return total


def bytes_on_device(module: torch.nn.Module, device: torch.device) -> int:
    """Bytes of `module`'s parameters and buffers that live on `device`."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device == device)


def call_budget(pipe, denoiser, config, device: torch.device) -> tuple[int, int]:
    """(budget, other weights) of a call on `device`: `config.max_memory` or the free memory plus the
    weights already there; the other weights are those on `device` besides the denoiser and VAE."""
    weights = pipeline_weights(pipe, device)
    budget = config.max_memory if config.max_memory is not None else detect_budget(device) + weights
    return budget, weights - bytes_on_device(denoiser, device) - bytes_on_device(pipe.vae, device)


def plan_for_call(attachment, config, state, args, kwargs, sequential_allowed: bool = True,
                  decodes: bool = True) -> CallPlan:
    """The plan of one running (unstaged, or stage) pipeline call, from its state and the denoiser's
    first inputs: its denoiser at its size, and its decode at that size where `decodes`."""
    pipe, denoiser = attachment.pipe, attachment.denoiser
    parameter = next(iter(denoiser.parameters()))
    device, dtype = parameter.device, parameter.dtype
    first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    cfg = state.guidance_scale is not None
    batched = attachment.info.family.cfg_batched
    batch = max(1, first.shape[0] // (2 if cfg and batched else 1))
    budget, other = call_budget(pipe, denoiser, config, device)
    sequential = config.sequential_cfg if sequential_allowed else False
    tiling = attachment.config.vae_tiling
    tile_vae = None if not tiling.enabled or tiling.mode == "auto" else tiling.mode == "always"
    factor = attachment.info.latent_factor
    latent = (batch, pipe.vae.config.latent_channels, state.height // factor, state.width // factor)
    vae_passes = [VAEPass("decode", latent, "the call's decode")] if decodes else []
    return plan_call(denoiser, pipe.vae, denoiser_passes=[DenoiserPass(state.height, state.width, "the call's steps")],
                     vae_passes=vae_passes, latent_factor=factor,
                     dtype=dtype, batch=batch, cfg=cfg, cfg_batched=batched,
                     budget=budget, other_weights=other, feed_forward_chunks=config.feed_forward_chunks,
                     sequential_cfg=sequential, name=f"{state.width}x{state.height} {attachment.info.name}",
                     tile_vae=tile_vae, tile_size=tiling.tile_size if tiling.enabled else None,
                     device_type=device.type,
                     adaptations=attachment.estimate_adaptations)
