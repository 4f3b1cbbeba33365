"""Attention at high resolution: entropy scaling, windowed self-attention, backend selection.

How it attaches. Every attention processor of the denoiser is wrapped (through
`attachment.set_attn_processors`, so `hires.remove` puts the originals back). The wrapper runs the
original processor unchanged; only when an image self-attention layer needs a change in the
current call does it act, in one of two ways:
- processors that call torch's `scaled_dot_product_attention` themselves (AttnProcessor2_0 of
  UNets and PixArt, SD3's JointAttnProcessor2_0) run under a `TorchFunctionMode` that rewrites the
  layer's one SDPA call: a `scale=` argument for entropy scaling, a split into windows;
- processors that go through diffusers' attention dispatcher (Flux's FluxAttnProcessor) get the
  entropy factor in their queries (`ProcessorFacts.query_outputs`), so every dispatcher backend
  (torch SDPA, flash-attn, xformers, sage, flex) runs it; their windows use the SDPA rewrite, so
  windowed Flux needs a torch-SDPA backend (the default "native").
The processors stay the user's own and torch SDPA keeps choosing its flash / memory-efficient
kernels: no attention matrix is ever built here.

Which tokens count (N and T). In one call a layer attends over image tokens and, for joint
text-image attention (SD3, Flux), text tokens. Image tokens of a layer are the tokens of its
hidden states, except in DiTs whose hidden states also carry text (Flux's single blocks): a call's
image token count per layer is at most `state.tokens`, the rest is text. A layer's token grid is
the call's token grid downsampled by a power of two (UNet levels; ceil division like diffusers'
stride-2 convs); T is the same layer's count on the base-size grid.
- Entropy scaling (Jin et al. 2023): lambda = sqrt(ln N / ln T), N and T clamped >= 2, passed as
  `scale = lambda / sqrt(d)`. `layers="self"` changes image self-attention only (UNet/PixArt
  `attn1`, SD3/Flux joint attention); `layers="all"` also records cross-attention layers, whose
  keys are text tokens, so N = T and their factor is 1. For joint attention,
  `text_tokens="exclude"` counts image keys only (N = image keys now, T = image keys at the base
  size: the text part of the context does not grow with the image), `"include"` adds the text keys
  to both. With windows on, N counts the keys one query actually sees (its window, plus text).
- Windowed attention: image queries attend within windows of the layer's grid (default window:
  as many tokens as the layer's grid has at the base size, at the call's aspect ratio, so a call at
  or below the base area is untouched). A grid that does not
  divide evenly is split into near-equal windows (sizes differ by at most one token per side):
  an exact partition with no padding and no mask, so flash kernels stay usable. Shifting rolls the
  grid cyclically by per-step offsets drawn from `state.generator("windows")` (as HiDiffusion's
  shifted windows do; tokens of opposite edges may share a window at that step). In joint
  attention the text tokens stay global: every window also sees all text keys and text queries see
  every key. Works for UNet self-attention and the DiTs (PixArt self-attention, SD3/Flux joint
  attention, where the token order of the processor is listed in `PROCESSOR_FACTS`).
- Scale fusion (hires.techniques.scale_fusion) plans its fused global/local call per layer through the
  wrapper's `fusion` setting; the layer's SDPA call is replaced by it, the entropy factor included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch.overrides import TorchFunctionMode

from ..config import AttentionBackendConfig, EntropyScalingConfig, WindowAttentionConfig
from ..families import PROCESSOR_FACTS, ProcessorFacts, base_area_size
from ..registry import Technique

BACKEND_HOOK = "hires.attention_backend"
LOG_FACTORS = "log.entropy_factors"
LOG_KEYS = "log.entropy_keys"
LOG_WINDOWS = "log.windows"
LOG_WINDOW_OFFSETS = "log.window_offsets"

# -- math: pure functions of counts and tensors -------------------------------------------------

def entropy_factor(keys: int, base_keys: int) -> float:
    """sqrt(ln N / ln T), both counts clamped to >= 2 so the logarithms stay finite and nonzero."""
    return math.sqrt(math.log(max(keys, 2)) / math.log(max(base_keys, 2)))


def layer_grids(image_tokens: int, grid: tuple[int, int], base_grid: tuple[int, int]):
    """The layer's token grid in this call and at the base size, from its image token count.

    A layer sees the call's grid downsampled by a power of two (each halving rounds up, like a
    stride-2 convolution with padding 1); the stride is the one whose grid has `image_tokens`.
    """
    (height, width), (base_height, base_width) = grid, base_grid
    stride = 1
    while True:
        rows, cols = -(-height // stride), -(-width // stride)
        if rows * cols == image_tokens:
            return (rows, cols), (-(-base_height // stride), -(-base_width // stride))
        if rows * cols < image_tokens or rows * cols == 1:
            raise ValueError(
                f"an attention layer sees {image_tokens} image tokens, which is no power-of-two "
                f"downsampling of the {height}x{width} token grid; hires cannot place its windows or T"
            )
        stride *= 2


def window_runs(length: int, window: int) -> list[tuple[int, int, int]]:
    """Split `length` tokens into ceil(length / window) near-equal windows.

    Returns runs (start, count, size): `count` consecutive windows of `size` tokens from `start`.
    Sizes differ by at most one, none exceeds `window`, and the windows cover every token once.
    """
    count = -(-length // window)
    size, larger = divmod(length, count)
    runs = [(0, larger, size + 1), (larger * (size + 1), count - larger, size)]
    return [run for run in runs if run[1] > 0]


def windowed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    grid: tuple[int, int],
    window: tuple[int, int],
    offset: tuple[int, int] = (0, 0),
    image_start: int = 0,
    scale: float | None = None,
    dropout_p: float = 0.0,
    attend: Callable = F.scaled_dot_product_attention,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of (batch, heads, tokens, dim) tensors with image queries in windows.

    Tokens [image_start, image_start + rows*cols) are the image, row-major on `grid`; any other
    tokens (text) are global. The image grid is rolled by -offset, split into near-equal windows of
    at most `window`, each window's queries attend to that window's keys plus all text keys, and the
    result is rolled back. Text queries attend to all keys. One `attend` call per window shape.
    `attn_mask` (broadcastable to (batch, heads, tokens, tokens), boolean or additive; Chroma's text
    padding mask) is cut to each window's queries and keys.
    """
    batch, heads, tokens, _ = query.shape
    rows, cols = grid
    image_end = image_start + rows * cols
    has_text = image_start > 0 or image_end < tokens

    def image_grid(x):
        x = x[:, :, image_start:image_end].unflatten(2, (rows, cols))
        return torch.roll(x, shifts=(-offset[0], -offset[1]), dims=(2, 3)) if any(offset) else x

    q_grid, k_grid, v_grid = image_grid(query), image_grid(key), image_grid(value)
    text_index = torch.cat([torch.arange(image_start), torch.arange(image_end, tokens)]).to(query.device)
    if has_text:
        text_keys = torch.cat([key[:, :, :image_start], key[:, :, image_end:]], dim=2)
        text_values = torch.cat([value[:, :, :image_start], value[:, :, image_end:]], dim=2)
    if attn_mask is not None:
        attn_mask = attn_mask.expand(attn_mask.shape[0] if attn_mask.shape[0] != 1 else batch,
                                     *attn_mask.shape[1:-2], tokens, tokens)
        # each image token's sequence index, laid out (and rolled) like the image grid
        index_grid = image_grid(torch.arange(tokens, device=query.device)[None, None, :, None])
    out_grid = q_grid.new_empty((batch, heads, rows, cols, value.shape[-1]))

    for row0, n_rows, size_r in window_runs(rows, window[0]):
        for col0, n_cols, size_c in window_runs(cols, window[1]):
            area = (slice(None), slice(None), slice(row0, row0 + n_rows * size_r), slice(col0, col0 + n_cols * size_c))

            def to_windows(x):
                lead = x.shape[:2]  # (batch, heads); (1, 1) for the index grid
                x = x[area].reshape(*lead, n_rows, size_r, n_cols, size_c, x.shape[-1])
                return x.permute(0, 2, 4, 1, 3, 5, 6).reshape(lead[0] * n_rows * n_cols, lead[1], size_r * size_c, x.shape[-1])

            q_w, k_w, v_w = to_windows(q_grid), to_windows(k_grid), to_windows(v_grid)
            if has_text:
                def per_window(x):
                    x = x[:, None].expand(batch, n_rows * n_cols, *x.shape[1:])
                    return x.reshape(batch * n_rows * n_cols, *x.shape[2:])

                k_w = torch.cat([k_w, per_window(text_keys)], dim=2)
                v_w = torch.cat([v_w, per_window(text_values)], dim=2)
            mask_w = None
            if attn_mask is not None:
                windows = n_rows * n_cols
                query_index = to_windows(index_grid)[:, 0, :, 0]  # (windows, window tokens)
                key_index = torch.cat([query_index, text_index[None].expand(windows, -1)], dim=1)
                mask_rows = attn_mask[:, :, query_index]  # (B, H', windows, window tokens, tokens)
                mask_w = mask_rows.gather(-1, key_index[None, None, :, None, :].expand(
                    *mask_rows.shape[:-1], key_index.shape[1]))
                mask_w = mask_w.transpose(1, 2)
                mask_w = mask_w.reshape(batch * windows, *mask_w.shape[2:])
            out = attend(q_w, k_w, v_w, dropout_p=dropout_p, scale=scale, **({} if mask_w is None else {"attn_mask": mask_w}))
            out = out.reshape(batch, n_rows, n_cols, heads, size_r, size_c, out.shape[-1])
            out_grid[area] = out.permute(0, 3, 1, 4, 2, 5, 6).reshape(batch, heads, n_rows * size_r, n_cols * size_c, -1)

    if any(offset):
        out_grid = torch.roll(out_grid, shifts=offset, dims=(2, 3))
    out_image = out_grid.flatten(2, 3)
    if not has_text:
        return out_image
    def text_rows(start, end):
        return {} if attn_mask is None else {"attn_mask": attn_mask[:, :, start:end]}

    parts = []
    if image_start > 0:
        parts.append(attend(query[:, :, :image_start], key, value, dropout_p=dropout_p, scale=scale,
                            **text_rows(0, image_start)))
    parts.append(out_image)
    if image_end < tokens:
        parts.append(attend(query[:, :, image_end:], key, value, dropout_p=dropout_p, scale=scale,
                            **text_rows(image_end, tokens)))
    return torch.cat(parts, dim=2)


# -- one layer's call: what it attends over, what changes -----------------------------------

@dataclasses.dataclass(frozen=True)
class LayerCall:
    """What one self/joint attention call attends over, in this pipeline call."""

    image_tokens: int
    text_tokens: int
    image_start: int | None  # position of the image tokens in the attended sequence (None: unknown order)
    grid: tuple[int, int]  # the layer's image token grid now
    base_grid: tuple[int, int]  # ...and at the base size
    window_grid: tuple[int, int] | None = None  # ...and at the base area in the call's aspect (the default window)

    @property
    def keys(self) -> int:
        return self.image_tokens + self.text_tokens


@dataclasses.dataclass(frozen=True)
class _Rewrite:
    """How the layer's SDPA call changes: a factor on the softmax scale, and/or windows."""

    keys: int  # key count of the SDPA call to rewrite (others in the processor are left alone)
    factor: float = 1.0
    windows: tuple[tuple[int, int], tuple[int, int], tuple[int, int], int] | None = None  # grid, window, offset, image_start
    # scale fusion (hires.techniques.scale_fusion): the layer's fused attention, called as attend(q, k, v, scale=...)
    fusion: Callable | None = None


def _sdpa_arguments(args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


class _RewriteSDPA(TorchFunctionMode):
    """Rewrites the first torch SDPA call whose key count matches; every other op runs as is."""

    def __init__(self, rewrite: _Rewrite, layer: str):
        super().__init__()
        self.rewrite = rewrite
        self.layer = layer
        self.applied = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.applied:
            return func(*args, **kwargs)
        call = _sdpa_arguments(args, kwargs)
        if call["key"].shape[-2] != self.rewrite.keys:
            return func(*args, **kwargs)
        self.applied = True
        query = call.pop("query")
        base = call.pop("scale", None)
        scale = (base if base is not None else query.shape[-1] ** -0.5) * self.rewrite.factor
        if self.rewrite.windows is None and self.rewrite.fusion is None:
            return func(query, call.pop("key"), call.pop("value"), scale=scale, **call)
        mask = call.get("attn_mask")
        if call.get("is_causal") or call.get("enable_gqa") or (mask is not None and mask.ndim != 4):
            raise ValueError(
                f"window attention / scale fusion on layer {self.layer!r}: its attention call is causal, uses "
                "grouped-query attention or has a mask that is not (batch, heads, queries, keys), which windows "
                "cannot honour; turn WindowAttentionConfig and ScaleFusionConfig off for this model"
            )
        if self.rewrite.fusion is not None:
            if mask is not None:
                raise ValueError(
                    f"scale fusion on layer {self.layer!r}: its attention call has a mask (Chroma's text padding "
                    "mask), which scale fusion's branches cannot honour; turn ScaleFusionConfig off for this model"
                )
            return self.rewrite.fusion(query, call["key"], call["value"], scale=scale,
                                       dropout_p=call.get("dropout_p", 0.0))
        grid, window, offset, image_start = self.rewrite.windows
        return windowed_attention(query, call["key"], call["value"], grid, window, offset, image_start,
                                  scale=scale, dropout_p=call.get("dropout_p", 0.0), attn_mask=mask)


def _has_added_projections(attn) -> bool:
    return getattr(attn, "add_k_proj", None) is not None


def _processor_facts(processor) -> ProcessorFacts | None:
    for cls in type(processor).__mro__:
        if cls.__name__ in PROCESSOR_FACTS:
            return PROCESSOR_FACTS[cls.__name__]
    return None


def _scale_output(factor: float):
    def hook(module, args, output):
        return output * factor
    return hook


def _sequence_length(hidden_states: torch.Tensor) -> int:
    # UNet processors may receive (batch, channels, height, width) feature maps.
    return hidden_states.shape[2] * hidden_states.shape[3] if hidden_states.ndim == 4 else hidden_states.shape[1]


def describe_call(state, hidden_states, encoder_hidden_states, joint: bool, token_order: str | None) -> LayerCall:
    """Image/text token counts and grids of one self/joint attention call (see the module doc)."""
    info = state.info
    unit = info.token_side
    own = _sequence_length(hidden_states)
    image = min(own, state.tokens)
    text = own - image + (encoder_hidden_states.shape[1] if joint else 0)
    call_grid = (state.height // unit, state.width // unit)
    grid, base_grid = layer_grids(image, call_grid, (info.base_height // unit, info.base_width // unit))
    # The default window: the base area at the call's aspect ratio, downsampled like the layer's grid.
    # Models trained on aspect buckets see such grids natively: a call whose base-area size is not
    # smaller than itself (SDXL's 832x1216) is one window, untouched; a 2:1 request gets 2:1 windows.
    area_h, area_w = base_area_size(info, state.height, state.width)
    _, window_grid = layer_grids(image, call_grid, (min(area_h, state.height) // unit, min(area_w, state.width) // unit))
    if text == 0:
        start = 0
    else:
        # text_first sequences are [text, image, trailing tokens] (Flux.2's reference images last)
        start = {"image_first": 0, "text_first": text - state.trailing_tokens, None: None}[token_order]
    return LayerCall(image_tokens=image, text_tokens=text, image_start=start, grid=grid, base_grid=base_grid,
                     window_grid=window_grid)


@dataclasses.dataclass
class _WindowCall:
    offsets: torch.Tensor | None = None


def _window_offsets(state) -> torch.Tensor:
    """Per-step window shifts as fractions of a window, drawn once per call from its generator."""
    slot = state.slot(_WindowCall)
    offsets = slot.offsets
    if offsets is None:
        steps = max(state.num_steps, 1)
        offsets = torch.rand((steps, 2), generator=state.generator("windows"), dtype=torch.float64)
        slot.offsets = offsets
        state.log[LOG_WINDOW_OFFSETS] = [tuple(row) for row in offsets.tolist()]
    return offsets


class HiresAttnProcessor:
    """Wraps one layer's own processor; changes its SDPA call only while the call state asks for it.

    Concrete classes mirror the wrapped processor's `__call__` signature (diffusers filters the
    keyword arguments it passes by that signature), see `_wrapper_class`.
    """

    _forwarded = ("_attention_backend", "_parallel_config")

    def __init__(self, inner, layer: str, attachment, entropy: EntropyScalingConfig | None = None,
                 window: WindowAttentionConfig | None = None, fusion=None):
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "attachment", attachment)
        object.__setattr__(self, "entropy", entropy)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "fusion", fusion)  # a hires.techniques.scale_fusion.ScaleFusion
        object.__setattr__(self, "facts", _processor_facts(inner))

    # diffusers' set_attention_backend sets these on processors: they belong to the wrapped one.
    def __getattr__(self, name):
        if name in HiresAttnProcessor._forwarded:
            return getattr(self.inner, name)
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name in HiresAttnProcessor._forwarded:
            setattr(self.inner, name, value)
        else:
            object.__setattr__(self, name, value)

    def with_settings(self, **settings) -> "HiresAttnProcessor":
        current = {"entropy": self.entropy, "window": self.window, "fusion": self.fusion}
        current.update(settings)
        return type(self)(self.inner, self.layer, self.attachment, **current)

    def _call(self, attn, args, kwargs):
        state = self.attachment.state
        if state is None:
            return self.inner(attn, *args, **kwargs)
        hidden_states = args[0] if args else kwargs["hidden_states"]
        encoder_hidden_states = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        rewrite = self._rewrite(attn, hidden_states, encoder_hidden_states, state)
        if rewrite is None:
            return self.inner(attn, *args, **kwargs)
        mode = None
        with contextlib.ExitStack() as stack:
            query_modules = [getattr(attn, name, None) for name in (self.facts.query_outputs if self.facts else ())]
            query_modules = [m for m in query_modules if m is not None]
            if rewrite.factor != 1.0 and query_modules:
                for module in query_modules:
                    stack.callback(module.register_forward_hook(_scale_output(rewrite.factor)).remove)
                rewrite = dataclasses.replace(rewrite, factor=1.0)
            if rewrite.factor != 1.0 or rewrite.windows is not None or rewrite.fusion is not None:
                mode = stack.enter_context(_RewriteSDPA(rewrite, self.layer))
            out = self.inner(attn, *args, **kwargs)
        if mode is not None and not mode.applied:
            raise RuntimeError(
                f"hires could not change attention layer {self.layer!r}: its processor "
                f"{type(self.inner).__name__} did not call torch's scaled_dot_product_attention with "
                f"{rewrite.keys} keys (a non-torch attention backend such as flash-attn, xformers or sage?). "
                "Use a torch SDPA backend (AttentionBackendConfig backend 'native' or '_native_*') or turn "
                "window attention (and, for this processor, entropy scaling) off"
            )
        return out

    def _rewrite(self, attn, hidden_states, encoder_hidden_states, state) -> _Rewrite | None:
        joint = encoder_hidden_states is not None and _has_added_projections(attn)
        if encoder_hidden_states is not None and not joint:
            # Cross-attention: keys are text tokens, as many at every image size (N = T).
            if self.entropy is not None and self.entropy.layers == "all":
                keys = encoder_hidden_states.shape[1]
                state.log.setdefault(LOG_FACTORS, {})[self.layer] = entropy_factor(keys, keys)
                state.log.setdefault(LOG_KEYS, {})[self.layer] = (keys, keys)
            return None
        call = describe_call(state, hidden_states, encoder_hidden_states, joint,
                             self.facts.token_order if self.facts else None)

        windows = None
        image_keys, base_image_keys = call.image_tokens, call.base_grid[0] * call.base_grid[1]
        if self.window is not None:
            size = (self.window.window,) * 2 if self.window.window is not None else call.window_grid
            if call.grid[0] > size[0] or call.grid[1] > size[1]:
                if call.image_start is None:
                    raise ValueError(
                        f"window attention on layer {self.layer!r}: hires does not know where processor "
                        f"{type(self.inner).__name__} puts image tokens among text tokens; known processors: "
                        f"{', '.join(PROCESSOR_FACTS)}"
                    )
                runs = [window_runs(side, limit) for side, limit in zip(call.grid, size)]
                largest = tuple(r[0][2] for r in runs)
                counts = tuple(sum(n for _, n, _ in r) for r in runs)
                fractions = _window_offsets(state)[max(state.step_index, 0) % max(state.num_steps, 1)]
                offset = tuple(
                    int(f * largest[axis]) if self.window.shift and counts[axis] > 1 else 0
                    for axis, f in enumerate(fractions.tolist())
                )
                windows = (call.grid, size, offset, call.image_start)
                image_keys = largest[0] * largest[1]
                state.log.setdefault(LOG_WINDOWS, {})[self.layer] = {
                    "grid": call.grid, "window": largest, "windows": counts[0] * counts[1], "offset": offset}

        fusion = None
        if self.fusion is not None:
            fusion = self.fusion.plan(call, state, self.layer)
            if fusion is not None and call.image_start is None:
                raise ValueError(
                    f"scale fusion on layer {self.layer!r}: hires does not know where processor "
                    f"{type(self.inner).__name__} puts image tokens among text tokens; known processors: "
                    f"{', '.join(PROCESSOR_FACTS)}"
                )

        factor = 1.0
        if self.entropy is not None:
            text = call.text_tokens if self.entropy.text_tokens == "include" else 0
            keys, base_keys = image_keys + text, base_image_keys + text
            factor = entropy_factor(keys, base_keys)
            state.log.setdefault(LOG_FACTORS, {})[self.layer] = factor
            state.log.setdefault(LOG_KEYS, {})[self.layer] = (keys, base_keys)
        if factor == 1.0 and windows is None and fusion is None:
            return None
        return _Rewrite(keys=call.keys, factor=factor, windows=windows, fusion=fusion)


_WRAPPER_CLASSES: dict[type, type] = {}


def _wrapper_class(inner_cls: type) -> type:
    """A HiresAttnProcessor subclass whose __call__ has the wrapped class's signature."""
    cls = _WRAPPER_CLASSES.get(inner_cls)
    if cls is None:
        def __call__(self, attn, *args, **kwargs):
            return self._call(attn, args, kwargs)

        __call__.__signature__ = inspect.signature(inner_cls.__call__)
        cls = type(f"Hires{inner_cls.__name__}", (HiresAttnProcessor,), {"__call__": __call__})
        _WRAPPER_CLASSES[inner_cls] = cls
    return cls


def install_attention_processors(attachment, **settings) -> None:
    """Wrap every attention processor of the denoiser (or update hires' wrappers) with `settings`."""
    model = attachment.denoiser
    processors = {}
    for key, processor in model.attn_processors.items():
        if isinstance(processor, HiresAttnProcessor):
            processors[key] = processor.with_settings(**settings)
        else:
            layer = key[: -len(".processor")] if key.endswith(".processor") else key
            processors[key] = _wrapper_class(type(processor))(processor, layer, attachment, **settings)
    attachment.set_attn_processors(model, processors)


def install_entropy_scaling(attachment, config: EntropyScalingConfig) -> None:
    """Scale the softmax temperature of the denoiser's attention layers by sqrt(ln N / ln T)."""
    install_attention_processors(attachment, entropy=config)


def install_window_attention(attachment, config: WindowAttentionConfig) -> None:
    """Run image self-attention in (shifted) windows of the base-size token grid."""
    install_attention_processors(attachment, window=config)


# -- attention backend -----------------------------------------------------------------------

# Backends that run torch's scaled_dot_product_attention, and the SDPA kernels each allows
# (None: torch's own choice). Entropy scaling and windows rewrite SDPA, so they need one of these.
TORCH_SDPA_BACKENDS = {
    "native": None,
    "_native_flash": "FLASH_ATTENTION",
    "_native_efficient": "EFFICIENT_ATTENTION",
    "_native_math": "MATH",
}


def _uses_dispatcher(model) -> bool:
    """Whether every attention processor goes through diffusers' attention dispatcher."""
    # ZImageTransformer2DModel has no attn_processors (no AttentionMixin): its Attention modules tell.
    processors = (model.attn_processors.values() if hasattr(model, "attn_processors")
                  else [m.processor for m in model.modules() if hasattr(m, "processor")])
    return all(hasattr(p, "_attention_backend") for p in processors)


class _BackendHook(ModelHook):
    """Runs the denoiser's forward inside diffusers' / torch's backend-selection context."""

    def __init__(self, make_context: Callable[[], contextlib.AbstractContextManager]):
        super().__init__()
        self.make_context = make_context

    def new_forward(self, module, *args, **kwargs):
        with self.make_context():
            return self.fn_ref.original_forward(*args, **kwargs)


def backend_context(backend: str, dispatcher: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """The context that selects `backend`: diffusers' `attention_backend` for dispatcher
    processors, torch's `sdpa_kernel` for processors that call torch SDPA themselves."""
    if dispatcher:
        from diffusers.models.attention_dispatch import attention_backend

        try:
            with attention_backend(backend):  # checks now that the backend's package is installed
                pass
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"AttentionBackendConfig.backend={backend!r} cannot run here: {err}") from err
        return lambda: attention_backend(backend)
    if backend not in TORCH_SDPA_BACKENDS:
        raise ValueError(
            f"AttentionBackendConfig.backend={backend!r}: this model's attention processors call torch's "
            f"scaled_dot_product_attention directly (not diffusers' dispatcher), so the choices are "
            f"{', '.join(map(repr, TORCH_SDPA_BACKENDS))}; for xformers on a UNet call "
            "pipe.enable_xformers_memory_efficient_attention() instead"
        )
    kernel = TORCH_SDPA_BACKENDS[backend]
    if kernel is None:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel(getattr(SDPBackend, kernel))


def install_attention_backend(attachment, config: AttentionBackendConfig) -> None:
    """Select the attention kernel for the denoiser's forward (removed with the hook)."""
    model = attachment.denoiser
    dispatcher = _uses_dispatcher(model)
    # Windows split torch SDPA calls; entropy scaling needs torch SDPA only where it cannot go into queries.
    needs_torch_sdpa = [name for name in attachment.enabled_with("torch_sdpa")
                        if not (name == "entropy_scaling" and dispatcher)]
    if needs_torch_sdpa and config.backend not in TORCH_SDPA_BACKENDS:
        raise ValueError(
            f"AttentionBackendConfig.backend={config.backend!r} conflicts with {' and '.join(needs_torch_sdpa)}, which "
            f"change torch's scaled_dot_product_attention call; use one of {', '.join(map(repr, TORCH_SDPA_BACKENDS))}"
        )
    attachment.add_hook(model, _BackendHook(backend_context(config.backend, dispatcher)), BACKEND_HOOK)


TECHNIQUES = [
    Technique("entropy_scaling", EntropyScalingConfig, install_entropy_scaling, order=40,
              capabilities=frozenset({"attention_processors", "torch_sdpa"})),
    Technique("window_attention", WindowAttentionConfig, install_window_attention, order=50,
              capabilities=frozenset({"attention_processors", "torch_sdpa"})),
    Technique("attention_backend", AttentionBackendConfig, install_attention_backend, order=60),
]
