"""The finite-output guard: a call whose result holds NaN or infinity raises instead of returning it.

A pipeline whose guidance overflowed, whose weights are damaged, or whose float16 VAE overflowed
returns an image of NaNs, which PIL turns into black pixels without a word. With hires attached,
two checks stop that, each one reduction over one tensor per pipeline call (never per step):
- `check_latents`, when the denoising loop has ended (the runtime's call scope, before any decode):
  the loop's final `latents`;
- the pipeline's `image_processor.postprocess`, shadowed through the attachment's ledger: the decoded
  image, before it becomes a PIL image, an array or the returned tensor.
Only reads: a finite result is returned untouched (bit-identical to the pipeline without hires).

On failure, and only then, the error looks for the likely cause: a guidance value that overflowed,
a component whose weights hold non-finite values, float16 arithmetic. `NonFiniteOutputError`
carries those findings as fields, so the command line can name its own options instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# Call arguments that scale the denoiser's outputs: the first suspects when the result overflows.
GUIDANCE_ARGUMENTS = ("guidance_scale", "true_cfg_scale")
# Guidance scales in use stay far below this; above it, a non-finite result is blamed on the scale.
LARGE_GUIDANCE = 100.0


class NonFiniteOutputError(ValueError):
    """The call's latents or decoded image hold NaN or infinity; nothing of it should be kept.

    Fields: `stage` ("latents" or "image"), `kind` of the likely cause ("guidance", "weights",
    "inputs", "float16" or "unknown"), `parameter` / `value` (the call argument blamed, for
    "guidance"), `component` / `tensor` (the module and the first non-finite weight, for "weights"),
    `counts` ((NaN, infinite, total) values of the checked tensor).
    """

    def __init__(self, message: str, *, stage: str, kind: str, counts: tuple[int, int, int],
                 parameter: str | None = None, value: Any = None, component: str | None = None,
                 tensor: str | None = None):
        super().__init__(message)
        self.stage, self.kind, self.counts = stage, kind, counts
        self.parameter, self.value = parameter, value
        self.component, self.tensor = component, tensor


def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())  # the one reduction (and device sync) of a check


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):  # a list of per-sample latents
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def check_latents(attachment, frame, call_locals: dict[str, Any]) -> None:
    """Raise `NonFiniteOutputError` if the denoising loop running in `frame` ended with non-finite latents."""
    if frame is None:
        return
    for latents in _tensors(frame.f_locals.get("latents")):
        if not _finite(latents):
            raise _error(attachment, "latents", latents, call_locals, frame.f_locals)


def install(attachment) -> None:
    """Check every decoded image the pipeline post-processes (a ledger entry: `remove` takes it out)."""
    processor = getattr(attachment.pipe, "image_processor", None)
    if processor is None or not callable(getattr(processor, "postprocess", None)):
        return

    def make_wrapper(original):
        def postprocess(*args, **kwargs):
            image = args[0] if args else kwargs.get("image")
            if isinstance(image, torch.Tensor) and not _finite(image):
                raise _error(attachment, "image", image, {}, {})
            return original(*args, **kwargs)

        return postprocess

    attachment.wrap_method(processor, "postprocess", make_wrapper)


def check_arguments(call) -> None:
    """Refuse before any work a non-finite guidance value (NaN compares false with everything, so a
    pipeline given `guidance_scale=nan` silently runs without guidance) and zero steps (a division by
    zero deep in diffusers)."""
    values = call.arguments() if call is not None else {}
    for name in GUIDANCE_ARGUMENTS:
        value = values.get(name)
        if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
            finite = bool(torch.isfinite(value))  # a scalar tensor, compared with 1 the same way
        else:
            finite = not isinstance(value, float) or math.isfinite(value)
        if not finite:
            raise ValueError(f"{name}={value!r} must be a finite number (typically 1 to 20)")
    steps = values.get("num_inference_steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps < 1:  # diffusers divides by it
        raise ValueError(f"num_inference_steps={steps} must be a whole number of steps >= 1, e.g. 20")


# -- the failure path: counting and looking for the cause (may read every weight) -----------------
def _counts(tensor: torch.Tensor) -> tuple[int, int, int]:
    nan = int(torch.isnan(tensor).sum())
    return nan, int((~torch.isfinite(tensor)).sum()) - nan, tensor.numel()


def _format_value(value: Any) -> str:
    return repr(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)


def _guidance_suspect(call_locals: dict[str, Any]) -> tuple[str, Any] | None:
    for name in GUIDANCE_ARGUMENTS:
        value = call_locals.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or abs(value) > LARGE_GUIDANCE:
            return name, value
    return None


def first_non_finite_weight(pipe, only=None, skip=()) -> tuple[str, str] | None:
    """(component, tensor name) of the first parameter or buffer holding NaN or infinity, if any,
    among the pipeline's modules (`only` those named, none of `skip`)."""
    for component, module in getattr(pipe, "components", {}).items():
        wanted = (only is None or component in only) and component not in skip
        if not wanted or not isinstance(module, torch.nn.Module):
            continue
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_meta or not tensor.is_floating_point():
                continue
            if not _finite(tensor.detach()):
                return component, name
    return None


def _error(attachment, stage: str, tensor: torch.Tensor, call_locals: dict[str, Any],
           frame_locals: dict[str, Any]) -> NonFiniteOutputError:
    pipe = attachment.pipe
    counts = _counts(tensor)
    what = ("the denoising loop ended with non-finite latents" if stage == "latents"
            else "the decoded image holds non-finite values")
    head = (f"{type(pipe).__name__}: {what} ({counts[0]} NaN and {counts[1]} infinite of {counts[2]} values), so "
            "its image would be wrong and is not returned")
    fields: dict[str, Any] = dict(stage=stage, counts=counts)

    suspect = _guidance_suspect(call_locals)
    # the latents come from the text encoders and the denoiser; a decoded image from finite latents, the VAE
    weights = (first_non_finite_weight(pipe, skip=("vae",)) if stage == "latents"
               else first_non_finite_weight(pipe, only=("vae",)))
    embeds = [t for key in ("prompt_embeds", "negative_prompt_embeds") for t in _tensors(frame_locals.get(key))]
    if suspect is not None:
        name, value = suspect
        fields.update(kind="guidance", parameter=name, value=value)
        problem = "overflows the denoiser's arithmetic" if math.isfinite(value) else "is not a finite number"
        cause = f"{name}={_format_value(value)} {problem}; pass a finite {name} (typically 1 to 20)"
    elif weights is not None:
        component, tensor_name = weights
        fields.update(kind="weights", component=component, tensor=tensor_name)
        cause = (f"the weights of {component} hold NaN or infinity ({component}.{tensor_name}); the model's files are "
                 "damaged or come from a diverged training run: re-download or re-save them")
    elif any(not _finite(t) for t in embeds):
        fields.update(kind="inputs")
        cause = ("the prompt embeddings are non-finite; check prompt_embeds= / negative_prompt_embeds= given to "
                 "the call")
    elif _dtype(attachment.denoiser if stage == "latents" else getattr(pipe, "vae", None)) == torch.float16:
        fields.update(kind="float16")
        cause = ("float16 arithmetic overflowed"
                 + ("; run the VAE in float32 (pipe.vae.to(torch.float32)) or load the pipeline with "
                    "torch_dtype=torch.bfloat16" if stage == "image" else
                    "; load the pipeline with torch_dtype=torch.bfloat16 (or torch.float32)"))
    else:
        fields.update(kind="unknown")
        cause = ("no guidance value or weight explains it; check latents=, sigmas= / timesteps= and the scheduler's "
                 "settings given to this call")
    return NonFiniteOutputError(f"{head}; likely cause: {cause}", **fields)


def _dtype(module) -> torch.dtype | None:
    parameter = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
    return parameter.dtype if parameter is not None else None
