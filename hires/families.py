"""Facts about the supported model families: data, not logic.

A `Family` says how to recognise a pipeline and where to read its facts; `ModelInfo` is those facts
read from one pipeline's own model configs (base size, latent factor, patch size, prediction type),
never assumed from the family's name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class RAUNetFacts:
    """Where and when RAU-Net (HiDiffusion) acts on a family's UNet, as its official code sets it.

    Step windows are [start, stop) fractions of the schedule (start == stop: that part is off). The
    `extreme_` windows hold when the smaller side is at least `extreme_scale` times the base side
    (HiDiffusion: latent >= 256 for SD 1.5/2.1, >= 512 for SDXL), the others below it.
    """

    downsampler: str  # its conv runs at stride 4, dilation 2, padding 2 instead of stride 2
    pooled_block: str  # average-pooled 2x (ceil) after its first resnet/attention pair
    downsampler_steps: tuple[float, float]
    pooled_steps: tuple[float, float]
    extreme_downsampler_steps: tuple[float, float]
    extreme_pooled_steps: tuple[float, float]
    extreme_scale: float = 4.0


# HiDiffusion's sd15_hidiffusion_key (SD 1.5 and 2.1-base): T1 on the first downsampler, T2 on the
# pooled block; T1/T2 = 0.4/0.0 below 4x the base side, 0.7/0.3 from it on.
_SD_RAU_NET = RAUNetFacts(
    downsampler="down_blocks.0.downsamplers.0",
    pooled_block="down_blocks.1",
    downsampler_steps=(0.0, 0.4),
    pooled_steps=(0.0, 0.0),
    extreme_downsampler_steps=(0.0, 0.7),
    extreme_pooled_steps=(0.0, 0.3),
)
# sdxl_hidiffusion_key: T1 on the pooled block, T2 on its downsampler. Below 4x its "aggressive" mode
# runs the downsampler for the first 8/50 steps and the pooling from there to T1 = 0.4.
_SDXL_RAU_NET = RAUNetFacts(
    downsampler="down_blocks.1.downsamplers.0",
    pooled_block="down_blocks.1",
    downsampler_steps=(0.0, 0.16),
    pooled_steps=(0.16, 0.4),
    extreme_downsampler_steps=(0.0, 0.3),
    extreme_pooled_steps=(0.0, 0.7),
)


@dataclasses.dataclass(frozen=True)
class LatentLayout:
    """How a family's pipeline hands its latents to the denoiser and gets them back, and turns its denoiser's
    latent z into the VAE's own latent v (read from the pipeline's decode and img2img encode code: the VAE
    config's fields count only where that code reads them).

    hires' hooks work on (B, C, h, w) latents: `hires.sampling.latents.adapter_for` gives the one adapter of
    each layout (pack / unpack, the token grid of a denoiser call, the pipeline's latent output) and
    `hires.sampling.latent_space` the VAE conversions. A new family of an existing layout names one of the
    layouts below.
    """

    # Patch side in latent pixels: an int, or the denoiser config key that holds it.
    patch_size: int | str = 1
    # None: the denoiser takes (B, C, h, w). Else the pipeline packs 2x2 patches into (B, h/2 * w/2, 4C)
    # tokens and the denoiser reads their grid from this argument: "img_ids" (a row and a column id per
    # token: Flux) or "img_shapes" ((frames, rows, cols) per image: Qwen-Image).
    packed_grid: str | None = None
    # RoPE families: which image side each position-id axis counts (None: an axis that is not a side).
    id_axes: tuple[str | None, ...] = ()
    # Z-Image: the denoiser takes a list of (C, 1, h, w) latents and the time 1 - sigma, and returns a list of
    # negated velocities; hires' hooks see a (B, C, h, w) tensor, sigma and the velocity (hires.sampling.latents).
    frame_list: bool = False
    # What output_type="latent" returns: the latents as the denoiser sees them, or (True) the VAE's own
    # latent (Flux2KleinPipeline).
    returns_vae_latent: bool = False
    # v = z / scaling_factor + shift_factor (SD3, Flux, Chroma, Z-Image); SD 1.x/2.x, SDXL and PixArt
    # pipelines never read shift_factor, whatever the VAE config holds.
    shift: bool = False
    # Per-channel latents_mean / latents_std where the VAE config has them: v = z * std / scaling_factor + mean
    # (SDXL), or without the scaling factor v = z * std + mean (Qwen-Image).
    channel_statistics: bool = False
    statistics_scaled: bool = True
    # Flux.2: v is z patchified 2x2, denormalised by the VAE's batch-norm running statistics, un-patchified.
    batch_norm_patches: bool = False
    # The position-id step of one token on the height and width axes (Flux 3 counts half a unit per token).
    id_step: float = 1.0
    # ERNIE-Image: z is already the patchified latent (4C channels at half the VAE latent's side), and the
    # pipeline adds this eps to the running variance instead of the VAE config's batch_norm_eps (None: that one).
    patchified: bool = False
    batch_norm_eps: float | None = None
    # HiDream-I1: the denoiser returns the negated velocity (the pipeline flips its sign before CFG); hires'
    # hooks see the velocity.
    negated_output: bool = False
    # HiDream-I1: one text argument holds its batch on the second axis ((layers, batch, tokens, width) Llama states).
    text_batch_second_axis: bool = False
    # Qwen-Image 2.1: the denoiser returns rows for its text (and condition images) before the latent's own on the
    # call that fills its KV cache; hires' hooks see the latent's rows only (the pipeline keeps the same ones).
    prefixed_output: bool = False

    @property
    def packed(self) -> bool:
        return self.packed_grid is not None

    @property
    def sub_grids_refused(self) -> str | None:
        """Why the denoiser cannot take a sub-grid of the latent on its own (dilated sampling's sub-lattices
        and windows need position ids built per grid), or None where it can."""
        if self.frame_list:
            return "its denoiser takes a list of latents and builds their position ids itself"
        if self.text_batch_second_axis:
            return ("its text states hold the batch on their second axis ((layers, batch, tokens, width)), which the "
                    "batched pass over the parts does not repeat")
        if self.packed and self.packed_grid != "img_ids":
            return f"its token grid comes from {self.packed_grid}, for which hires builds no per-grid ids"
        if self.packed and not {"height", "width"} <= set(self.id_axes):
            return "its position ids do not say which axes count the height and the width (LatentLayout.id_axes)"
        return None


# The layouts of the supported families.
SPATIAL = LatentLayout()  # SD 1.x / 2.x
SPATIAL_CHANNEL_STATISTICS = LatentLayout(channel_statistics=True)  # SDXL
PATCHED = LatentLayout(patch_size="patch_size")  # PixArt-Sigma: patchified inside the transformer
PATCHED_SHIFTED = LatentLayout(patch_size="patch_size", shift=True)  # SD3
# Flux and Chroma: FluxPipeline._prepare_latent_image_ids: axis 0 is zero for text and image, axis 1 the row,
# axis 2 the column of the packed latent grid.
PACKED_IDS = LatentLayout(patch_size=2, packed_grid="img_ids", id_axes=(None, "height", "width"), shift=True)
# Flux.2: four id axes (Flux2Pipeline._prepare_latent_ids): time (0 for the image, 10, 20, ... for reference
# images), row, column, and a layer axis that is 0 for image tokens; batch-norm statistics per 2x2 patch.
PACKED_IDS_BATCH_NORM = LatentLayout(patch_size=2, packed_grid="img_ids", id_axes=(None, "height", "width", None),
                                     batch_norm_patches=True)
# Flux 3: Flux.2's four axes and batch-norm patches; its ids advance half a unit per token (image_rope_scale 0.5).
PACKED_HALF_IDS_BATCH_NORM = dataclasses.replace(PACKED_IDS_BATCH_NORM, id_step=0.5)
# Qwen-Image: axis 0 counts frames (0 for an image); unscaled per-channel statistics.
PACKED_SHAPES = LatentLayout(patch_size=2, packed_grid="img_shapes", id_axes=(None, "height", "width"),
                             channel_statistics=True, statistics_scaled=False)
# Krea-2: Flux's 2x2 packing; position_ids (text rows, all zero, then (0, row, column) per image token, no batch
# axis) give the grid; Qwen-Image's VAE and its unscaled per-channel statistics.
PACKED_POSITION_IDS = LatentLayout(patch_size=2, packed_grid="position_ids", id_axes=(None, "height", "width"),
                                   channel_statistics=True, statistics_scaled=False)
# Z-Image: patchified 2x2 inside the transformer; RoPE ids: axis 0 the sequence, axes 1 and 2 row and column.
FRAME_LIST = LatentLayout(patch_size=2, id_axes=(None, "height", "width"), frame_list=True, shift=True)
# HiDream-I1: patchified 2x2 inside the transformer, which returns the negated velocity; SD3's VAE convention.
PATCHED_SHIFTED_NEGATED = LatentLayout(patch_size="patch_size", shift=True, negated_output=True,
                                       text_batch_second_axis=True)
# Qwen-Image 2.1: one token per latent pixel (patch 1), img_shapes ((frames, rows, cols) per image, the generated
# image last) give the grid; its first denoiser call of a prompt returns the text rows before the image's.
PACKED_SHAPES_PREFIXED = LatentLayout(patch_size=1, packed_grid="img_shapes",
                                      id_axes=(None, "height", "width"), channel_statistics=True,
                                      statistics_scaled=False, prefixed_output=True)
# ERNIE-Image: the Flux.2 VAE latent patchified 2x2 and normalised by the pipeline itself (ErnieImagePipeline's
# decode: z * sqrt(running_var + 1e-5) + running_mean, then un-patchified); the denoiser takes it spatial.
PATCHIFIED_BATCH_NORM = LatentLayout(batch_norm_patches=True, patchified=True, batch_norm_eps=1e-5)


@dataclasses.dataclass(frozen=True)
class VAEKind:
    """What hires needs to know about a VAE class (matched by class name, subclasses too)."""

    class_names: tuple[str, ...]
    # it takes (B, C, frames, H, W) latents and images (a video VAE: Qwen-Image's causal 3D VAE)
    frame_axis: bool = False
    # why hires cannot tile it (None: it can): VAETilingConfig and MemoryConfig refuse with it
    untileable: str | None = None


STANDARD_VAE = VAEKind(("AutoencoderKL", "AutoencoderKLFlux2"))  # and any VAE hires does not list
QWEN_IMAGE_VAE = VAEKind(
    ("AutoencoderKLQwenImage",), frame_axis=True,
    untileable=("Qwen-Image's VAE (AutoencoderKLQwenImage) is a causal 3D VAE of CausalConv3d blocks with a frame "
                "cache, which hires' whole-image-statistics tiled decode does not cover; decode untiled (the "
                "default), or use diffusers' own pipe.vae.enable_tiling(), which blends overlapping tiles"),
)
QWEN_IMAGE21_VAE = VAEKind(
    ("AutoencoderKLQwenImage21",), frame_axis=True,
    untileable=("Qwen-Image 2.1's VAE (AutoencoderKLQwenImage21) has per-pixel RMS norms and no GroupNorm head, "
                "which hires' whole-image-statistics tiled decode is built on; decode untiled (the default), or use "
                "diffusers' own pipe.vae.enable_tiling(), which blends overlapping tiles"),
)
VAE_KINDS: tuple[VAEKind, ...] = (QWEN_IMAGE_VAE, QWEN_IMAGE21_VAE, STANDARD_VAE)


def vae_kind(vae) -> VAEKind:
    """The kind of the VAE module `vae` (a class hires does not list counts as a standard image VAE)."""
    names = {cls.__name__ for cls in type(vae).__mro__}
    return next((kind for kind in VAE_KINDS if names & set(kind.class_names)), STANDARD_VAE)


@dataclasses.dataclass(frozen=True)
class APGPreset:
    """APG's defaults for a family (hires.techniques.apg)."""

    eta: float
    momentum: float
    # r as a root-mean-square per element: the threshold is rms * sqrt(elements per sample), so the
    # same share of the update is clipped at every size (a plain L2 norm grows with sqrt(area)).
    rms_threshold_x0: float
    rms_threshold_output: float
    source: str


_APG_ETA_SOURCE = "eta 0: the paper's setting in most experiments (shared/references/attention_guidance.md (b))"
_APG_MOMENTUM_SOURCE = ("momentum -0.5: diffusers AdaptiveProjectedMixGuidance default (HunyuanImage 2.1), within "
                        "the paper-era -0.5..-0.75")
_APG_THRESHOLD_SOURCE = ("r: ComfyUI nodes_apg default 5 (x0) / diffusers AdaptiveProjectedGuidance default 15 "
                         "(output), per element at a 4x128x128 latent; no per-family values are published, to be "
                         "tuned on the testbed")
# ComfyUI's APG node (acts on the denoised x0) defaults to norm_threshold 5; diffusers' guider (acts on the
# raw output) to 15. Both are read as norms on an SDXL-size latent (4 x 128 x 128 = 65536 elements, sqrt =
# 256) and turned into per-element values. Every CFG family shares them until the testbed says otherwise.
PUBLISHED_APG = APGPreset(eta=0.0, momentum=-0.5, rms_threshold_x0=5.0 / 256.0, rms_threshold_output=15.0 / 256.0,
                          source="; ".join((_APG_ETA_SOURCE, _APG_MOMENTUM_SOURCE, _APG_THRESHOLD_SOURCE)))


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    # diffusers pipeline classes (by name) of this family; subclasses are recognised too.
    pipeline_classes: tuple[str, ...]
    denoiser_attr: str  # "unet" or "transformer"
    denoiser_class: str  # the diffusers class of the denoiser (by name; the memory planner's input builders)
    architecture: str  # "unet" or "dit"
    # Where the base latent side is read: ("denoiser_config", "sample_size") or ("pipeline", "default_sample_size").
    base_size_source: tuple[str, str]
    # "scheduler" (eps / v from scheduler.config.prediction_type) or "flow" (velocity).
    prediction_source: str
    # How latents reach the denoiser and the VAE (packing, patch size, position ids, the VAE convention).
    layout: LatentLayout
    # The denoiser gets `timestep * timestep_input_scale` for a scheduler timestep (Flux divides by 1000).
    timestep_input_scale: float
    # How image positions are encoded: "none", "sincos_interpolated", "sincos_cropped_table", "rope".
    position_encoding: str
    # The longest text sequence the pipeline's encoders hand the denoiser (tokens): what the memory
    # planner's estimate feeds it.
    text_tokens: int = 77
    # How the pipeline runs classifier-free guidance: "batched" (one denoiser call on [uncond, cond],
    # combined as uncond + w*(cond - uncond)) or "separate" (Flux's true CFG: a cond call, then an
    # uncond call, combined the same way) or "none" (the pipeline never runs CFG: Flux.2 [dev]). The
    # scale is the __call__ local named guidance_scale_name.
    guidance_layout: str = "batched"
    guidance_scale_name: str = "guidance_scale"
    # APG's defaults (None: the family runs no CFG).
    apg: APGPreset | None = PUBLISHED_APG
    # A multiple the pipeline's own check_inputs demands whatever the VAE factor (SD/SDXL/PixArt: 8).
    pipeline_size_multiple: int = 1
    # Extra recognition rule on the denoiser config (sd15 vs sd21 share pipeline classes).
    denoiser_config_match: tuple[tuple[str, Any], ...] = ()
    # UNets: where and when RAU-Net acts (None: RAU-Net needs explicit modules and steps).
    rau_net: RAUNetFacts | None = None
    # "separate" layout: the __call__ local that says whether this call runs CFG (Flux: do_true_cfg);
    # None: the scale alone and the pipeline's own `do_classifier_free_guidance` say it.
    cfg_switch: str | None = None
    # How the pipeline computes the flow shift mu from the image token count: "linear" (the
    # scheduler config's base/max shift, Flux and SD3) or "flux2_empirical" (Flux.2's
    # compute_empirical_mu, which also depends on the step count).
    shift_rule: str = "linear"
    # Why the denoiser's attention mask rules out scale fusion and dilated sampling (None: the pipeline passes
    # no mask). Window attention cuts a mask to its windows; the fused branches and the sub-lattice pass do not.
    attention_masked: str | None = None
    # The pipeline's VAE class (its facts: a frame axis, whether hires can tile it).
    vae: VAEKind = STANDARD_VAE
    # Why hires cannot rewrite this family's attention (None: it can): entropy scaling and windows refuse with it.
    attention_unsupported: str | None = None
    # Why hires cannot rescale this family's positions (None: it can): PositionConfig refuses with it.
    positions_unsupported: str | None = None
    # The denoiser's timestep parameter (Z-Image's transformer calls it `t`).
    timestep_argument: str = "timestep"
    # Batched CFG: whether the pipeline stacks [cond, uncond] (Z-Image) instead of [uncond, cond]; and (either
    # layout) what it adds to guidance_scale to get w in uncond + w (cond - uncond) (Z-Image and Krea-2 combine
    # cond + s (cond - uncond), i.e. w = s + 1).
    cfg_cond_first: bool = False
    guidance_scale_offset: float = 0.0
    # Latent base side used when the pipeline has no `base_size_source` attribute (ZImagePipeline has no
    # default_sample_size; its __call__ defaults to 1024 px).
    base_latent_default: int | None = None
    # The family whose evidence chose this one's automatic preset (hires.presets), where it was not measured on
    # its own; None: its own. The preset leaves out what the record refuses (windows, the planner).
    automatic_preset: str | None = None
    # Modular Diffusers pipeline classes (diffusers.ModularPipeline subclasses, by name) of this family
    # (hires.modular attaches to them); subclasses are recognised too.
    modular_classes: tuple[str, ...] = ()
    # `attention_masked` of the modular pipeline where it differs from the classic one's.
    modular_attention_masked: str | None = None
    # Whether __call__ draws its first latents itself with its module's randn_tensor (ErnieImagePipeline)
    # instead of through a prepare_latents method.
    latents_drawn_inline: bool = False
    # Whether __call__ rescales every request to the base area (sides floored to 16) with its module's
    # math.sqrt of the area ratio, and its transformer pads non-square grids to `max_seq` tokens
    # (HiDreamImagePipeline): with a technique on, hires has it denoise the size asked for.
    resizes_to_base_area: bool = False
    # The diffusers classes (classic or modular) that hires.pipelines gives a ready `Hires<class>`; None: the
    # first pipeline class and every modular class.
    ready_classes: tuple[str, ...] | None = None

    @property
    def ready_base_classes(self) -> tuple[str, ...]:
        if self.ready_classes is not None:
            return self.ready_classes
        return self.pipeline_classes[:1] + self.modular_classes

    @property
    def sincos_positions(self) -> bool:
        """Positions from a sin-cos table (PixArt-Sigma, SD3): the automatic preset turns PositionConfig on."""
        return self.position_encoding.startswith("sincos")

    @property
    def is_unet(self) -> bool:
        return self.architecture == "unet"

    @property
    def predicts_flow(self) -> bool:
        return self.prediction_source == "flow"

    @property
    def runs_cfg(self) -> bool:
        """Whether the pipeline ever combines a CFG pair (Flux.2 [dev]'s guidance_scale feeds an embedding)."""
        return self.guidance_layout != "none"

    @property
    def cfg_batched(self) -> bool:
        """CFG as one denoiser call on both halves."""
        return self.guidance_layout == "batched"

    @property
    def cfg_separate(self) -> bool:
        """CFG as a cond call, then an uncond call (true CFG)."""
        return self.guidance_layout == "separate"


@dataclasses.dataclass(frozen=True)
class ProcessorFacts:
    """What hires needs to know about a diffusers attention processor class (read from its source)."""

    # Where the image tokens sit in the joint text-image sequence it attends over (its torch.cat).
    token_order: str  # "image_first" or "text_first"
    # Processors that hand queries to diffusers' dispatcher, whatever kernel it runs (torch SDPA,
    # flash-attn, xformers, sage, flex): the entropy factor multiplies the outputs of these
    # submodules, after which only RoPE (a rotation, which commutes with a scalar) touches the
    # queries. Empty: the factor goes into torch SDPA's `scale` argument.
    query_outputs: tuple[str, ...] = ()


# Joint text-image attention processors of the supported DiTs, by class name.
PROCESSOR_FACTS = {
    "JointAttnProcessor2_0": ProcessorFacts("image_first"),
    "FluxAttnProcessor": ProcessorFacts("text_first", ("norm_q", "norm_added_q")),
    "FluxAttnProcessor2_0": ProcessorFacts("text_first", ("norm_q", "norm_added_q")),
    # Flux.2: double blocks concatenate [text, image]; single blocks receive that sequence whole.
    "Flux2AttnProcessor": ProcessorFacts("text_first", ("norm_q", "norm_added_q")),
    "Flux2ParallelSelfAttnProcessor": ProcessorFacts("text_first", ("norm_q",)),
    # Qwen-Image's joint attention: torch.cat([txt, img]) after norm_q / norm_added_q, then RoPE.
    "QwenDoubleStreamAttnProcessor2_0": ProcessorFacts("text_first", ("norm_q", "norm_added_q")),
}


_SD_PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline",
)

FAMILIES: tuple[Family, ...] = (
    Family(
        name="sd15",
        pipeline_classes=_SD_PIPELINES,
        denoiser_attr="unet",
        denoiser_class="UNet2DConditionModel",
        architecture="unet",
        base_size_source=("denoiser_config", "sample_size"),
        prediction_source="scheduler",
        layout=SPATIAL,
        timestep_input_scale=1.0,
        position_encoding="none",
        pipeline_size_multiple=8,
        rau_net=_SD_RAU_NET,
        denoiser_config_match=(("use_linear_projection", False),),
    ),
    # SD 2.x UNets use linear projections in their transformer blocks; SD 1.x use 1x1 convs.
    Family(
        name="sd21",
        pipeline_classes=_SD_PIPELINES,
        denoiser_attr="unet",
        denoiser_class="UNet2DConditionModel",
        architecture="unet",
        base_size_source=("denoiser_config", "sample_size"),
        prediction_source="scheduler",
        layout=SPATIAL,
        timestep_input_scale=1.0,
        position_encoding="none",
        pipeline_size_multiple=8,
        rau_net=_SD_RAU_NET,
        denoiser_config_match=(("use_linear_projection", True),),
        automatic_preset="sd15",
    ),
    Family(
        name="sdxl",
        pipeline_classes=(
            "StableDiffusionXLPipeline",
            "StableDiffusionXLImg2ImgPipeline",
            "StableDiffusionXLControlNetPipeline",
            "StableDiffusionXLControlNetImg2ImgPipeline",
        ),
        denoiser_attr="unet",
        denoiser_class="UNet2DConditionModel",
        architecture="unet",
        base_size_source=("denoiser_config", "sample_size"),
        prediction_source="scheduler",
        layout=SPATIAL_CHANNEL_STATISTICS,
        timestep_input_scale=1.0,
        position_encoding="none",
        pipeline_size_multiple=8,
        rau_net=_SDXL_RAU_NET,
        modular_classes=("StableDiffusionXLModularPipeline",),
    ),
    Family(
        name="pixart",
        pipeline_classes=("PixArtSigmaPipeline",),
        denoiser_attr="transformer",
        denoiser_class="PixArtTransformer2DModel",
        architecture="dit",
        base_size_source=("denoiser_config", "sample_size"),
        prediction_source="scheduler",
        layout=PATCHED,
        text_tokens=300,
        timestep_input_scale=1.0,
        position_encoding="sincos_interpolated",
        pipeline_size_multiple=8,
    ),
    Family(
        name="sd3",
        pipeline_classes=(
            "StableDiffusion3Pipeline",
            "StableDiffusion3Img2ImgPipeline",
            "StableDiffusion3ControlNetPipeline",
        ),
        denoiser_attr="transformer",
        denoiser_class="SD3Transformer2DModel",
        architecture="dit",
        base_size_source=("denoiser_config", "sample_size"),
        prediction_source="flow",
        layout=PATCHED_SHIFTED,
        text_tokens=77 + 256,  # CLIP's 77 and T5's 256
        timestep_input_scale=1.0,
        position_encoding="sincos_cropped_table",
        modular_classes=("StableDiffusion3ModularPipeline",),
    ),
    # Flux's transformer config has no image size; the pipeline's default_sample_size is what
    # diffusers itself uses. Latents are packed 2x2 by the pipeline, hence patch 2.
    Family(
        name="flux",
        pipeline_classes=(
            "FluxPipeline",
            "FluxImg2ImgPipeline",
            "FluxControlNetPipeline",
            "FluxControlNetImg2ImgPipeline",
        ),
        denoiser_attr="transformer",
        denoiser_class="FluxTransformer2DModel",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        prediction_source="flow",
        layout=PACKED_IDS,
        text_tokens=512,
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope",
        # FluxPipeline's guidance_scale feeds the distilled guidance embedding; true CFG is separate.
        guidance_layout="separate",
        guidance_scale_name="true_cfg_scale",
        cfg_switch="do_true_cfg",
        modular_classes=("FluxModularPipeline",),
    ),
    # Flux.2 [dev]: the pipeline patchifies the 32-channel latent 2x2 and packs it (one token per 2x2
    # latent patch, 128 channels); like Flux its base is the pipeline's default_sample_size. Position ids
    # have four axes (Flux2Pipeline._prepare_latent_ids): time (0 for the image, 10, 20, ... for
    # reference images), row, column, and a layer axis that is 0 for image tokens. guidance_scale feeds
    # the distilled guidance embedding and the pipeline runs no CFG at all.
    Family(
        name="flux2",
        pipeline_classes=("Flux2Pipeline",),
        denoiser_attr="transformer",
        denoiser_class="Flux2Transformer2DModel",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        prediction_source="flow",
        layout=PACKED_IDS_BATCH_NORM,
        text_tokens=512,
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope",
        guidance_layout="none",
        guidance_scale_name="guidance_scale",
        apg=None,
        shift_rule="flux2_empirical",
        automatic_preset="flux",  # a flow DiT of Flux's design: the testbed's Flux evidence stands for it
        modular_classes=("Flux2ModularPipeline",),
    ),
    # Flux.2 [klein]: the Flux.2 transformer without a guidance embedding and a Qwen3 text encoder. The
    # base models run true CFG (a cond call, then a call on the empty prompt, at guidance_scale > 1);
    # step-distilled ones (pipeline config is_distilled) run none, which `do_classifier_free_guidance` says.
    Family(
        name="flux2_klein",
        pipeline_classes=("Flux2KleinPipeline", "Flux2KleinInpaintPipeline"),
        denoiser_attr="transformer",
        denoiser_class="Flux2Transformer2DModel",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        prediction_source="flow",
        layout=dataclasses.replace(PACKED_IDS_BATCH_NORM, returns_vae_latent=True),
        text_tokens=512,
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope",
        guidance_layout="separate",
        guidance_scale_name="guidance_scale",
        shift_rule="flux2_empirical",
        automatic_preset="flux",
        modular_classes=("Flux2KleinModularPipeline", "Flux2KleinBaseModularPipeline"),
    ),
    # Chroma: Flux's packing and 3-axis RoPE ids, a T5 encoder only (no CLIP, no guidance embedding), and
    # true CFG with a negative prompt at guidance_scale > 1 (a cond call, then an uncond call).
    Family(
        name="chroma",
        pipeline_classes=("ChromaPipeline", "ChromaImg2ImgPipeline"),
        denoiser_attr="transformer",
        denoiser_class="ChromaTransformer2DModel",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        prediction_source="flow",
        layout=PACKED_IDS,
        text_tokens=512,
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope",
        guidance_layout="separate",
        guidance_scale_name="guidance_scale",
        attention_masked=(
            "ChromaPipeline passes its text padding mask (batch, text + image tokens) to every attention call; scale "
            "fusion's global and local branches and dilated sampling's sub-lattice pass (a base-size token count) "
            "do not carry it"
        ),
        automatic_preset="flux",
    ),
    # Qwen-Image: latents packed 2x2 by the pipeline (as Flux), the grid given to the transformer as
    # img_shapes; base side from the pipeline's default_sample_size (128: 1024 px, diffusers' default).
    # Its QwenEmbedRope centres the row and column positions on the image (scale_rope=True): a side of
    # n tokens spans -(n - n//2) .. n//2 - 1; axis 0 counts frames (0 for an image). True CFG only
    # (guidance_scale feeds no embedding in the released model); the pipeline rescales the combined
    # prediction to the cond prediction's norm per token.
    Family(
        name="qwenimage",
        pipeline_classes=(
            "QwenImagePipeline",
            "QwenImageImg2ImgPipeline",
            "QwenImageControlNetPipeline",
        ),
        denoiser_attr="transformer",
        denoiser_class="QwenImageTransformer2DModel",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        prediction_source="flow",
        layout=PACKED_SHAPES,
        text_tokens=512,
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope_centred",
        guidance_layout="separate",
        guidance_scale_name="true_cfg_scale",
        cfg_switch="do_true_cfg",
        vae=QWEN_IMAGE_VAE,
        modular_classes=("QwenImageModularPipeline",),
        modular_attention_masked=(
            "QwenImageModularPipeline passes its text padding mask (encoder_hidden_states_mask) to every attention "
            "call; scale fusion's global and local branches do not carry it"
        ),
        automatic_preset="flux",  # not measured; Flux's evidence stands for it
    ),
    # Z-Image: single-stream DiT. Latents spatial (patchified 2x2 inside the transformer); 3-axis RoPE looked
    # up in per-axis tables by integer ids: axis 0 the sequence (caption 1..L, image at L + 1), axes 1 and 2
    # the row and column from 0. CFG batched as [cond, uncond]; Z-Image Turbo runs guidance_scale 0 (no CFG).
    Family(
        name="zimage",
        pipeline_classes=("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageControlNetPipeline"),
        denoiser_attr="transformer",
        denoiser_class="ZImageTransformer2DModel",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        base_latent_default=128,
        prediction_source="flow",
        layout=FRAME_LIST,
        text_tokens=512,
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope_id_tables",
        timestep_argument="t",
        cfg_cond_first=True,
        guidance_scale_offset=1.0,
        attention_unsupported=(
            "Z-Image's single-stream attention (ZSingleStreamAttnProcessor) runs over image and caption "
            "sequences padded to multiples of 32 with learned pad tokens that stay keys, so the image "
            "token grid and key counts hires rescales are not what the layer sees"
        ),
        modular_classes=("ZImageModularPipeline",),
        automatic_preset="flux",  # not measured; Flux's evidence stands for it
    ),
    # Flux 3: only a Modular Diffusers pipeline (Flux3ModularPipeline; Flux3DistilledModularPipeline, the flow-map
    # distilled model, subclasses it). Flux.2's latent layout (the VAE's 32 channels patchified 2x2 into 128-channel
    # tokens, batch-norm statistics per patch) with position ids that advance half a unit per token; four RoPE axes
    # (time, row, column, text). No base size in any config: Flux3PrepareLatentsStep defaults to 1024 px. The
    # scheduler keeps a constant shift (6.93, no mu); CFG runs through the guider as a cond, then an uncond pass.
    Family(
        name="flux3",
        pipeline_classes=(),
        modular_classes=("Flux3ModularPipeline",),
        denoiser_attr="transformer",
        denoiser_class="Flux3Transformer2DModel",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        base_latent_default=128,
        prediction_source="flow",
        layout=PACKED_HALF_IDS_BATCH_NORM,
        text_tokens=512,
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope",
        guidance_layout="separate",
        guidance_scale_name="guidance_scale",
        shift_rule="static",
        attention_unsupported=(
            "Flux 3's attention processor (Flux3AttnProcessor) serves its text-only, image-only and reference-only "
            "mode blocks alike, and its single blocks attend over text, image and reference tokens, so the image "
            "token grid hires rescales is not what every layer sees"
        ),
        automatic_preset="flux",  # not measured; Flux's evidence stands for it
        ready_classes=("Flux3ModularPipeline", "Flux3DistilledModularPipeline"),
    ),
    # ERNIE-Image: single-stream DiT over [image, text] on the Flux.2 VAE latent the pipeline patchifies 2x2
    # (pipe.vae_scale_factor 16, transformer patch 1); RoPE ids (text length, row, column), theta 256; CFG batched
    # [uncond, cond] at guidance_scale > 1; the pipeline passes its own sigmas and no mu (the scheduler's static
    # shift). No default_sample_size: its __call__ defaults to 1024 px. Its attention module hands the processor
    # the text key-padding mask as the second positional argument and the model has no attn_processors.
    Family(
        name="ernie_image",
        pipeline_classes=("ErnieImagePipeline",),
        denoiser_attr="transformer",
        denoiser_class="ErnieImageTransformer2DModel",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        base_latent_default=64,
        prediction_source="flow",
        layout=PATCHIFIED_BATCH_NORM,
        text_tokens=512,
        timestep_input_scale=1.0,
        position_encoding="rope_text_offset",
        attention_masked=(
            "ErnieImagePipeline's transformer masks the padded text keys (batch, 1, 1, image + text tokens) in every "
            "attention call; scale fusion's branches and dilated sampling's sub-lattice pass do not carry it"
        ),
        attention_unsupported=(
            "ERNIE-Image's attention (ErnieImageSingleStreamAttnProcessor) is called with the mask and the RoPE "
            "angles as positional arguments on a model without attn_processors, which hires' attention rewrite "
            "does not read"
        ),
        positions_unsupported=(
            "ERNIE-Image's RoPE (ErnieImageEmbedND3) hands its attention raw angles of (text length, row, column) "
            "ids, which none of hires' position hooks rescales"
        ),
        automatic_preset="flux",  # not measured; Flux's evidence stands for it
        latents_drawn_inline=True,
    ),
    # Krea-2: single-stream DiT over [text, image] with a Qwen3-VL text encoder whose tapped layers its own text
    # fusion blocks merge; Flux-style RoPE ids (theta 1000) in one position_ids tensor, text rows first. CFG as a
    # cond call, then an uncond call, combined cond + s (cond - uncond) (on at s > 0); dynamic shift up to 6400
    # tokens (distilled checkpoints: a fixed mu). No default_sample_size: its __call__ defaults to 1024 px.
    Family(
        name="krea2",
        pipeline_classes=("Krea2Pipeline",),
        denoiser_attr="transformer",
        denoiser_class="Krea2Transformer2DModel",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        base_latent_default=128,
        prediction_source="flow",
        layout=PACKED_POSITION_IDS,
        text_tokens=512,
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope",
        guidance_layout="separate",
        guidance_scale_name="guidance_scale",
        guidance_scale_offset=1.0,
        vae=QWEN_IMAGE_VAE,
        attention_masked=(
            "Krea2Pipeline always passes its fixed-length text padding mask, which the transformer turns into a key "
            "mask (batch, 1, 1, text + image tokens) for every attention call; scale fusion's branches and dilated "
            "sampling's sub-lattice pass do not carry it"
        ),
        attention_unsupported=(
            "Krea-2's attention (Krea2AttnProcessor) is called with the mask and the RoPE as positional arguments, "
            "and the same attention class runs its text-fusion blocks over the tapped text layers, which hires' "
            "attention rewrite does not tell apart"
        ),
        positions_unsupported=(
            "Krea-2's RoPE embedder (Krea2RotaryPosEmbed, theta 1000) is none of the embedders hires' RoPE hook "
            "replaces (FluxPosEmbed, Flux2PosEmbed)"
        ),
        automatic_preset="flux",  # not measured; Flux's evidence stands for it
    ),
    # HiDream-I1: double-stream then single-stream sparse (MoE) DiT with two CLIPs, T5 and Llama-3.1 text
    # encoders; 3-axis RoPE ids (0, row, column) as 2x2 rotation matrices. The transformer takes the spatial
    # latent as `timesteps`-conditioned input and returns the negated velocity. CFG batched [uncond, cond] at
    # guidance_scale > 1; its mu is a constant (ignored by a static scheduler). Its pipeline rescales every
    # request to default_sample_size squared (128: 1024 px), and non-square grids are padded to the transformer's
    # max_seq tokens (larger ones would not run).
    Family(
        name="hidream",
        pipeline_classes=("HiDreamImagePipeline",),
        denoiser_attr="transformer",
        denoiser_class="HiDreamImageTransformer2DModel",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        prediction_source="flow",
        layout=PATCHED_SHIFTED_NEGATED,
        text_tokens=128,  # T5's and Llama's max_sequence_length (each); the CLIPs give pooled embeddings only
        timestep_input_scale=1.0,
        position_encoding="rope_rotation_matrices",
        timestep_argument="timesteps",
        attention_unsupported=(
            "HiDream-I1's transformer (HiDreamImageTransformer2DModel) has no attn_processors, and its attention "
            "takes text through to_q_t / to_k_t projections that hires' rewrite reads as cross-attention"
        ),
        positions_unsupported=(
            "HiDream-I1's RoPE (HiDreamImageEmbedND) hands its attention 2x2 rotation matrices of (0, row, column) "
            "ids, which none of hires' position hooks rescales"
        ),
        automatic_preset="flux",  # not measured; Flux's evidence stands for it
        resizes_to_base_area=True,
    ),
    # Qwen-Image 2.1: single-stream DiT over [text, image] with block-causal attention (text causal, the image's
    # queries against every key) and a Qwen3-VL text encoder; RoPE from tables built at init, text first, the
    # image's rows and columns centred. The prefix's keys and values (post-RoPE) are cached on the first step
    # ("extract") and reused after ("cached"). True CFG as a cond call, then an uncond call; dynamic shift; a
    # x16 VAE with RGBA images. The pipeline floors sizes to 32 (a vision slot is 2x2 tokens) with a warning and
    # has no default_sample_size: its base is output_resolution, 1024 px.
    Family(
        name="qwenimage21",
        pipeline_classes=("QwenImage21Pipeline",),
        denoiser_attr="transformer",
        denoiser_class="QwenImage21Transformer2DModel",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        base_latent_default=64,
        prediction_source="flow",
        layout=PACKED_SHAPES_PREFIXED,
        text_tokens=512,
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope_tables_text_first",
        guidance_layout="separate",
        guidance_scale_name="true_cfg_scale",
        cfg_switch="do_true_cfg",
        pipeline_size_multiple=32,
        vae=QWEN_IMAGE21_VAE,
        attention_unsupported=(
            "Qwen-Image 2.1's attention (QwenImage21AttnProcessor) is block-causal: its image queries attend to "
            "[text, image] keys and its text queries to their causal prefix, so queries are a subset of the keys, "
            "where hires' windows, entropy scaling and scale fusion rewrite one sequence shared by both (and its "
            "text keys, cached at the first step, would keep a rescaled prefix)"
        ),
        positions_unsupported=(
            "Qwen-Image 2.1's RoPE (QwenImage21Rope) is looked up in tables built at init, its text rows carry "
            "row and column ids too, and the text keys are cached post-RoPE at the first step, so positions "
            "changed per step (DyPE) or rescaled would leave the cached text rotations stale"
        ),
        automatic_preset="flux",  # not measured; Flux's evidence stands for it
    ),
)

SUPPORTED_PIPELINES: tuple[str, ...] = tuple(dict.fromkeys(c for f in FAMILIES for c in f.pipeline_classes))
SUPPORTED_MODULAR_PIPELINES: tuple[str, ...] = tuple(dict.fromkeys(c for f in FAMILIES for c in f.modular_classes))


def ready_class_name(base_class: str) -> str:
    """The name of the ready class of the diffusers class `base_class` (hires.pipelines)."""
    return f"Hires{base_class}"


def ready_classes(families: tuple[Family, ...] | None = None) -> dict[str, tuple[Family, ...]]:
    """Every diffusers class given a ready class, with the families that name it (sd15 and sd21 share one)."""
    found: dict[str, tuple[Family, ...]] = {}
    for family in FAMILIES if families is None else families:
        for base in family.ready_base_classes:
            found[base] = found.get(base, ()) + (family,)
    return found


# Pipelines of a supported model that hires refuses, and why.
REFUSED_PIPELINES = {
    "Flux2KleinKVPipeline": (
        "its __init__ replaces the transformer's attention processors with KV-cache ones (Flux2KVAttnProcessor, "
        "Flux2KVParallelSelfAttnProcessor) whose first step prepends the reference image's tokens and caches their "
        "keys and values for the later steps; hires' latent layout and attention techniques do not know that "
        "sequence. Use Flux2KleinPipeline (reference images as conditioning) or Flux2KleinInpaintPipeline"
    ),
    "ChromaInpaintPipeline": (
        "in diffusers 0.42.1 its call reads transformer.config.guidance_embeds, which ChromaTransformer2DModel's "
        "config does not have, so it fails before its first step with or without hires. Use ChromaImg2ImgPipeline"
    ),
}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A family plus the facts read from one pipeline's configs."""

    family: Family
    base_height: int  # pixels
    base_width: int
    latent_factor: int  # VAE downsampling
    patch_size: int  # latent pixels per token side (1 for UNets)
    prediction_type: str  # "epsilon", "v_prediction" or "flow"

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def size_multiple(self) -> int:
        """Requested heights and widths must be multiples of this (pixels)."""
        return math.lcm(self.latent_factor * self.patch_size, self.family.pipeline_size_multiple)

    @property
    def token_side(self) -> int:
        """Pixels per image token side (the VAE factor for UNets, times the patch for DiTs)."""
        return self.latent_factor * self.patch_size

    @property
    def base_tokens(self) -> int:
        """Image tokens (latent pixels for UNets) at the base size."""
        return (self.base_height // self.token_side) * (self.base_width // self.token_side)


def denoiser_family(denoiser) -> Family | None:
    """The first family whose denoiser class `denoiser` is (or subclasses), or None."""
    names = {cls.__name__ for cls in type(denoiser).__mro__}
    return next((family for family in FAMILIES if family.denoiser_class in names), None)


def nominal_info(family: Family) -> ModelInfo:
    """`family` at a nominal 1024 px base with an 8x VAE (patch 2 where the model config would say it): for
    checks that need no model, such as which techniques apply (`hires techniques`)."""
    patch = family.layout.patch_size if isinstance(family.layout.patch_size, int) else 2
    return ModelInfo(family=family, base_height=1024, base_width=1024, latent_factor=8, patch_size=patch,
                     prediction_type="flow" if family.predicts_flow else "epsilon")


def round_to(value: float, multiple: int) -> int:
    """`value` rounded to the nearest multiple of `multiple` (at least one multiple)."""
    return max(multiple, int(round(value / multiple)) * multiple)


def base_area_size(info: ModelInfo, height: int, width: int) -> tuple[int, int]:
    """The request's aspect ratio at the model's base area, sides rounded to its size multiple: where
    structure guidance generates first, and what a default attention window covers. A request
    whose base-area size is not smaller than itself (SDXL's 832x1216 bucket) is native."""
    shrink = math.sqrt(info.base_height * info.base_width / (height * width))
    m = info.size_multiple
    return round_to(height * shrink, m), round_to(width * shrink, m)


def pipeline_module(pipe, family: Family):
    """The module of the family's diffusers pipeline class that `pipe` is (or subclasses)."""
    cls = next(c for c in type(pipe).__mro__ if c.__name__ in family.pipeline_classes)
    return sys.modules[cls.__module__]


def _config_value(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def detect_family(pipe) -> Family:
    """The family of `pipe`; any other pipeline raises `TypeError` listing the supported classes. The class
    nearest in `pipe`'s class hierarchy decides (Flux2KleinModularPipeline subclasses Flux2ModularPipeline)."""
    order = [cls.__name__ for cls in type(pipe).__mro__]
    refused = next((n for n in order if n in REFUSED_PIPELINES), None)
    if refused is not None:
        raise TypeError(f"pipe={type(pipe).__name__} is not supported by hires: {REFUSED_PIPELINES[refused]}")

    def nearest(family: Family) -> int:
        return min((order.index(c) for c in family.pipeline_classes + family.modular_classes if c in order),
                   default=len(order))

    candidates = sorted((f for f in FAMILIES if nearest(f) < len(order)), key=nearest)
    for family in candidates:
        denoiser = getattr(pipe, family.denoiser_attr, None)
        if denoiser is None:
            continue
        if all(bool(_config_value(denoiser.config, k)) == v for k, v in family.denoiser_config_match):
            return family
    raise TypeError(
        f"pipe={type(pipe).__name__} is not supported by hires; supported pipeline classes (and their "
        f"subclasses): {', '.join(SUPPORTED_PIPELINES)}; Modular Diffusers: {', '.join(SUPPORTED_MODULAR_PIPELINES)}"
    )


# A model folder may record its training size where its pipeline class cannot tell it: this file,
# beside model_index.json (or modular_model_index.json), holding {"base_size": [height, width]} in pixels.
BASE_SIZE_FILE = "hires.json"


def recorded_base_size(pipe) -> tuple[int, int] | None:
    """The base size (pixels) recorded in the folder `pipe` was loaded from, if any."""
    # a ModularPipeline keeps the folder it was loaded from as an attribute, not in its config
    folder = (_config_value(getattr(pipe, "config", {}), "_name_or_path")
              or getattr(pipe, "_pretrained_model_name_or_path", None))
    path = Path(folder) / BASE_SIZE_FILE if isinstance(folder, (str, Path)) and folder else None
    if path is None or not path.is_file():
        return None
    try:
        side = json.loads(path.read_text(encoding="utf-8"))["base_size"]
        height, width = (side, side) if isinstance(side, int) else side
        return int(height), int(width)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected {{\"base_size\": [height, width]}} in pixels ({err})") from None


def read_model_info(pipe, base_size: int | tuple[int, int] | None = None) -> ModelInfo:
    """The family and the facts of `pipe`; `base_size` (pixels) overrides the base size it reads."""
    family = detect_family(pipe)
    denoiser = getattr(pipe, family.denoiser_attr)
    latent_factor = int(pipe.vae_scale_factor)

    override = base_size if base_size is not None else recorded_base_size(pipe)
    if override is not None:
        base_h, base_w = (override, override) if isinstance(override, int) else tuple(override)
        for side in (base_h, base_w):
            if side % latent_factor:
                raise ValueError(f"base_size={override!r}: {side} is not a multiple of the VAE factor {latent_factor}")
        base_h, base_w = base_h // latent_factor, base_w // latent_factor
    else:
        source, key = family.base_size_source
        side = _config_value(denoiser.config, key) if source == "denoiser_config" else getattr(pipe, key,
                                                                                                family.base_latent_default)
        if side is None:
            raise ValueError(f"cannot read the base size of {type(pipe).__name__}: {source}.{key} is not set; "
                             "give HiresConfig(base_size=...)")
        base_h, base_w = (side, side) if isinstance(side, int) else tuple(side)

    patch = family.layout.patch_size
    patch = int(_config_value(denoiser.config, patch)) if isinstance(patch, str) else patch

    if family.predicts_flow:
        prediction = "flow"
    else:
        prediction = _config_value(pipe.scheduler.config, "prediction_type") or "epsilon"

    return ModelInfo(
        family=family,
        base_height=int(base_h) * latent_factor,
        base_width=int(base_w) * latent_factor,
        latent_factor=latent_factor,
        patch_size=patch,
        prediction_type=prediction,
    )
