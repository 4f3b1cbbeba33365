import pytest
import torch

import hires
from hires.families import detect_family
from tiny_models import build


EXPECTED = {
    # family: (base px, size multiple, prediction type)
    "sd15": (64, 8, "epsilon"),
    "sd21": (64, 8, "v_prediction"),
    "sdxl": (64, 8, "epsilon"),
    "pixart": (64, 16, "epsilon"),
    "sd3": (64, 16, "flow"),
    "flux": (64, 16, "flow"),
    "flux2": (64, 16, "flow"),
    "flux2_klein": (64, 16, "flow"),
    "chroma": (64, 16, "flow"),
    "qwenimage": (64, 16, "flow"),
    "zimage": (64, 16, "flow"),
    "ernie_image": (64, 16, "flow"),
    "krea2": (64, 16, "flow"),
}
# Families whose pipeline's vae_scale_factor counts a 2x2 patchify beside the VAE's own 8x (ERNIE-Image).
X16_LATENT = ("ernie_image",)


def test_each_family_is_recognised_with_facts_read_from_its_configs(family):
    info = hires.model_info(build(family))
    base, multiple, prediction = EXPECTED[family]
    assert info.name == family
    assert (info.base_height, info.base_width) == (base, base)
    assert info.latent_factor == (16 if family in X16_LATENT else 8)
    assert info.size_multiple == multiple
    assert info.prediction_type == prediction


@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart", "sd3"])
def test_base_size_follows_the_denoiser_config_not_the_family_name(family):
    pipe = build(family)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    denoiser.register_to_config(sample_size=12)
    assert hires.model_info(pipe).base_height == 12 * 8


def test_flux_base_size_comes_from_the_pipelines_default_sample_size():
    pipe = build("flux")
    pipe.default_sample_size = 16
    assert hires.model_info(pipe).base_height == 128


def test_img2img_and_controlnet_variants_are_the_same_family():
    from diffusers import (
        ControlNetModel,
        FluxImg2ImgPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionXLImg2ImgPipeline,
    )

    sd = build("sd15")
    assert detect_family(StableDiffusionImg2ImgPipeline(**sd.components)).name == "sd15"
    controlnet = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    assert detect_family(StableDiffusionControlNetPipeline(**sd.components, controlnet=controlnet)).name == "sd15"
    xl = build("sdxl")
    components = {k: v for k, v in xl.components.items() if k in ("vae", "unet", "scheduler", "text_encoder",
                  "text_encoder_2", "tokenizer", "tokenizer_2")}
    assert detect_family(StableDiffusionXLImg2ImgPipeline(**components)).name == "sdxl"
    assert detect_family(FluxImg2ImgPipeline(**build("flux").components)).name == "flux"


def test_unsupported_pipeline_is_a_type_error_listing_the_supported_classes():
    from diffusers import DDPMPipeline, UNet2DModel, DDPMScheduler

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    with pytest.raises(TypeError) as err:
        hires.apply(pipe)
    message = str(err.value)
    assert "DDPMPipeline" in message
    for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "PixArtSigmaPipeline",
                 "StableDiffusion3Pipeline", "FluxPipeline"):
        assert name in message
    with pytest.raises(TypeError):
        hires.apply(torch.nn.Linear(2, 2))


def test_the_pipelines_own_size_rule_counts_when_the_vae_factor_is_smaller():
    # The testbed UNet's VAE downsamples 4x, but StableDiffusionPipeline.check_inputs demands multiples of 8.
    from hires.cli import DEFAULT_MODEL, load_pipeline_skeleton

    info = hires.model_info(load_pipeline_skeleton(DEFAULT_MODEL))
    assert (info.latent_factor, info.token_side, info.size_multiple) == (4, 4, 8)
    assert info.base_tokens == 16 * 16
