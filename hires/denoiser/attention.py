"""The attention-processor wrapper that attention techniques plug their changes into.

How it attaches. Every attention processor of the denoiser is wrapped (through
`attachment.set_attn_processors`, so `hires.remove` puts the originals back). The wrapper runs the
original processor unchanged; only when an image self-attention layer needs a change in the
current call does it act, in one of two ways:
- processors that call torch's `scaled_dot_product_attention` themselves (AttnProcessor2_0 of
  UNets and PixArt, SD3's JointAttnProcessor2_0) run under a `TorchFunctionMode` that rewrites the
  layer's one SDPA call: a factor on its `scale=`, or a replacement of the call (windows, fused
  branches);
- processors that go through diffusers' attention dispatcher (Flux's FluxAttnProcessor) get the
  factor in their queries (`ProcessorFacts.query_outputs`), so every dispatcher backend (torch SDPA,
  flash-attn, xformers, sage, flex) runs it; a replaced call still needs a torch-SDPA backend.
The processors stay the user's own and torch SDPA keeps choosing its flash / memory-efficient
kernels: no attention matrix is ever built here.

Which tokens count. In one call a layer attends over image tokens and, for joint text-image
attention (SD3, Flux), text tokens. Image tokens of a layer are the tokens of its hidden states,
except in DiTs whose hidden states also carry text (Flux's single blocks): a call's image token count
per layer is at most `state.tokens`, the rest is text. A layer's token grid is the call's token grid
downsampled by a power of two (UNet levels; ceil division like diffusers' stride-2 convs); its base
grid is the same layer's grid at the base size (`LayerCall`).

Changes. A technique adds an `AttentionChange` with `add_attention_change`; per layer call the
wrapper hands the changes, in install order, the `LayerCall` and the `LayerRewrite` so far, and each
returns the rewrite it wants: a factor on the softmax scale, a replacement of the SDPA call
(`attend`), and the image keys one query sees (`image_keys`, which a windowed call lowers), so a later
change that counts keys (entropy scaling) sees what the earlier ones left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..families import PROCESSOR_FACTS, ProcessorFacts, base_area_size


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
    processor: str = ""  # class name of the layer's own processor, for messages

    @property
    def keys(self) -> int:
        return self.image_tokens + self.text_tokens

    def image_position(self, owner: str, layer: str) -> int:
        """Where the image tokens start, or a ValueError naming `owner` where the processor's order is unknown."""
        if self.image_start is None:
            raise ValueError(f"{owner} on layer {layer!r}: hires does not know where processor {self.processor} "
                             f"puts image tokens among text tokens; known processors: {', '.join(PROCESSOR_FACTS)}")
        return self.image_start


@dataclasses.dataclass(frozen=True)
class LayerRewrite:
    """How a layer's SDPA call changes: a factor on the softmax scale and/or a replacement of the call."""

    keys: int  # key count of the SDPA call to rewrite (others in the processor are left alone)
    image_keys: int  # image keys one query attends to (a window's, where windows split the grid)
    base_image_keys: int  # ...and at the base size
    factor: float = 1.0
    # attend(query, key, value, scale=..., dropout_p=..., attn_mask=...) in place of the layer's SDPA call
    attend: Callable | None = None
    owners: tuple[str, ...] = ()  # the configs that changed it, for messages

    @property
    def changes(self) -> bool:
        return self.factor != 1.0 or self.attend is not None

    def by(self, owner: str, **changes) -> "LayerRewrite":
        """This rewrite with `changes` made by `owner`."""
        if changes.get("attend") is not None and self.attend is not None:
            raise ValueError(f"{owner} and {', '.join(self.owners)} both replace the attention call; enable one")
        return dataclasses.replace(self, owners=(*self.owners, owner), **changes)


class AttentionChange:
    """What an attention technique adds to the wrapper (subclass and override)."""

    owner = "an attention change"  # the config class name, for messages

    def rewrite(self, call: LayerCall, rewrite: LayerRewrite, state, layer: str) -> LayerRewrite:
        """The rewrite of one self/joint attention call, given the rewrite of the changes before this one."""
        return rewrite

    def cross_attention(self, keys: int, state, layer: str) -> None:
        """A cross-attention call with `keys` text keys (left unchanged; for notes)."""


def _sdpa_arguments(args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


class _RewriteSDPA(TorchFunctionMode):
    """Rewrites the first torch SDPA call whose key count matches; every other op runs as is."""

    def __init__(self, rewrite: LayerRewrite, layer: str):
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
        if self.rewrite.attend is None:
            return func(query, call.pop("key"), call.pop("value"), scale=scale, **call)
        mask = call.get("attn_mask")
        if call.get("is_causal") or call.get("enable_gqa") or (mask is not None and mask.ndim != 4):
            raise ValueError(
                f"{' and '.join(self.rewrite.owners)} on layer {self.layer!r}: its attention call is causal, uses "
                "grouped-query attention or has a mask that is not (batch, heads, queries, keys), which a split "
                "attention call cannot honour; turn it off for this model"
            )
        return self.rewrite.attend(query, call["key"], call["value"], scale=scale,
                                   dropout_p=call.get("dropout_p", 0.0), attn_mask=mask)


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


def describe_call(state, hidden_states, encoder_hidden_states, joint: bool, token_order: str | None,
                  processor: str = "") -> LayerCall:
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
    _, window_grid = layer_grids(image, call_grid, (min(area_h, state.height) // unit,
                                                    min(area_w, state.width) // unit))
    if text == 0:
        start = 0
    else:
        # text_first sequences are [text, image, trailing tokens] (Flux.2's reference images last)
        start = {"image_first": 0, "text_first": text - state.trailing_tokens, None: None}[token_order]
    return LayerCall(image_tokens=image, text_tokens=text, image_start=start, grid=grid, base_grid=base_grid,
                     window_grid=window_grid, processor=processor)


class HiresAttnProcessor:
    """Wraps one layer's own processor; changes its SDPA call only while the call state asks for it.

    Concrete classes mirror the wrapped processor's `__call__` signature (diffusers filters the
    keyword arguments it passes by that signature), see `_wrapper_class`.
    """

    _forwarded = ("_attention_backend", "_parallel_config")

    def __init__(self, inner, layer: str, attachment, changes: tuple[AttentionChange, ...] = ()):
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "attachment", attachment)
        object.__setattr__(self, "changes", tuple(changes))
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

    def with_change(self, change: AttentionChange) -> "HiresAttnProcessor":
        return type(self)(self.inner, self.layer, self.attachment, (*self.changes, change))

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
            if rewrite.changes:
                mode = stack.enter_context(_RewriteSDPA(rewrite, self.layer))
            out = self.inner(attn, *args, **kwargs)
        if mode is not None and not mode.applied:
            raise RuntimeError(
                f"hires could not change attention layer {self.layer!r}: its processor "
                f"{type(self.inner).__name__} did not call torch's scaled_dot_product_attention with "
                f"{rewrite.keys} keys (a non-torch attention backend such as flash-attn, xformers or sage?). "
                "Use a torch SDPA backend (AttentionBackendConfig backend 'native' or '_native_*') or turn "
                f"{' and '.join(rewrite.owners)} off"
            )
        return out

    def _rewrite(self, attn, hidden_states, encoder_hidden_states, state) -> LayerRewrite | None:
        joint = encoder_hidden_states is not None and _has_added_projections(attn)
        if encoder_hidden_states is not None and not joint:
            # Cross-attention: keys are text tokens, as many at every image size (N = T); nothing changes.
            for change in self.changes:
                change.cross_attention(encoder_hidden_states.shape[1], state, self.layer)
            return None
        call = describe_call(state, hidden_states, encoder_hidden_states, joint,
                             self.facts.token_order if self.facts else None, type(self.inner).__name__)
        rewrite = LayerRewrite(keys=call.keys, image_keys=call.image_tokens,
                               base_image_keys=call.base_grid[0] * call.base_grid[1])
        for change in self.changes:
            rewrite = change.rewrite(call, rewrite, state, self.layer)
        return rewrite if rewrite.changes else None


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


def add_attention_change(attachment, change: AttentionChange) -> None:
    """Wrap every attention processor of the denoiser (once) and add `change` to the wrappers."""
    model = attachment.denoiser
    processors = {}
    for key, processor in model.attn_processors.items():
        if isinstance(processor, HiresAttnProcessor):
            processors[key] = processor.with_change(change)
        else:
            layer = key[: -len(".processor")] if key.endswith(".processor") else key
            processors[key] = _wrapper_class(type(processor))(processor, layer, attachment, (change,))
    attachment.set_attn_processors(model, processors)
