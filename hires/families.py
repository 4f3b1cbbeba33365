"""Facts about the supported model families: data, not logic.

A `Family` says how to recognise a pipeline and where to read its facts; `ModelInfo` is those facts
read from one pipeline's own model configs (base size, latent factor, patch size, prediction type),
never assumed from the family's name.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
class LatentConvention:
    """How a family's pipeline turns its denoiser's latent z into the VAE's own latent v, read from its
    decode (and img2img encode) code; the VAE config's fields count only where that code reads them."""

    # v = z / scaling_factor + shift_factor (SD3, Flux, Chroma, Z-Image); SD 1.x/2.x, SDXL and PixArt
    # pipelines never read shift_factor, whatever the VAE config holds.
    shift: bool = False
    # Per-channel latents_mean / latents_std where the VAE config has them: v = z * std / scaling_factor + mean
    # (SDXL), or without the scaling factor v = z * std + mean (Qwen-Image).
    channel_statistics: bool = False
    statistics_scaled: bool = True
    # Flux.2: v is z patchified 2x2, denormalised by the VAE's batch-norm running statistics, un-patchified.
    batch_norm_patches: bool = False


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    # diffusers pipeline classes (by name) of this family; subclasses are recognised too.
    pipeline_classes: tuple[str, ...]
    denoiser_attr: str  # "unet" or "transformer"
    architecture: str  # "unet" or "dit"
    # Where the base latent side is read: ("denoiser_config", "sample_size") or ("pipeline", "default_sample_size").
    base_size_source: tuple[str, str]
    # Patch side in latent pixels: an int, or the denoiser config key that holds it.
    patch_size: int | str
    # "scheduler" (eps / v from scheduler.config.prediction_type) or "flow" (velocity).
    prediction_source: str
    # How the denoiser receives latents: "spatial" (B, C, h, w) or "packed" (B, h/2*w/2, 4C) with img_ids.
    latent_layout: str
    # The denoiser gets `timestep * timestep_input_scale` for a scheduler timestep (Flux divides by 1000).
    timestep_input_scale: float
    # How image positions are encoded: "none", "sincos_interpolated", "sincos_cropped_table", "rope".
    position_encoding: str
    # How the pipeline runs classifier-free guidance: "batched" (one denoiser call on [uncond, cond],
    # combined as uncond + w*(cond - uncond)) or "separate" (Flux's true CFG: a cond call, then an
    # uncond call, combined the same way) or "none" (the pipeline never runs CFG: Flux.2 [dev]). The
    # scale is the __call__ local named guidance_scale_name.
    guidance_layout: str = "batched"
    guidance_scale_name: str = "guidance_scale"
    # A multiple the pipeline's own check_inputs demands whatever the VAE factor (SD/SDXL/PixArt: 8).
    pipeline_size_multiple: int = 1
    # Extra recognition rule on the denoiser config (sd15 vs sd21 share pipeline classes).
    denoiser_config_match: tuple[tuple[str, Any], ...] = ()
    # RoPE families: which image side each position-id axis counts (None: an axis that is not a side).
    rope_axis_sides: tuple[str | None, ...] = ()
    # UNets: where and when RAU-Net acts (None: RAU-Net needs explicit modules and steps).
    rau_net: RAUNetFacts | None = None
    # "separate" layout: the __call__ local that says whether this call runs CFG (Flux: do_true_cfg);
    # None: the scale alone and the pipeline's own `do_classifier_free_guidance` say it.
    cfg_switch: str | None = None
    # How the pipeline computes the flow shift mu from the image token count: "linear" (the
    # scheduler config's base/max shift, Flux and SD3) or "flux2_empirical" (Flux.2's
    # compute_empirical_mu, which also depends on the step count).
    shift_rule: str = "linear"
    # What the pipeline returns for output_type="latent": "denoiser" (the latents as its denoiser sees
    # them, packed for packed layouts) or "vae" (the VAE's own latent: Flux2KleinPipeline).
    latent_output: str = "denoiser"
    # Why the denoiser's attention mask rules out scale fusion and dilated sampling (None: the pipeline passes
    # no mask). Window attention cuts a mask to its windows; the fused branches and the sub-lattice pass do not.
    attention_masked: str | None = None
    # Packed families: the denoiser argument that tells the token grid: "img_ids" (Flux: a row and a
    # column id per token) or "img_shapes" (Qwen-Image: (frames, rows, cols) per image).
    packed_grid_source: str = "img_ids"
    # Why hires cannot tile this family's VAE (None: it can): VAETilingConfig and MemoryConfig refuse with it.
    vae_untileable: str | None = None
    # Why hires cannot rewrite this family's attention (None: it can): entropy scaling and windows refuse with it.
    attention_unsupported: str | None = None
    # The denoiser's timestep parameter, and how it takes latents: "tensor", or "frame_list" (Z-Image: a
    # list of (C, 1, h, w) latents in, a list out, time 1 - sigma, output the negated velocity), which
    # hires' hooks see as a (B, C, h, w) tensor, timestep sigma and the velocity (hires.runtime).
    timestep_argument: str = "timestep"
    denoiser_io: str = "tensor"
    # Batched CFG: whether the pipeline stacks [cond, uncond] (Z-Image) instead of [uncond, cond], and
    # what it adds to guidance_scale to get w in uncond + w (cond - uncond) (Z-Image combines
    # cond + s (cond - uncond), i.e. w = s + 1).
    cfg_cond_first: bool = False
    guidance_scale_offset: float = 0.0
    # Latent base side used when the pipeline has no `base_size_source` attribute (ZImagePipeline has no
    # default_sample_size; its __call__ defaults to 1024 px).
    base_latent_default: int | None = None
    latent_convention: LatentConvention = LatentConvention()


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
        architecture="unet",
        base_size_source=("denoiser_config", "sample_size"),
        patch_size=1,
        prediction_source="scheduler",
        latent_layout="spatial",
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
        architecture="unet",
        base_size_source=("denoiser_config", "sample_size"),
        patch_size=1,
        prediction_source="scheduler",
        latent_layout="spatial",
        timestep_input_scale=1.0,
        position_encoding="none",
        pipeline_size_multiple=8,
        rau_net=_SD_RAU_NET,
        denoiser_config_match=(("use_linear_projection", True),),
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
        architecture="unet",
        base_size_source=("denoiser_config", "sample_size"),
        patch_size=1,
        prediction_source="scheduler",
        latent_layout="spatial",
        timestep_input_scale=1.0,
        position_encoding="none",
        pipeline_size_multiple=8,
        rau_net=_SDXL_RAU_NET,
        latent_convention=LatentConvention(channel_statistics=True),
    ),
    Family(
        name="pixart",
        pipeline_classes=("PixArtSigmaPipeline",),
        denoiser_attr="transformer",
        architecture="dit",
        base_size_source=("denoiser_config", "sample_size"),
        patch_size="patch_size",
        prediction_source="scheduler",
        latent_layout="spatial",
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
        architecture="dit",
        base_size_source=("denoiser_config", "sample_size"),
        patch_size="patch_size",
        prediction_source="flow",
        latent_layout="spatial",
        timestep_input_scale=1.0,
        position_encoding="sincos_cropped_table",
        latent_convention=LatentConvention(shift=True),
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
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        patch_size=2,
        prediction_source="flow",
        latent_layout="packed",
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope",
        # FluxPipeline._prepare_latent_image_ids: axis 0 is zero for text and image, axis 1 the row,
        # axis 2 the column of the packed latent grid.
        rope_axis_sides=(None, "height", "width"),
        # FluxPipeline's guidance_scale feeds the distilled guidance embedding; true CFG is separate.
        guidance_layout="separate",
        guidance_scale_name="true_cfg_scale",
        cfg_switch="do_true_cfg",
        latent_convention=LatentConvention(shift=True),
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
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        patch_size=2,
        prediction_source="flow",
        latent_layout="packed",
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope",
        rope_axis_sides=(None, "height", "width", None),
        guidance_layout="none",
        guidance_scale_name="guidance_scale",
        shift_rule="flux2_empirical",
        latent_convention=LatentConvention(batch_norm_patches=True),
    ),
    # Flux.2 [klein]: the Flux.2 transformer without a guidance embedding and a Qwen3 text encoder. The
    # base models run true CFG (a cond call, then a call on the empty prompt, at guidance_scale > 1);
    # step-distilled ones (pipeline config is_distilled) run none, which `do_classifier_free_guidance` says.
    Family(
        name="flux2_klein",
        pipeline_classes=("Flux2KleinPipeline",),
        denoiser_attr="transformer",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        patch_size=2,
        prediction_source="flow",
        latent_layout="packed",
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope",
        rope_axis_sides=(None, "height", "width", None),
        guidance_layout="separate",
        guidance_scale_name="guidance_scale",
        shift_rule="flux2_empirical",
        latent_output="vae",
        latent_convention=LatentConvention(batch_norm_patches=True),
    ),
    # Chroma: Flux's packing and 3-axis RoPE ids, a T5 encoder only (no CLIP, no guidance embedding), and
    # true CFG with a negative prompt at guidance_scale > 1 (a cond call, then an uncond call).
    Family(
        name="chroma",
        pipeline_classes=("ChromaPipeline", "ChromaImg2ImgPipeline"),
        denoiser_attr="transformer",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        patch_size=2,
        prediction_source="flow",
        latent_layout="packed",
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope",
        rope_axis_sides=(None, "height", "width"),
        guidance_layout="separate",
        guidance_scale_name="guidance_scale",
        attention_masked=(
            "ChromaPipeline passes its text padding mask (batch, text + image tokens) to every attention call; scale "
            "fusion's global and local branches and dilated sampling's sub-lattice pass (a base-size token count) "
            "do not carry it"
        ),
        latent_convention=LatentConvention(shift=True),
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
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        patch_size=2,
        prediction_source="flow",
        latent_layout="packed",
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope_centred",
        rope_axis_sides=(None, "height", "width"),
        guidance_layout="separate",
        guidance_scale_name="true_cfg_scale",
        cfg_switch="do_true_cfg",
        packed_grid_source="img_shapes",
        vae_untileable=(
            "Qwen-Image's VAE (AutoencoderKLQwenImage) is a causal 3D VAE of CausalConv3d blocks with a frame "
            "cache, which hires' whole-image-statistics tiled decode does not cover; decode untiled (the "
            "default), or use diffusers' own pipe.vae.enable_tiling(), which blends overlapping tiles"
        ),
        latent_convention=LatentConvention(channel_statistics=True, statistics_scaled=False),
    ),
    # Z-Image: single-stream DiT. Latents spatial (patchified 2x2 inside the transformer); 3-axis RoPE looked
    # up in per-axis tables by integer ids: axis 0 the sequence (caption 1..L, image at L + 1), axes 1 and 2
    # the row and column from 0. CFG batched as [cond, uncond]; Z-Image Turbo runs guidance_scale 0 (no CFG).
    Family(
        name="zimage",
        pipeline_classes=("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageControlNetPipeline"),
        denoiser_attr="transformer",
        architecture="dit",
        base_size_source=("pipeline", "default_sample_size"),
        base_latent_default=128,
        patch_size=2,
        prediction_source="flow",
        latent_layout="spatial",
        timestep_input_scale=1.0 / 1000.0,
        position_encoding="rope_id_tables",
        rope_axis_sides=(None, "height", "width"),
        timestep_argument="t",
        denoiser_io="frame_list",
        cfg_cond_first=True,
        guidance_scale_offset=1.0,
        attention_unsupported=(
            "Z-Image's single-stream attention (ZSingleStreamAttnProcessor) runs over image and caption "
            "sequences padded to multiples of 32 with learned pad tokens that stay keys, so the image "
            "token grid and key counts hires rescales are not what the layer sees"
        ),
        latent_convention=LatentConvention(shift=True),
    ),
)

SUPPORTED_PIPELINES: tuple[str, ...] = tuple(dict.fromkeys(c for f in FAMILIES for c in f.pipeline_classes))


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


def _pipeline_class_names(pipe) -> set[str]:
    return {cls.__name__ for cls in type(pipe).__mro__ if cls.__module__.startswith("diffusers")}


def _config_value(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def detect_family(pipe) -> Family:
    """The family of `pipe`; any other pipeline raises `TypeError` listing the supported classes."""
    names = _pipeline_class_names(pipe)
    candidates = [f for f in FAMILIES if names & set(f.pipeline_classes)]
    for family in candidates:
        denoiser = getattr(pipe, family.denoiser_attr, None)
        if denoiser is None:
            continue
        if all(bool(_config_value(denoiser.config, k)) == v for k, v in family.denoiser_config_match):
            return family
    raise TypeError(
        f"pipe={type(pipe).__name__} is not supported by hires; supported pipeline classes (and their "
        f"subclasses): {', '.join(SUPPORTED_PIPELINES)}"
    )


# A model folder may record its training size where its pipeline class cannot tell it: this file,
# beside model_index.json, holding {"base_size": [height, width]} in pixels.
BASE_SIZE_FILE = "hires.json"


def recorded_base_size(pipe) -> tuple[int, int] | None:
    """The base size (pixels) recorded in the folder `pipe` was loaded from, if any."""
    folder = _config_value(getattr(pipe, "config", {}), "_name_or_path")
    path = Path(folder) / BASE_SIZE_FILE if folder else None
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

    patch = family.patch_size
    patch = int(_config_value(denoiser.config, patch)) if isinstance(patch, str) else patch

    if family.prediction_source == "flow":
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
