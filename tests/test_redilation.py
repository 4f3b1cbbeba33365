"""Re-dilation: conv math, schedules, presets and name checks, tiny pipelines, LoRA, offload, NDCFG."""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import hires
from hires.config import RedilationConfig
from hires.techniques.redilation.presets import PRESETS, map_to_depth, preset_for
from hires.techniques.redilation import dilation as redilation
from hires.techniques.redilation.dilation import (active_step_count, dilatable_convs,
                                                  dilation_for_step, resolve_preset_names,
                                         run_dilated)
from tiny_models import build, generate

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
from benchmarks.common import full_size_unet  # noqa: E402

UNET_FAMILIES = ("sd15", "sd21", "sdxl")


def _config(**kwargs):
    return hires.HiresConfig(redilation=hires.RedilationConfig(enabled=True, **kwargs))


# -- math ----------------------------------------------------------------------------------------

def _zero_inserted(weight: torch.Tensor, dilation: int) -> torch.Tensor:
    """A k x k kernel spread to (k-1)*d+1 with zeros between its taps."""
    k = weight.shape[-1]
    side = (k - 1) * dilation + 1
    spread = torch.zeros(*weight.shape[:2], side, side, dtype=weight.dtype)
    spread[..., ::dilation, ::dilation] = weight
    return spread


@pytest.mark.parametrize("dilation", [1, 2, 3, 4])
@pytest.mark.parametrize("stride", [1, 2])
def test_redilated_conv_equals_the_zero_inserted_kernel_run_undilated(dilation, stride):
    torch.manual_seed(dilation)
    conv = torch.nn.Conv2d(4, 6, 3, stride=stride, padding=1)
    x = torch.randn(2, 4, 16, 16)
    out = run_dilated(conv.forward, [conv], x, float(dilation), stride)
    expected = F.conv2d(x, _zero_inserted(conv.weight, dilation), conv.bias, stride=stride, padding=dilation)
    assert out.shape == (2, 6, 16 // stride, 16 // stride)
    assert torch.allclose(out, expected, atol=1e-5)
    assert conv.dilation == (1, 1) and conv.padding == (1, 1)  # put back


@pytest.mark.parametrize("factor", [1.5, 2.5, 3.3])
@pytest.mark.parametrize("stride", [1, 2])
def test_fractional_factor_is_resize_then_dilated_conv_then_resize_back(factor, stride):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, stride=stride, padding=1)
    x = torch.randn(1, 3, 20, 20)
    ceil = math.ceil(factor)
    enlarged = F.interpolate(x, size=(int(20 * ceil / factor),) * 2, mode="bilinear", align_corners=False)
    dilated = F.conv2d(enlarged, _zero_inserted(conv.weight, ceil), conv.bias, stride=stride, padding=ceil)
    expected = F.interpolate(dilated, size=(20 // stride,) * 2, mode="bilinear", align_corners=False)
    assert torch.allclose(run_dilated(conv.forward, [conv], x, factor, stride), expected, atol=1e-5)


def test_progressive_schedule_reproduces_the_reference_table():
    tau = 35
    assert [dilation_for_step(4, i, tau, True) for i in range(50)] == [4] * 9 + [3] * 9 + [2] * 17 + [1] * 15
    assert [dilation_for_step(3, i, tau, True) for i in range(35)] == [3] * 12 + [2] * 23
    assert [dilation_for_step(2.5, i, 30, False) for i in (0, 29, 30)] == [2.5, 2.5, 1.0]
    assert dilation_for_step(1.5, 0, 30, True) == 1.5  # nothing to decay below 2
    # a fractional factor (sizes between presets) starts at itself, then decays in integers
    assert [dilation_for_step(4.5, i, 10, True) for i in (0, 1, 2, 4, 9)] == [4.5, 4.5, 4.0, 3.0, 2.0]


def test_active_steps_from_fraction_or_timestep_threshold():
    # 50-step DDIM with steps_offset=1: t_i = 981 - 20 i; the official tau values
    timesteps = torch.arange(981, 0, -20, dtype=torch.float64)
    assert len(timesteps) == 50
    for tau, min_t in ((20, 601), (30, 401), (35, 301), (37, 261)):
        assert active_step_count(timesteps, tau / 50, None) == tau
        assert active_step_count(timesteps, None, min_t) == tau
    assert active_step_count(timesteps[:10], 0.7, None) == 7  # scheduler-agnostic: fractions of any schedule
    assert active_step_count(timesteps, None, 2000) == 0


# -- presets and names ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_every_preset_names_only_modules_the_full_size_unet_has(family):
    unet = full_size_unet(family)
    names = list(dilatable_convs(unet))
    assert len(unet.down_blocks) == PRESETS[family].depth
    for preset in PRESETS[family].presets:
        for pairs in (preset.dilations, preset.ndcfg_dilations, [(n, 1) for n in preset.dispersion_modules]):
            for name, value in pairs:  # each entry on its own: one that matches nothing raises
                resolved, left_out = resolve_preset_names([(name, value)], family, names, len(unet.down_blocks))
                assert resolved and not left_out, (family, preset.official_size, name)


def test_sdxl_presets_dilate_what_the_official_configs_actually_dilated():
    unet = full_size_unet("sdxl")
    names = list(dilatable_convs(unet))
    assert not any(n.startswith("down_blocks.3") or n.startswith("down_blocks.2.downsamplers")
                   or n.startswith("up_blocks.2.upsamplers") for n in names)
    preset = preset_for("sdxl", 4.0, 1.0)  # 2048^2: only the mid block and up_blocks.0
    resolved, _ = resolve_preset_names(preset.dilations, "sdxl", names, 3)
    assert {n.split(".resnets")[0].split(".upsamplers")[0] for n in resolved} == {"mid_block", "up_blocks.0"}
    preset = preset_for("sdxl", 16.0, 1.0)
    resolved, _ = resolve_preset_names(preset.dilations, "sdxl", names, 3)
    assert resolved["down_blocks.2.resnets.1.conv2"] == 4 and resolved["up_blocks.1.upsamplers.0.conv"] == 3
    assert resolved["up_blocks.2.resnets.2.conv1"] == 2


@pytest.mark.parametrize("family,sizes", [("sd15", ((1024, 1024), (1280, 1280), (1024, 2048), (2048, 2048))),
                                          ("sdxl", ((2048, 2048), (2560, 2560), (2048, 4096), (4096, 4096)))])
def test_official_sizes_take_their_presets_and_other_sizes_follow_the_area_rule(family, sizes):
    base = 512 if family == "sd15" else 1024
    for height, width in sizes:
        preset = preset_for(family, height * width / base**2, max(height, width) / min(height, width))
        assert preset.official_size == f"{max(height, width)}x{min(height, width)}"
    assert preset_for(family, 8.0, 2.0) is preset_for(family, 8.0, 2.0)  # tall and wide share it
    # between presets: the nearest area's layout, factors times the side ratio
    scaled = preset_for(family, 9.0, 1.0)  # nearest is 8x (log distance 0.12 vs 0.41 to 6.25x)
    reference = preset_for(family, 8.0, 2.0)
    assert [n for n, _ in scaled.dilations] == [n for n, _ in reference.dilations]
    assert all(math.isclose(s, r * math.sqrt(9 / 8)) for (_, s), (_, r) in zip(scaled.dilations, reference.dilations))
    assert preset_for(family, 1.0, 1.0).dilations == ()  # base size: nothing dilated
    assert preset_for(family, 2.0, 2.0).dilations[0][1] == pytest.approx(2 * math.sqrt(0.5))


def test_presets_map_onto_shallower_unets_from_the_bottleneck():
    assert map_to_depth("down_blocks.3.resnets", 4, 2) == "down_blocks.1.resnets"
    assert map_to_depth("down_blocks.2.downsamplers", 4, 2) == "down_blocks.0.downsamplers"
    assert map_to_depth("down_blocks.1", 4, 2) is None
    assert map_to_depth("up_blocks.1", 4, 2) == "up_blocks.1"
    assert map_to_depth("up_blocks.2", 4, 2) is None
    assert map_to_depth("mid_block", 4, 2) == "mid_block"
    assert map_to_depth("down_blocks.3", 4, 4) == "down_blocks.3"


@pytest.mark.parametrize("field,name,hint", [
    ("dilations", {"down_blocks.3": 2}, "down_blocks.1"),
    ("dilations", {"mid_block.attentions.0": 2}, "mid_block"),
    ("ndcfg_dilations", {"up_block.0": 2}, "up_blocks.0"),
    ("dispersion_modules", ("midblock",), "mid_block"),
])
def test_a_config_naming_a_missing_module_lists_the_closest_valid_names(field, name, hint):
    pipe = build("sd15")
    with pytest.raises(ValueError, match=rf"{field}.*{list(name)[0]}.*closest valid names.*{hint}"):
        hires.apply(pipe, _config(**{field: name}))
    assert not hires.is_applied(pipe)


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_redilation_on_a_transformer_family_names_the_family_and_what_applies(family):
    with pytest.raises(ValueError, match=rf"{family}.*diffusion transformer.*EntropyScalingConfig, PositionConfig"):
        hires.apply(build(family), _config())


# -- tiny pipelines ------------------------------------------------------------------------------

def _record_dilations(pipe):
    """Observe every conv execution from outside hires: (step, conv name, dilation) as torch runs it."""
    seen, step = [], [0]
    for name, module in dilatable_convs(pipe.unet).items():
        conv = redilation._base_conv(module)
        original = conv._conv_forward

        def recording(x, weight, bias, conv=conv, name=name, original=original):
            seen.append((step[0], name, conv.dilation[0], weight.shape[-1]))
            return original(x, weight, bias)

        conv._conv_forward = recording

    def on_step_end(pipe, i, t, kwargs):
        step[0] = i + 1
        return {}

    return seen, on_step_end


@pytest.mark.parametrize("family", UNET_FAMILIES)
@pytest.mark.parametrize("size", [(128, 64), (128, 128)], ids=["2x_area", "4x_area"])
def test_tiny_pipeline_dilates_in_exactly_the_configured_steps(family, size):
    steps = 8
    plain = generate(build(family), family, size, steps=steps)
    pipe = build(family)
    seen, on_step_end = _record_dilations(pipe)
    before = [(m, sorted(m.__dict__)) for m in pipe.unet.modules()]
    hires.apply(pipe, _config(noise_damped_guidance=False))
    out = generate(pipe, family, size, steps=steps, callback_on_step_end=on_step_end)
    plan = hires.last_call(pipe).notes["log.redilation.plan"]
    expected_tau = sum(1 for i in range(steps) if i / steps < preset_for(
        family, size[0] * size[1] / 64**2, max(size) / min(size)).stop_fraction)
    assert plan["active_steps"] == expected_tau > 0 and plan["dilations"]
    dilated = [(s, n) for s, n, d, _ in seen if d > 1]
    # each configured conv runs dilated once per step (one batched CFG call) in steps < tau, none after
    assert sorted(dilated) == sorted((s, n) for s in range(expected_tau) for n in plan["dilations"])
    assert all(d == 1 for s, _, d, _ in seen if s >= expected_tau)
    assert not torch.allclose(out, plain, atol=1e-3)

    hires.remove(pipe)
    assert all(sorted(m.__dict__) == keys for m, keys in before)  # no trace left on any module
    assert torch.equal(generate(pipe, family, size, steps=steps), plain)
    hires.apply(pipe, hires.HiresConfig(redilation=hires.RedilationConfig(enabled=False)))
    assert torch.equal(generate(pipe, family, size, steps=steps), plain)


def test_explicit_config_with_timestep_threshold_and_progressive_decay():
    family, steps = "sd15", 10
    pipe = build(family)
    seen, on_step_end = _record_dilations(pipe)
    hires.apply(pipe, _config(dilations={"mid_block": 4, "up_blocks.0.resnets.1.conv2": 3}, progressive=True,
                              min_timestep=400, noise_damped_guidance=False, dispersion_modules=()))
    generate(pipe, family, 128, steps=steps, callback_on_step_end=on_step_end)
    timesteps = pipe.scheduler.timesteps
    tau = int((timesteps >= 400).sum())
    per_step = {}
    for s, n, d, _ in seen:
        if n.startswith("mid_block") or n == "up_blocks.0.resnets.1.conv2":
            per_step.setdefault((s, n.split(".")[0]), set()).add(d)
    for s in range(steps):
        mid = dilation_for_step(4, s, tau, True)
        assert per_step[(s, "mid_block")] == {int(mid)}
        assert per_step[(s, "up_blocks")] == {int(dilation_for_step(3, s, tau, True))}
    assert per_step[(0, "mid_block")] == {4} and per_step[(tau - 1, "mid_block")] == {2}


def test_fractional_preset_runs_in_a_pipeline():
    family = "sd15"
    pipe = build(family)
    hires.apply(pipe, _config(noise_damped_guidance=False))
    generate(pipe, family, (128, 64), steps=4)  # 2x area: factors 2 * sqrt(1/2)
    factors = set(hires.last_call(pipe).notes["log.redilation.plan"]["dilations"].values())
    assert len(factors) == 1 and factors.pop() == pytest.approx(math.sqrt(2))


def test_lora_unet_is_dilated_with_its_effective_kernel():
    peft = pytest.importorskip("peft")
    family, size, steps = "sd15", 128, 4
    config = _config(dilations={"mid_block": 2, "down_blocks.1": 3}, stop_fraction=1.0, noise_damped_guidance=False,
                     dispersion_modules=("mid_block.resnets.0.conv1",), dispersion_stop_fraction=0.5)
    lora = peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                           target_modules=["conv1", "conv2", "conv"])

    torch.manual_seed(1)
    with_lora = build(family)
    with_lora.unet.add_adapter(lora)
    wrapped = dilatable_convs(with_lora.unet)["mid_block.resnets.0.conv1"]
    assert hasattr(wrapped, "base_layer")  # the hook sits on peft's wrapper
    no_lora_plain = generate(build(family), family, size, steps=steps)
    hires.apply(with_lora, config)
    lora_out = generate(with_lora, family, size, steps=steps)
    assert hires.last_call(with_lora).notes["log.redilation.dispersed_convs_per_step"] == {0: 1, 1: 1}

    # the same adapter merged into the weights: one plain conv per layer with the effective kernel
    torch.manual_seed(1)
    merged = build(family)
    merged.unet.add_adapter(lora)
    merged.unet.load_state_dict(with_lora.unet.state_dict())
    for module in merged.unet.modules():
        if hasattr(module, "merge") and hasattr(module, "base_layer"):
            module.merge()
    hires.apply(merged, config)
    assert torch.allclose(generate(merged, family, size, steps=steps), lora_out, atol=1e-4)
    assert not torch.allclose(lora_out, no_lora_plain, atol=1e-3)


def test_loading_a_lora_after_apply_is_reported_not_silently_half_dilated():
    peft = pytest.importorskip("peft")
    pipe = build("sd15")
    hires.apply(pipe, _config(dilations={"mid_block": 2}, noise_damped_guidance=False))
    pipe.unet.add_adapter(peft.LoraConfig(r=2, target_modules=["conv1"]))
    with pytest.raises(RuntimeError, match="call hires.apply"):
        generate(pipe, "sd15", 128)


@pytest.mark.parametrize("order", ["offload_then_apply", "apply_then_offload"])
def test_model_cpu_offload(order):
    family, size, config = "sd15", 128, _config(noise_damped_guidance=True)
    reference = build(family)
    hires.apply(reference, config)
    expected = generate(reference, family, size, steps=3)
    assert hires.last_call(reference).notes["log.redilation.ndcfg_steps"]
    plain = generate(build(family), family, size, steps=3)
    pipe = build(family)
    if order == "offload_then_apply":
        pipe.enable_model_cpu_offload(device="cpu")
        hires.apply(pipe, config)
    else:
        hires.apply(pipe, config)
        pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(generate(pipe, family, size, steps=3), expected)
    hires.remove(pipe)
    assert torch.equal(generate(pipe, family, size, steps=3), plain)


# -- noise-damped guidance -----------------------------------------------------------------------

def _first_step_outputs(pipe, family, size, **kwargs):
    """The UNet outputs the pipeline combines at step 0 (after every hires hook)."""
    captured = []
    handle = pipe.unet.register_forward_hook(lambda m, a, k, out: captured.append(out[0].detach().clone()),
                                             with_kwargs=True)
    generate(pipe, family, size, steps=4, **kwargs)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("family", UNET_FAMILIES)
def test_noise_damped_guidance_is_weak_uncond_plus_w_strong_difference(family):
    size, w = 128, 5.0
    strong = {"mid_block": 3, "up_blocks.0": 2}
    weak = {"mid_block": 2}
    common = dict(dilations=strong, stop_fraction=1.0, progressive=False, dispersion_modules=())
    pipe = build(family)
    hires.apply(pipe, _config(noise_damped_guidance=True, ndcfg_dilations=weak, ndcfg_stop_fraction=0.5, **common))
    returned = _first_step_outputs(pipe, family, size)
    guided = returned[:1] + w * (returned[1:] - returned[:1])  # what the pipeline computes from it
    assert hires.last_call(pipe).notes["log.redilation.ndcfg_steps"] == [0, 1]

    strong_pipe = build(family)
    hires.apply(strong_pipe, _config(noise_damped_guidance=False, **common))
    strong_pair = _first_step_outputs(strong_pipe, family, size)
    weak_pipe = build(family)
    hires.apply(weak_pipe, _config(noise_damped_guidance=False, **{**common, "dilations": weak}))
    weak_uncond = _first_step_outputs(weak_pipe, family, size)[:1]
    expected = weak_uncond + w * (strong_pair[1:] - strong_pair[:1])
    assert torch.allclose(guided, expected, atol=1e-4)
    assert not torch.allclose(guided, strong_pair[:1] + w * (strong_pair[1:] - strong_pair[:1]), atol=1e-3)


def test_noise_damped_guidance_without_cfg_is_an_error_at_call_time():
    pipe = build("sd15")
    hires.apply(pipe, _config(noise_damped_guidance=True))  # fine: CFG is known per call
    with pytest.raises(ValueError,
                       match=r"noise_damped_guidance=True needs classifier-free guidance.*guidance_scale=1"):
        generate(pipe, "sd15", 256, guidance_scale=1.0)
    generate(pipe, "sd15", 256, steps=2)  # the failed call left nothing behind: CFG calls work
    assert hires.last_call(pipe).notes["log.redilation.ndcfg_steps"]
    # the preset's NDCFG (not asked for) is skipped without CFG, and says so
    hires.apply(pipe, _config())
    generate(pipe, "sd15", 256, steps=2, guidance_scale=1.0)
    assert "log.redilation.ndcfg_skipped" in hires.last_call(pipe).notes


ROWS = {  # each switch on its own, as the testbed's rows use them (scripts/testbed_rows.py)
    "re-dilation (preset)": RedilationConfig(enabled=True, noise_damped_guidance=False, dispersion_modules=()),
    "re-dilation + dispersion (mid block)": RedilationConfig(
        enabled=True, noise_damped_guidance=False, dispersion_modules=("mid_block",)),
    "re-dilation + noise-damped guidance": RedilationConfig(enabled=True, noise_damped_guidance=True,
                                                            dispersion_modules=()),
    "ScaleCrafter preset (every switch from the preset)": RedilationConfig(enabled=True),
}


def test_switch_combinations_run_and_do_what_their_names_say():
    pipe = build("sd15")
    for name, config in ROWS.items():
        hires.apply(pipe, hires.HiresConfig(redilation=config))
        generate(pipe, "sd15", 128, steps=2)
        notes = hires.last_call(pipe).notes
        assert notes["log.redilation.dilated_convs_per_step"] or notes["log.redilation.dispersed_convs_per_step"]
        assert ("log.redilation.dispersed_convs_per_step" in notes) == ("dispersion" in name), name
        assert ("log.redilation.ndcfg_steps" in notes) == ("noise-damped" in name), name
    hires.remove(pipe)
