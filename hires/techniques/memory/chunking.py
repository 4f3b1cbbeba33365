"""The memory mechanisms: feed-forward chunking and sequential classifier-free guidance.

The planner (`estimate`) decides; `install` installs the decisions with these.

- Feed-forward chunking uses diffusers' own mechanism (`set_chunk_feed_forward`, what
  `enable_forward_chunking` sets on every block): a named hook on each block that has it sets the
  block's `_chunk_size` / `_chunk_dim` for the sequence lengths of each call (a chunk size must
  divide them, and they change with the requested size), and puts the block's own values back
  when removed.
- Sequential CFG: for families whose pipeline batches [uncond, cond] into one denoiser call, a
  hook runs the two halves one after the other and concatenates the outputs, halving activation
  memory. It wraps the denoiser outside the hooks of techniques installed before it, so those see
  half batches: guidance techniques that need both halves (APG) cannot be combined with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from diffusers.hooks import HookRegistry, ModelHook

FF_HOOK = "hires.ff_chunks"
SEQUENTIAL_CFG_HOOK = "hires.sequential_cfg"
# Techniques that combine the cond/uncond halves inside the denoiser hook: they need the whole batch.
_MIN_CHUNK_TOKENS = 64  # below this, chunking along the sequence costs more than it saves


def chunk_size_for(lengths: list[int], chunks: int) -> tuple[int, int]:
    """(chunk_size, dim) for diffusers' `_chunked_feed_forward` that splits sequences of `lengths`
    into about `chunks` pieces: a divisor of all of them along dim 1, else one sample at a time (dim 0)."""
    common = math.gcd(*lengths)
    target = max(1, lengths[0] // chunks)
    divisors = [d for d in range(1, int(math.isqrt(common)) + 1) if common % d == 0]
    divisors = sorted(set(divisors + [common // d for d in divisors]))
    fitting = [d for d in divisors if d <= target]
    size = fitting[-1] if fitting else 1
    if size < min(_MIN_CHUNK_TOKENS, target):
        return 1, 0
    return size, 1


@dataclasses.dataclass
class Choices:
    """The current call's memory choices, shared by the hooks (set by the plan hook per call)."""

    feed_forward_chunks: int = 1
    sequential_cfg: bool = False


class FeedForwardChunkHook(ModelHook):
    """Sets a block's feed-forward chunking for each call's sequence lengths; restores it on removal."""

    def __init__(self, choices: Choices | int):
        super().__init__()
        self.choices = choices if isinstance(choices, Choices) else Choices(feed_forward_chunks=choices)
        self._saved = None

    def initialize_hook(self, module):
        self._saved = (module.__dict__.get("_chunk_size"), module.__dict__.get("_chunk_dim"))
        return module

    def deinitalize_hook(self, module):
        module._chunk_size, module._chunk_dim = self._saved
        return module

    def pre_forward(self, module, *args, **kwargs):
        chunks = self.choices.feed_forward_chunks
        if chunks <= 1:
            module._chunk_size, module._chunk_dim = self._saved
            return args, kwargs
        hidden = args[0] if args else kwargs.get("hidden_states")
        lengths = [hidden.shape[1]]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if getattr(module, "ff_context", None) is not None and isinstance(context, torch.Tensor):
            lengths.append(context.shape[1])
        module._chunk_size, module._chunk_dim = chunk_size_for(lengths, chunks)
        return args, kwargs


def chunkable_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "set_chunk_feed_forward") and hasattr(m, "_chunk_size")]


@contextlib.contextmanager
def feed_forward_chunking(model: torch.nn.Module, chunks: int):
    """Chunk `model`'s feed-forwards into about `chunks` pieces while inside (used on meta copies)."""
    if chunks <= 1:
        yield model
        return
    blocks = chunkable_blocks(model)
    for block in blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(FeedForwardChunkHook(chunks), FF_HOOK)
    try:
        yield model
    finally:
        for block in blocks:
            block._diffusers_hook.remove_hook(FF_HOOK, recurse=False)


def _split(value, n: int, half: int):
    if isinstance(value, torch.Tensor):
        if not value.ndim or value.shape[0] != n:
            return value
        return value[half * (n // 2):(half + 1) * (n // 2)]
    if isinstance(value, dict):
        return {k: _split(v, n, half) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_split(v, n, half) for v in value)
    return value


def _concat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if dataclasses.is_dataclass(a):
        return type(a)(**{f.name: _concat(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)})
    if isinstance(a, (list, tuple)):
        return type(a)(_concat(x, y) for x, y in zip(a, b))
    return a


class SequentialCFGHook(ModelHook):
    """Runs a [uncond, cond] batch as two half-batch calls; identical maths, half the activations."""

    def __init__(self, choices: Choices | None = None):
        super().__init__()
        self.choices = choices or Choices(sequential_cfg=True)

    def new_forward(self, module, *args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        n = first.shape[0]
        if not self.choices.sequential_cfg or n < 2 or n % 2:
            return self.fn_ref.original_forward(*args, **kwargs)
        halves = [self.fn_ref.original_forward(*_split(args, n, h), **_split(kwargs, n, h)) for h in (0, 1)]
        return _concat(*halves)
