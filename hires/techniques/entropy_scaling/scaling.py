"""Attention-entropy scaling (Jin et al. 2023): each attention layer's softmax temperature times
lambda = sqrt(ln N / ln T), N and T clamped >= 2.

N is the number of keys a query of the layer attends to in this call, T the same at the base size.
`layers="self"` changes image self-attention only (UNet / PixArt `attn1`, SD3 / Flux joint
attention); `layers="all"` also records cross-attention layers, whose keys are text tokens, so N = T
and their factor is 1. For joint attention, `text_tokens="exclude"` counts image keys only (the text
part of the context does not grow with the image), `"include"` adds the text keys to both. With a
change before this one that splits the image into windows (window attention), N counts the keys one
query actually sees: its window, plus text.

The factor reaches the layer through hires' attention wrapper (hires.denoiser.attention): torch
SDPA's `scale=`, or the queries of processors that hand them to diffusers' dispatcher.
"""

from __future__ import annotations

import math

from ...denoiser.attention import AttentionChange, LayerCall, LayerRewrite, add_attention_change
from .config import EntropyScalingConfig

LOG_FACTORS = "log.entropy_factors"
LOG_KEYS = "log.entropy_keys"


def entropy_factor(keys: int, base_keys: int) -> float:
    """sqrt(ln N / ln T), both counts clamped to >= 2 so the logarithms stay finite and nonzero."""
    return math.sqrt(math.log(max(keys, 2)) / math.log(max(base_keys, 2)))


class EntropyScaling(AttentionChange):
    owner = "EntropyScalingConfig"

    def __init__(self, config: EntropyScalingConfig):
        self.config = config

    def cross_attention(self, keys: int, state, layer: str) -> None:
        if self.config.layers == "all":
            state.log.setdefault(LOG_FACTORS, {})[layer] = entropy_factor(keys, keys)
            state.log.setdefault(LOG_KEYS, {})[layer] = (keys, keys)

    def rewrite(self, call: LayerCall, rewrite: LayerRewrite, state, layer: str) -> LayerRewrite:
        text = call.text_tokens if self.config.text_tokens == "include" else 0
        keys, base_keys = rewrite.image_keys + text, rewrite.base_image_keys + text
        factor = entropy_factor(keys, base_keys)
        state.log.setdefault(LOG_FACTORS, {})[layer] = factor
        state.log.setdefault(LOG_KEYS, {})[layer] = (keys, base_keys)
        return rewrite.by(self.owner, factor=rewrite.factor * factor) if factor != 1.0 else rewrite


def install(attachment, config: EntropyScalingConfig) -> None:
    """Scale the softmax temperature of the denoiser's attention layers by sqrt(ln N / ln T)."""
    add_attention_change(attachment, EntropyScaling(config))
