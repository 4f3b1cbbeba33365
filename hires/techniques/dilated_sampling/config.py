"""The dilated sampling configuration (torch-free)."""

from __future__ import annotations

import dataclasses

from ...validation import positive_number, typed


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
        positive_number(owner, "fusion_exponent", self.fusion_exponent)
        positive_number(owner, "sigma", self.sigma, allow_zero=True)
        positive_number(owner, "blur_exponent", self.blur_exponent)
        if not 0 < self.window_stride <= 1:
            raise ValueError(f"{owner}.window_stride={self.window_stride!r} must be a fraction of the window in (0, 1]")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"{owner}.max_batch={self.max_batch!r} must be a whole number >= 1, or None for one call")

    def validate_for(self, info) -> None:
        family = info.family
        reason = family.layout.sub_grids_refused
        if reason:
            raise ValueError(f"DilatedSamplingConfig: {info.name}'s latent cannot be split into sub-lattices and "
                             f"windows the denoiser takes on their own: {reason}; disable dilated_sampling")
        if family.attention_masked:
            raise ValueError(f"DilatedSamplingConfig: {info.name}: {family.attention_masked}; disable dilated_sampling")
