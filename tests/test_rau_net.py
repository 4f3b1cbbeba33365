"""RAU-Net (HiDiffusion): the strided conv and the step windows, the whole UNet against HiDiffusion's own
formulation (a permanently strided copy with `num_upsamplers + 12`), tiny pipelines of every UNet
family, and bit-identity when off, at the base size and after removal."""

import copy

import pytest
import torch
import torch.nn.functional as F

import hires
from hires.families import FAMILIES
from hires.techniques.rau_net.blocks import in_window, pool_features, steps_for_size, strided_conv
from tiny_models import build, generate

UNET_FAMILIES = ("sd15", "sd21", "sdxl")
FACTS = {f.name: f.rau_net for f in FAMILIES}
# The tiny SDXL UNet has two levels; SDXL's own strided downsampler (down_blocks.1's) is its deepest.
TINY_OPTIONS = {"sd15": {}, "sd21": {}, "sdxl": {"downsampler": "down_blocks.0.downsamplers.0"}}


def _config(family, **kwargs):
    return hires.HiresConfig(rau_net=hires.RAUNetConfig(enabled=True, **{**TINY_OPTIONS[family], **kwargs}))


def _steps(pipe):
    return hires.last_call(pipe).notes.get("log.rau_net_steps", {"strided": [], "pooled": []})


# -- math -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side", [16, 17, 30])
def test_strided_conv_is_stride_4_dilation_2_padding_2_and_is_put_back(side):
    torch.manual_seed(side)
    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, side, side + 3)
    out = strided_conv(conv, [conv], x)
    expected = F.conv2d(x, conv.weight, conv.bias, stride=4, padding=2, dilation=2)
    assert out.shape[-2:] == (-(-side // 4), -(-(side + 3) // 4))  # ceil(h / 4): a quarter, like two stride-2 convs
    assert torch.allclose(out, expected, atol=1e-6)
    assert (conv.stride, conv.padding, conv.dilation) == ((2, 2), (1, 1), (1, 1))


def test_pooling_is_a_2x_mean_that_keeps_odd_edges():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(1, 2, 5, 3)
    out = pool_features(x)
    assert out.shape == (1, 2, 3, 2)
    assert torch.allclose(out[0, 0, 0, 0], x[0, 0, :2, :2].mean())
    assert torch.allclose(out[0, 1, 2, 1], x[0, 1, 4, 2])  # the lone corner pixel is its own mean


@pytest.mark.parametrize("steps", [4, 10, 50])
def test_sdxl_windows_match_hidiffusions_step_counters_at_50_steps_and_scale_with_the_schedule(steps):
    facts = FACTS["sdxl"]
    strided, pooled = steps_for_size(facts, 2.0)
    on = [i for i in range(steps) if in_window(i / steps, strided)]
    pool = [i for i in range(steps) if in_window(i / steps, pooled)]
    if steps == 50:  # HiDiffusion's aggressive SDXL mode: downsampler steps < 8, pooling 8 <= step < int(50 * 0.4)
        assert on == list(range(8)) and pool == list(range(8, 20))
    assert on and pool and on[-1] < pool[0]  # both run, one after the other, whatever the step count
    assert len(on) + len(pool) == sum(1 for i in range(steps) if i / steps < 0.4)


def test_the_extreme_windows_start_at_4x_the_base_side():
    for family in UNET_FAMILIES:
        facts = FACTS[family]
        assert steps_for_size(facts, 3.9) == (facts.downsampler_steps, facts.pooled_steps)
        assert steps_for_size(facts, 4.0) == (facts.extreme_downsampler_steps, facts.extreme_pooled_steps)
    assert FACTS["sd15"].extreme_downsampler_steps == (0.0, 0.7) and FACTS["sd15"].extreme_pooled_steps == (0.0, 0.3)


# -- the whole UNet against HiDiffusion's formulation ------------------------------------------------

def _hidiffusion_reference(pipe, downsampler: str, pooled_block: str | None):
    """A copy of the pipeline whose UNet is changed the way HiDiffusion changes it, for every step: the
    downsampler conv permanently at stride 4 / dilation 2 / padding 2, num_upsamplers + 12 (so the UNet
    forwards every skip size to its upsamplers) and, for pooling, torch hooks that pool after the
    block's first pair and resize back bicubically in the mirrored up block after its second-to-last
    resnet's pair."""
    reference = copy.deepcopy(pipe)
    unet = reference.unet
    conv = dict(unet.named_modules())[downsampler].conv
    conv.stride, conv.padding, conv.dilation = (4, 4), (2, 2), (2, 2)
    unet.num_upsamplers += 12
    if pooled_block is not None:
        index = int(pooled_block.split(".")[1])
        down = unet.down_blocks[index]
        up = unet.up_blocks[len(unet.down_blocks) - 1 - index]
        saved = {}
        first = down.attentions[0] if getattr(down, "attentions", None) else down.resnets[0]
        last_pair = len(up.resnets) - 2
        last = up.attentions[last_pair] if getattr(up, "attentions", None) else up.resnets[last_pair]

        def pool(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            saved["size"] = tensor.shape[-2:]
            pooled = F.avg_pool2d(tensor, 2, ceil_mode=True)
            return (pooled, *output[1:]) if isinstance(output, tuple) else pooled

        def restore(module, args, output):
            tensor = output[0] if isinstance(output, tuple) else output
            resized = F.interpolate(tensor, size=tuple(saved["size"]), mode="bicubic", align_corners=False)
            return (resized, *output[1:]) if isinstance(output, tuple) else resized

        first.register_forward_hook(pool)
        last.register_forward_hook(restore)
    return reference


@pytest.mark.parametrize("family", UNET_FAMILIES)
@pytest.mark.parametrize("size", [(128, 128), (136, 104)])
def test_rau_net_in_every_step_equals_the_permanently_strided_unet(family, size):
    pipe = build(family)
    downsampler = TINY_OPTIONS[family].get("downsampler", FACTS[family].downsampler)
    reference = generate(_hidiffusion_reference(pipe, downsampler, None), family, size)
    hires.apply(pipe, _config(family, downsampler_steps=(0.0, 1.0), pooled_steps=(0.0, 0.0)))
    ours = generate(pipe, family, size)
    assert _steps(pipe) == {"strided": [0, 1, 2], "pooled": []}
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_rau_net_pooling_and_striding_together_equal_the_hooked_reference(family):
    pipe = build(family)
    downsampler = TINY_OPTIONS[family].get("downsampler", FACTS[family].downsampler)
    reference = generate(_hidiffusion_reference(pipe, downsampler, "down_blocks.1"), family, (136, 136))
    hires.apply(pipe, _config(family, downsampler_steps=(0.0, 1.0), pooled_steps=(0.0, 1.0)))
    ours = generate(pipe, family, (136, 136))
    assert _steps(pipe) == {"strided": [0, 1, 2], "pooled": [0, 1, 2]}
    assert torch.allclose(ours, reference, atol=1e-5)


def _sdxl_three_level_pipeline():
    """The tiny SDXL pipeline with an SDXL-shaped UNet: a plain first level, two cross-attention levels
    of two layers, so SDXL's own module names (down_blocks.1 and its downsampler) exist."""
    from diffusers import UNet2DConditionModel

    pipe = build("sdxl")
    torch.manual_seed(5)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=(2, 4, 4), use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    ).eval()
    pipe.register_modules(unet=unet)
    return pipe


def test_sdxl_facts_name_modules_of_an_sdxl_shaped_unet_and_both_switches_run():
    pipe = _sdxl_three_level_pipeline()
    plain = generate(pipe, "sdxl", 136, steps=6)
    hires.apply(pipe, hires.HiresConfig(rau_net=hires.RAUNetConfig(enabled=True)))
    ours = generate(pipe, "sdxl", 136, steps=6)
    notes = hires.last_call(pipe).notes
    assert notes["log.rau_net"]["downsampler"] == "down_blocks.1.downsamplers.0"
    assert notes["log.rau_net_steps"] == {"strided": [0], "pooled": [1, 2]}  # [0, 0.16) and [0.16, 0.4) of 6
    assert not torch.equal(ours, plain)
    hires.remove(pipe)
    reference = _hidiffusion_reference(pipe, "down_blocks.1.downsamplers.0", "down_blocks.1")
    hires.apply(pipe, hires.HiresConfig(rau_net=hires.RAUNetConfig(
        enabled=True, downsampler_steps=(0.0, 1.0), pooled_steps=(0.0, 1.0))))
    assert torch.allclose(generate(pipe, "sdxl", 136, steps=2), generate(reference, "sdxl", 136, steps=2), atol=1e-5)


# -- tiny pipelines --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_rau_net_changes_the_image_above_the_base_size_in_the_early_steps_only(family):
    pipe = build(family)
    plain = generate(pipe, family, 128, steps=4)
    hires.apply(pipe, _config(family))
    ours = generate(pipe, family, 128, steps=4)
    assert not torch.equal(ours, plain)
    facts = FACTS[family]
    expected_strided = [i for i in range(4) if in_window(i / 4, facts.downsampler_steps)]
    expected_pooled = [i for i in range(4) if in_window(i / 4, facts.pooled_steps)]
    assert _steps(pipe) == {"strided": expected_strided, "pooled": expected_pooled}
    assert torch.equal(generate(pipe, family, 128, steps=4), ours)  # same seed, same image


def test_the_active_steps_follow_the_schedule_at_50_steps():
    pipe = build("sd15")
    hires.apply(pipe, _config("sd15"))
    generate(pipe, "sd15", 128, steps=50)
    assert _steps(pipe) == {"strided": list(range(20)), "pooled": []}  # HiDiffusion: int(50 * 0.4) steps
    generate(pipe, "sd15", 256, steps=10)  # 4x the base side: the extreme windows
    assert _steps(pipe) == {"strided": list(range(7)), "pooled": list(range(3))}


@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_off_at_the_base_size_and_after_removal_it_is_plain_diffusers(family):
    pipe = build(family)
    modules = list(pipe.unet.named_modules())
    before = {name: (type(m), dict(vars(m)).keys(), getattr(m, "stride", None), getattr(m, "padding", None),
                     getattr(m, "dilation", None)) for name, m in modules}
    num_upsamplers = pipe.unet.num_upsamplers
    plain = generate(pipe, family, 128)
    plain_base = generate(pipe, family, 64)
    hires.apply(pipe, hires.HiresConfig())
    assert torch.equal(generate(pipe, family, 128), plain)
    hires.apply(pipe, _config(family))
    assert torch.equal(generate(pipe, family, 64), plain_base)  # at the base size RAU-Net stays out
    assert not torch.equal(generate(pipe, family, 128), plain)
    hires.remove(pipe)
    assert torch.equal(generate(pipe, family, 128), plain)
    after = {name: (type(m), dict(vars(m)).keys(), getattr(m, "stride", None), getattr(m, "padding", None),
                    getattr(m, "dilation", None)) for name, m in pipe.unet.named_modules()}
    assert after == before
    assert pipe.unet.num_upsamplers == num_upsamplers


def test_an_interrupted_call_leaves_nothing_for_the_next_one():
    pipe = build("sd15")
    hires.apply(pipe, _config("sd15"))
    expected = generate(pipe, "sd15", 128, steps=4)

    def stop(pipeline, step, timestep, kwargs):
        if step == 1:
            raise KeyboardInterrupt
        return kwargs

    with pytest.raises(KeyboardInterrupt):
        generate(pipe, "sd15", 128, steps=4, callback_on_step_end=stop)
    assert torch.equal(generate(pipe, "sd15", 128, steps=4), expected)


def test_non_square_sizes_that_do_not_divide_meet_their_skip_connections():
    pipe = build("sd15")
    hires.apply(pipe, _config("sd15", downsampler_steps=(0.0, 1.0), pooled_steps=(0.0, 1.0)))
    image = generate(pipe, "sd15", (200, 72))  # latent 25 x 9: quarter sides 7 x 3, pooled 4 x 2
    assert image.shape[-2:] == (200, 72) and torch.isfinite(image).all()


# -- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_a_dit_is_a_clear_error(family):
    with pytest.raises(ValueError, match="RAUNetConfig acts on UNet"):
        hires.apply(build(family), hires.HiresConfig(rau_net=hires.RAUNetConfig(enabled=True)))


def test_bad_values_name_the_parameter_and_what_works():
    with pytest.raises(ValueError, match=r"downsampler_steps=\(0.5, 0.2\).*start <= stop"):
        hires.RAUNetConfig(downsampler_steps=(0.5, 0.2))
    with pytest.raises(TypeError, match="pooled_steps"):
        hires.RAUNetConfig(pooled_steps=0.3)
    with pytest.raises(ValueError, match="upsample_mode='area'"):
        hires.RAUNetConfig(upsample_mode="area")
    with pytest.raises(ValueError, match=r"downsampler='down_blocks.1.downsampler'.*down_blocks.0.downsamplers.0"):
        hires.apply(build("sd15"), _config("sd15", downsampler="down_blocks.1.downsampler"))
    with pytest.raises(ValueError, match=r"pooled_block='down_blocks.7'.*down_blocks.0, down_blocks.1"):
        hires.apply(build("sd15"), _config("sd15", pooled_block="down_blocks.7"))
    # SDXL's own downsampler is missing on the two-level tiny UNet: an error, never skipped.
    with pytest.raises(ValueError, match="down_blocks.1.downsamplers.0"):
        hires.apply(build("sdxl"), hires.HiresConfig(rau_net=hires.RAUNetConfig(enabled=True)))


def test_controlnet_is_a_clear_error():
    from test_lora_controlnet import controlnet_pipeline

    with pytest.raises(ValueError, match="ControlNet"):
        hires.apply(controlnet_pipeline("sd15"), _config("sd15"))


def test_with_scale_fusion_redilation_and_structure_guidance_then_removed():
    pipe = build("sd15")
    plain = generate(pipe, "sd15", 128, steps=6)
    hires.apply(pipe, hires.HiresConfig(
        rau_net=hires.RAUNetConfig(enabled=True), scale_fusion=hires.ScaleFusionConfig(enabled=True),
        redilation=hires.RedilationConfig(enabled=True), entropy_scaling=hires.EntropyScalingConfig(enabled=True),
        structure_guidance=hires.StructureGuidanceConfig(enabled=True)))
    out = generate(pipe, "sd15", 128, steps=6)
    assert out.shape == plain.shape and torch.isfinite(out).all() and not torch.equal(out, plain)
    hires.remove(pipe)
    assert torch.equal(generate(pipe, "sd15", 128, steps=6), plain)
