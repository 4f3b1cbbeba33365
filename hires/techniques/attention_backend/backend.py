"""The attention kernel the denoiser runs, through diffusers' attention dispatcher or torch's SDPA backends."""

from __future__ import annotations

import contextlib
from typing import Callable

from diffusers.hooks import ModelHook

from .config import AttentionBackendConfig

BACKEND_HOOK = "hires.attention_backend"

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


def install(attachment, config: AttentionBackendConfig) -> None:
    """Select the attention kernel for the denoiser's forward (removed with the hook)."""
    model = attachment.denoiser
    dispatcher = _uses_dispatcher(model)
    # A replaced SDPA call needs torch SDPA; a softmax factor only where it cannot go into the dispatcher's queries.
    needs_torch_sdpa = attachment.enabled_with("torch_sdpa")
    if not dispatcher:
        needs_torch_sdpa += attachment.enabled_with("softmax_scale")
    if needs_torch_sdpa and config.backend not in TORCH_SDPA_BACKENDS:
        raise ValueError(
            f"AttentionBackendConfig.backend={config.backend!r} "
            f"conflicts with {' and '.join(needs_torch_sdpa)}, which "
            f"change torch's scaled_dot_product_attention call; use one of {', '.join(map(repr, TORCH_SDPA_BACKENDS))}"
        )
    attachment.add_hook(model, _BackendHook(backend_context(config.backend, dispatcher)), BACKEND_HOOK)
