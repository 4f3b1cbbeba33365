"""The dilated-sampling configuration: fields, defaults, ranges and checks (torch-free)."""

from __future__ import annotations

import dataclasses

from ...validation import option, typed


@typed
@dataclasses.dataclass(frozen=True)
class DilatedSamplingConfig:
    """DemoFusion's dilated sampling: interleaved sub-lattices denoised at the base size, fused in.

    Above the base size, the latent's s_h x s_w interleaved sub-lattices (stride = scale per side,
    rounded) are denoised as base-size latents in one batched call, from a Gaussian-blurred copy, and
    blended into the full-size prediction with weight cosf(t) ** fusion_exponent; with local_windows
    that prediction is MultiDiffusion's mean over overlapping base-size windows
    (hires.techniques.dilated_sampling.lattices).
    """

    enabled: bool = False
    # DemoFusion's cosine_scale_2: weight of the dilated prediction
    fusion_exponent: float = option(1.0, low=0, low_open=True)
    # blur sigma at pure noise (DemoFusion's code default; its demos use 0.8); 0: no blur
    sigma: float = option(1.0, low=0)
    # DemoFusion's cosine_scale_3: sigma * (0.99 cosf ** blur_exponent + 0.01)
    blur_exponent: float = option(1.0, low=0, low_open=True)
    # sub-lattices per denoiser call (DemoFusion's view_batch_size); None: all in one call
    max_batch: int | None = option(None, low=1)
    # MultiDiffusion local paths: the full-size prediction replaced by the mean over overlapping base-size
    # windows (stride window_stride x window, jittered from the call's generator), batched like the sub-lattices
    local_windows: bool = False
    window_stride: float = option(0.5, low=0, high=1, low_open=True)  # DemoFusion: stride 64 of a 128 latent window


    def validate_for(self, info) -> None:
        family = info.family
        reason = family.layout.sub_grids_refused
        if reason:
            raise ValueError(f"DilatedSamplingConfig: {info.name}'s latent cannot be split into sub-lattices and "
                             f"windows the denoiser takes on their own: {reason}; disable dilated_sampling")
        if family.attention_masked:
            raise ValueError(f"DilatedSamplingConfig: {info.name}: {family.attention_masked}; "
                             "disable dilated_sampling")
