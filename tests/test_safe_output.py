"""No wrong image is ever returned or saved as done (Python API half; the command line's
half is tests/test_cli_safe_output.py)."""

import re

import pytest
import torch

import hires
from hires import guards
from tiny_models import build, generate

FAMILIES = ("sd15", "flux")
# A finite value each family's call turns into NaN (Flux's guidance_scale is an embedding input; its true
# CFG scales the prediction itself).
OVERFLOWING = {"sd15": ("guidance_scale", 1e308, {}),
               "flux": ("true_cfg_scale", 1e308, {"negative_prompt": "a blue square"})}
DENOISER_BIAS = {"sd15": ("unet", "conv_out.bias"), "flux": ("transformer", "proj_out.bias")}


def _poison(module, name, value):
    with torch.no_grad():
        module.get_parameter(name).view(-1)[0] = value


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("surface", ["apply", "preset", "ready"])
def test_an_overflowing_guidance_raises_naming_it(family, surface):
    name, value, extra = OVERFLOWING[family]
    pipe = build(family)
    plain = generate(pipe, family, 64, steps=2, **{name: value}, **extra)
    assert not torch.isfinite(plain).all()  # what plain diffusers returns: NaN images
    if surface == "ready":
        ready = getattr(hires, {"sd15": "HiresStableDiffusionPipeline", "flux": "HiresFluxPipeline"}[family])
        pipe = ready.from_pipe(pipe)
        pipe.set_progress_bar_config(disable=True)
        extra = {**extra, "hires_config": hires.HiresConfig()}
    else:
        hires.apply(pipe, hires.HiresConfig() if surface == "apply" else None)
    for output_type in ("pt", "pil"):
        expected = rf"non-finite latents.*likely cause: {name}={re.escape(repr(value))} .*pass a finite {name}"
        with pytest.raises(guards.NonFiniteOutputError, match=expected) as info:
            generate(pipe, family, 64, steps=2, output_type=output_type, **{name: value}, **extra)
        assert (info.value.stage, info.value.kind, info.value.parameter) == ("latents", "guidance", name)
    assert hires.last_call(pipe).completed is False


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_damaged_denoiser_weights_are_named(family, value):
    pipe = build(family)
    component, tensor = DENOISER_BIAS[family]
    _poison(getattr(pipe, component), tensor, value)
    hires.apply(pipe, hires.HiresConfig())
    with pytest.raises(guards.NonFiniteOutputError, match=rf"weights of {component} hold NaN or infinity "
                                                          rf"\({component}\.{tensor}\).*re-download") as info:
        generate(pipe, family, 64, steps=2)
    assert (info.value.kind, info.value.component, info.value.tensor) == ("weights", component, tensor)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_vae_that_decodes_to_nan_is_caught_before_the_image_is_made(family):
    pipe = build(family)
    _poison(pipe.vae, "decoder.conv_out.bias", float("nan"))
    hires.apply(pipe, hires.HiresConfig())
    for output_type in ("pil", "np"):
        with pytest.raises(guards.NonFiniteOutputError, match=r"decoded image holds non-finite values.*"
                                                              r"weights of vae .*decoder\.conv_out\.bias") as info:
            generate(pipe, family, 64, steps=2, output_type=output_type)
        assert info.value.stage == "image"
    latents = generate(pipe, family, 64, steps=2, output_type="latent")  # no decode: nothing wrong returned
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_guidance_is_refused_before_any_work(family, value):
    # diffusers compares guidance_scale > 1: NaN silently turns classifier-free guidance off
    pipe = build(family)
    hires.apply(pipe, hires.HiresConfig())
    calls = []
    getattr(pipe, DENOISER_BIAS[family][0]).register_forward_pre_hook(lambda *a: calls.append(1))
    for name in ("guidance_scale", "true_cfg_scale") if family == "flux" else ("guidance_scale",):
        with pytest.raises(ValueError, match=rf"{name}={value!r} must be a finite number"):
            generate(pipe, family, 64, steps=1, **{name: value})
    assert calls == []


@pytest.mark.parametrize("family", FAMILIES)
def test_finite_calls_stay_bit_identical_and_cost_one_check_each(family, monkeypatch):
    pipe = build(family)
    plain = generate(pipe, family, 64, steps=3)
    hires.apply(pipe, hires.HiresConfig())
    checked = []
    original = guards._finite
    monkeypatch.setattr(guards, "_finite", lambda t: checked.append(t.shape) or original(t))
    assert torch.equal(generate(pipe, family, 64, steps=3), plain)
    three = list(checked)
    checked.clear()
    generate(pipe, family, 64, steps=1)
    assert len(three) == len(checked) == 2  # the final latents and the decoded image, whatever the steps
    hires.remove(pipe)
    assert "postprocess" not in vars(pipe.image_processor)
    assert torch.equal(generate(pipe, family, 64, steps=3), plain)


def test_remove_and_last_call_name_a_wrong_argument():
    with pytest.raises(TypeError, match=r"hires.remove\(pipe=42\): pipe must be a diffusers pipeline.*not int"):
        hires.remove(42)
    with pytest.raises(TypeError, match=r"hires.last_call\(pipe=None\): pipe must be a diffusers pipeline"):
        hires.last_call(None)


def test_ready_pipelines_refuse_a_zero_size_by_name_or_position():
    pipe = hires.HiresStableDiffusionPipeline.from_pipe(build("sd15"))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"height=0 must be positive"):
        pipe("a red circle", 0, 64, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"width=0 must be positive"):
        pipe("a red circle", width=0, height=64, num_inference_steps=1)


def test_scalar_tensor_guidance_and_zero_steps_are_refused_by_name():
    pipe = hires.apply(build("sd15"), hires.HiresConfig())
    with pytest.raises(ValueError, match=r"guidance_scale=tensor\(nan\) must be a finite number"):
        generate(pipe, "sd15", 64, steps=1, guidance_scale=torch.tensor(float("nan")))
    with pytest.raises(ValueError, match=r"num_inference_steps=0 must be a whole number of steps >= 1"):
        generate(pipe, "sd15", 64, steps=0)  # plain diffusers: ZeroDivisionError


def test_non_finite_inputs_are_named_as_the_likely_cause():
    pipe = hires.apply(build("sd15"), hires.HiresConfig())
    expected = r"no guidance value or weight explains it; check latents="
    with pytest.raises(guards.NonFiniteOutputError, match=expected) as info:
        generate(pipe, "sd15", 64, steps=2, latents=torch.full((1, 4, 8, 8), float("nan")))
    assert info.value.kind == "unknown"
    embeds = torch.zeros(1, 16, 32)
    with pytest.raises(guards.NonFiniteOutputError, match=r"the prompt embeddings are non-finite") as info:
        pipe(prompt_embeds=torch.full_like(embeds, float("nan")), negative_prompt_embeds=embeds, height=64, width=64,
             num_inference_steps=2, output_type="pt")
    assert info.value.kind == "inputs"


def test_a_float16_vae_overflow_is_named_with_its_remedy():
    pipe = build("sd15")
    with torch.no_grad():  # weights still finite in float16 whose activations overflow it (|x| > 65504)
        conv = pipe.vae.decoder.conv_in
        conv.weight.mul_(60000 / conv.weight.abs().max())
    pipe.to(torch.float16)
    assert guards.first_non_finite_weight(pipe) is None
    hires.apply(pipe, hires.HiresConfig())
    with pytest.raises(guards.NonFiniteOutputError, match=r"decoded image holds non-finite values.*float16 arithmetic "
                                                          r"overflowed; run the VAE in float32") as info:
        generate(pipe, "sd15", 64, steps=1, output_type="pil")
    assert (info.value.stage, info.value.kind) == ("image", "float16")
