"""LoRA (loaded with load_lora_weights, fused and unfused) and ControlNet pipelines with apply/remove."""

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import hires
from tiny_models import build, generate

LORA_TARGETS = {
    "sd15": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
    "flux": ["to_q", "to_k", "to_v", "to_out.0"],
}


def techniques_for(family):
    """Techniques whose hooks sit on the layers a LoRA wraps."""
    entropy = hires.EntropyScalingConfig(enabled=True)
    if family == "flux":
        return hires.HiresConfig(entropy_scaling=entropy, positions=hires.PositionConfig(enabled=True))
    return hires.HiresConfig(entropy_scaling=entropy, redilation=hires.RedilationConfig(enabled=True))


def denoiser_of(pipe):
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def save_tiny_lora(family, folder):
    source = build(family)
    torch.manual_seed(1)
    denoiser = denoiser_of(source)
    denoiser.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=LORA_TARGETS[family], init_lora_weights=False))
    layers = get_peft_model_state_dict(denoiser)
    key = "transformer_lora_layers" if family == "flux" else "unet_lora_layers"
    type(source).save_lora_weights(folder, **{key: layers})


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_lora_pipeline_apply_generate_remove_is_bit_identical(family, fused, tmp_path):
    save_tiny_lora(family, tmp_path)
    pipe = build(family)
    without_lora = generate(pipe, family, 128)
    pipe.load_lora_weights(tmp_path)
    if fused:
        pipe.fuse_lora()
    plain = generate(pipe, family, 128)
    assert not torch.equal(plain, without_lora), "the LoRA must change the output for this test to mean anything"

    hires.apply(pipe, techniques_for(family))
    with_hires = generate(pipe, family, 128)
    hires.remove(pipe)
    assert not torch.equal(with_hires, plain)
    assert torch.equal(generate(pipe, family, 128), plain)


def controlnet_pipeline(family):
    from diffusers import (
        ControlNetModel,
        FluxControlNetModel,
        FluxControlNetPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    pipe = build(family)
    torch.manual_seed(2)
    if family == "flux":
        t = pipe.transformer.config
        controlnet = FluxControlNetModel(
            patch_size=1, in_channels=t.in_channels, num_layers=1, num_single_layers=1,
            attention_head_dim=t.attention_head_dim, num_attention_heads=t.num_attention_heads,
            joint_attention_dim=t.joint_attention_dim, pooled_projection_dim=t.pooled_projection_dim,
            guidance_embeds=t.guidance_embeds, axes_dims_rope=t.axes_dims_rope,
        )
        result = FluxControlNetPipeline(**pipe.components, controlnet=controlnet)
        result.default_sample_size = pipe.default_sample_size
    else:
        controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
        cls = StableDiffusionXLControlNetPipeline if family == "sdxl" else StableDiffusionControlNetPipeline
        left_out = ("image_encoder", "feature_extractor", "safety_checker")
        components = {k: v for k, v in pipe.components.items() if k not in left_out}
        extra = {} if family == "sdxl" else {"safety_checker": None, "feature_extractor": None,
                                             "requires_safety_checker": False}
        result = cls(**components, controlnet=controlnet, **extra)
    result.set_progress_bar_config(disable=True)
    return result


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_controlnet_pipeline_apply_generate_remove_is_bit_identical(family):
    pipe = controlnet_pipeline(family)
    assert hires.model_info(pipe).name == family
    control = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    key = "control_image" if family == "flux" else "image"
    plain = generate(pipe, family, 128, **{key: control})
    hires.apply(pipe, techniques_for(family))
    with_hires = generate(pipe, family, 128, **{key: control})
    hires.remove(pipe)
    assert not torch.equal(with_hires, plain)
    assert torch.equal(generate(pipe, family, 128, **{key: control}), plain)


# Flux: a tensor control image is resized to each stage (FluxControlNetPipeline takes its size from it).
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_controlnet_image_follows_each_progressive_stage(family):
    """Each stage is a pipeline call at its own size; the pipeline resizes the control image to it."""
    from hires.techniques.structure_guidance import guidance as progressive

    pipe = controlnet_pipeline(family)
    seen = []
    pipe.controlnet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        tuple((kwargs.get("controlnet_cond") if kwargs.get("controlnet_cond") is not None else args[3]).shape[-2:])),
        with_kwargs=True)
    control = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    key = "control_image" if family == "flux" else "image"
    hires.apply(pipe, hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True)))
    out = generate(pipe, family, 192, steps=6, **{key: control})
    assert out.shape[-2:] == (192, 192)
    sizes = [(stage.height, stage.width) for stage in progressive.last_run(pipe)]
    assert len(sizes) == 3
    # The control image reaches the ControlNet at every stage's own size (pixels, or packed latents for Flux).
    assert len(set(seen)) == 3, seen
