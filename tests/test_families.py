import pytest
import torch

import hires
from hires.families import detect_family
from tiny_models import build, generate


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
    "hidream": (64, 16, "flow"),
    "qwenimage21": (64, 32, "flow"),  # QwenImage21Pipeline floors sizes to 32 (a vision slot of 2x2 tokens)
}
# Families whose pipeline's vae_scale_factor is 16: a 2x2 patchify beside the VAE's own 8x (ERNIE-Image), or a
# x16 VAE (Qwen-Image 2.1).
X16_LATENT = ("ernie_image", "qwenimage21")


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


# SD3.5's released transformer configs (public copies of stabilityai/stable-diffusion-3.5-large and -medium,
# transformer/config.json): the SD3 record reads them as SD3's, base 128 latents x 8 = 1024 px.
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
SD35_MEDIUM = dict(SD35_LARGE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                   pos_embed_max_size=384, dual_attention_layers=tuple(range(13)))


def _sd35(config):
    """The tiny SD3 pipeline around a meta-device transformer of `config` (shapes only, no weights)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(config)
    return StableDiffusion3Pipeline(**{**build("sd3").components, "transformer": transformer})


@pytest.mark.parametrize("config, table_fits_4096", [(SD35_LARGE, False), (SD35_MEDIUM, True)],
                         ids=["large", "medium"])
def test_sd35_is_sd3_and_its_preset_plans_4096_past_or_inside_its_table(config, table_fits_4096):
    from hires.presets import AUTOMATIC
    from hires.runtime import estimate_adaptations, stage_plan
    from hires.sampling.stages import StageRequest
    from hires.techniques.memory import estimate

    pipe = _sd35(config)
    info = hires.model_info(pipe)
    assert (info.name, info.base_height, info.base_width, info.size_multiple) == ("sd3", 1024, 1024, 16)
    preset = AUTOMATIC["sd3"]
    assert preset.positions.enabled and preset.structure_guidance.enabled
    stages = stage_plan(info, preset, StageRequest(4096, 4096, 28))
    assert [(s.height, s.width) for s in stages] == [(1024, 1024), (2048, 2048), (4096, 4096)]
    # 4096 px is 256 tokens a side: inside Medium's 384-token table, past Large's 192 (where plain diffusers
    # raises and PositionConfig interpolates the table).
    assert (4096 // 16 <= config["pos_embed_max_size"]) is table_fits_4096
    latent = 4096 // 8
    adaptations = estimate_adaptations(info, preset)
    assert estimate.denoiser_peak_bytes(pipe.transformer, latent, latent, torch.bfloat16, batch=2,
                                        adaptations=adaptations) > 0
    if not table_fits_4096:  # the memory planner's meta-device copy needs the positions' table extension too
        with pytest.raises(ValueError, match=r"Height \(256\) cannot be greater than `pos_embed_max_size`: 192"):
            estimate.denoiser_peak_bytes(pipe.transformer, latent, latent, torch.bfloat16, batch=2)


def test_sd35_medium_dual_attention_blocks_get_windows_too():
    """SD3.5 Medium's first 13 blocks add an image-only attention (attn2): the preset windows it as well."""
    from diffusers import SD3Transformer2DModel

    from hires.techniques.window_attention import windows

    pipe = build("sd3")
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    config["dual_attention_layers"] = (0,)
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel.from_config(config).eval()
    plain = generate(pipe, "sd3", 64, steps=2)
    hires.apply(pipe)
    assert torch.equal(generate(pipe, "sd3", 64, steps=2), plain)
    generate(pipe, "sd3", 256, steps=3)
    windowed = hires.last_call(pipe).notes[windows.LOG_WINDOWS]
    assert {"transformer_blocks.0.attn", "transformer_blocks.0.attn2"} <= set(windowed)
    hires.remove(pipe)
    assert torch.equal(generate(pipe, "sd3", 64, steps=2), plain)


def _automatic(renoise: float | None = None, step_fraction: float | None = None, positions: bool = False,
               rope: str | None = None, windows: bool = True, memory: bool = True):
    """The automatic preset as hires writes it out per family, field by field."""
    return hires.HiresConfig(
        structure_guidance=hires.StructureGuidanceConfig(enabled=True, space="latent", upscale_space="pixel",
                                                         ladder="doubling", guided_fraction=1.0, handover="fade",
                                                         renoise=renoise, step_fraction=step_fraction),
        window_attention=hires.WindowAttentionConfig(enabled=windows),
        memory=hires.MemoryConfig(enabled=memory, above_base_only=True),
        positions=hires.PositionConfig(enabled=positions, rope=rope),
    )


UNET = {"renoise": 0.7}
FLOW_DIT = {"renoise": 0.85, "step_fraction": 0.3}  # Flux's evidence, for every flow DiT of its design
PI = {"positions": True, "rope": "interpolation"}  # where the family's record lets hires rescale its RoPE
AUTOMATIC_BY_FAMILY = {
    "sd15": _automatic(**UNET),
    "sd21": _automatic(**UNET),
    "sdxl": _automatic(renoise=0.7, step_fraction=0.25),
    "pixart": _automatic(positions=True),
    "sd3": _automatic(positions=True),
    "flux": _automatic(**FLOW_DIT, **PI),
    "flux2": _automatic(**FLOW_DIT, **PI),
    "flux2_klein": _automatic(**FLOW_DIT, **PI),
    "chroma": _automatic(**FLOW_DIT, **PI),
    "qwenimage": _automatic(**FLOW_DIT, **PI, memory=False),
    "zimage": _automatic(**FLOW_DIT, **PI, windows=False),
    "flux3": _automatic(**FLOW_DIT, **PI, windows=False),
    "ernie_image": _automatic(**FLOW_DIT, windows=False),
    "krea2": _automatic(**FLOW_DIT, windows=False, memory=False),
    "hidream": _automatic(**FLOW_DIT, windows=False),
}


def test_every_family_runs_the_automatic_preset_written_out_above():
    from hires.families import FAMILIES, nominal_info
    from hires.presets import AUTOMATIC, automatic_config

    # The families of hires 0.1.0 (a family added later needs no line here); a preset change is a change here too.
    assert {name: AUTOMATIC[name] for name in AUTOMATIC_BY_FAMILY} == AUTOMATIC_BY_FAMILY
    records = {f.name: f for f in FAMILIES}
    assert {name: automatic_config(nominal_info(records[name])) for name in AUTOMATIC_BY_FAMILY} == AUTOMATIC_BY_FAMILY


def test_every_family_with_a_classic_pipeline_has_a_tiny_model():
    from hires.families import FAMILIES
    from tiny_models import BUILDERS, CALL_KWARGS

    assert list(BUILDERS) == [f.name for f in FAMILIES if f.pipeline_classes] == list(CALL_KWARGS)
