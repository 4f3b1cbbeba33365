"""Upscaling the user's own picture with a strength: through `generate(image=, strength=)`, through the
img2img / inpaint pipelines' own `image` and `strength`, and the steps a staged img2img call runs."""

import pytest
import torch
import torch.nn.functional as F

import hires
from hires.runtime import get_attachment
from hires.sampling import resize as resize_math
from hires.techniques.structure_guidance import guidance as progressive
from tiny_models import TEXT_LEN, build, generate

SG = hires.StructureGuidanceConfig
PICTURE = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
FLUX_ARGS = dict(guidance_scale=3.5, max_sequence_length=TEXT_LEN)


def _flux_img2img():
    from diffusers import FluxImg2ImgPipeline

    base = build("flux")
    pipe = FluxImg2ImgPipeline(**base.components)
    pipe.default_sample_size = base.default_sample_size
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _img2img(pipe, strength, size=128, steps=10, image=PICTURE, **extra):
    return pipe(prompt="a red circle", image=image, height=size, width=size, num_inference_steps=steps,
                strength=strength, output_type="pt", generator=torch.Generator().manual_seed(0), **FLUX_ARGS,
                **extra).images


class _Trace:
    """The timesteps the denoiser was called at, and how many calls really ran the model."""

    def __init__(self, transformer):
        self.timesteps, self.runs = [], 0
        self.handles = [
            transformer.register_forward_pre_hook(
                lambda m, a, k: self.timesteps.append(float(k["timestep"].flatten()[0])), with_kwargs=True),
            transformer.x_embedder.register_forward_hook(lambda m, a, o: setattr(self, "runs", self.runs + 1)),
        ]

    def clear(self):
        self.timesteps, self.runs = [], 0

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("strength", [0.5, 0.7])
def test_a_staged_img2img_call_runs_the_steps_its_stages_planned(strength):
    # Before: the pipeline's strength sliced each stage's schedule again (0.5 ran a stage one step below
    # the noise level of its start) and left the user's own call 0 steps, which FluxImg2ImgPipeline refuses.
    pipe = _flux_img2img()
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=True)))
    trace = _Trace(pipe.transformer)
    out = _img2img(pipe, strength)
    trace.remove()
    (stage,) = progressive.last_run(pipe)  # the picture is the origin: one stage, 64 -> 128
    planned = round(10 * strength)
    assert out.shape == (1, 3, 128, 128) and (stage.height, stage.steps) == (128, planned)
    assert trace.runs == planned  # the user's call adds a step that does not run the model
    # the loop runs the schedule the stage shaped, from its first timestep: the one its start was noised to
    assert [t * 1000 for t in trace.timesteps[:planned]] == pytest.approx(list(stage.timesteps))


def test_strength_zero_is_the_upscaled_picture_through_the_vae_and_one_the_whole_schedule():
    pipe = build("sd15")
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=True, sharpen_alpha=0, anti_ringing=False)))
    calls = []
    handle = pipe.unet.conv_in.register_forward_hook(lambda m, a, o: calls.append(1))
    out = progressive.generate(pipe, "a red circle", 128, 128, image=PICTURE, strength=0, num_inference_steps=6,
                               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert calls == [] and [r.steps for r in progressive.last_run(pipe)] == [0]
    assert hires.last_call(pipe) is None  # no denoiser step ran: nothing of an earlier call is reported
    # independently: bicubic 2x of the picture in [-1, 1], the VAE's mean latent, decoded
    up = F.interpolate(PICTURE * 2 - 1, size=(128, 128), mode="bicubic", align_corners=False).clamp(-1, 1)
    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(up).latent_dist.mean).sample
    torch.testing.assert_close(out, (decoded / 2 + 0.5).clamp(0, 1), atol=2e-3, rtol=0)

    # at 4x with the default upscale (sharpening, anti-ringing clamp): one upscale straight to the request, unsharpened
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=True)))
    progressive.generate(pipe, "a red circle", 128, 128, image=PICTURE, strength=0.5, num_inference_steps=6,
                         generator=torch.Generator().manual_seed(0), output_type="pt")
    assert hires.last_call(pipe).completed and calls
    calls.clear()
    out = progressive.generate(pipe, "a red circle", 256, 256, image=PICTURE, strength=0, num_inference_steps=6,
                               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert calls == []
    assert [(r.height, r.steps, r.sharpen_sigma) for r in progressive.last_run(pipe)] == [(256, 0, None)]
    assert hires.last_call(pipe) is None  # the strength-0.5 call before it is not reported as this one
    x = PICTURE * 2 - 1
    up = resize_math.clamp_to_source_range(resize_math.resize(x, (256, 256), "bicubic"), x).clamp(-1, 1)
    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(up).latent_dist.mean).sample
    torch.testing.assert_close(out, (decoded / 2 + 0.5).clamp(0, 1), atol=2e-3, rtol=0)

    progressive.generate(pipe, "a red circle", 256, 256, image=PICTURE, strength=1, num_inference_steps=6,
                         generator=torch.Generator().manual_seed(0), output_type="pt")
    handle.remove()
    assert [(r.height, r.steps) for r in progressive.last_run(pipe)] == [(128, 6), (192, 6), (256, 6)]  # every stage
    pipe.scheduler.set_timesteps(6)
    assert progressive.last_run(pipe)[0].timesteps == tuple(float(t) for t in pipe.scheduler.timesteps)


def test_strength_is_exact_even_at_few_steps_and_without_it_the_stages_keep_their_renoise():
    pipe = build("sd15")
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=True)))

    def steps(**extra):
        progressive.generate(pipe, "a red circle", 128, 128, image=PICTURE, num_inference_steps=4,
                             generator=torch.Generator().manual_seed(0), **extra)
        return [r.steps for r in progressive.last_run(pipe)]

    assert steps(strength=0.25) == [1]  # no few-step floor of half the schedule
    assert steps() == [2]  # renoise's default, raised to half of a few-step schedule
    assert steps(strength=0.75) == [3]


@pytest.mark.parametrize("strength", [-0.1, 1.5, "0.3", True, float("nan")])
def test_a_bad_strength_is_refused_before_any_work(strength):
    pipe = build("sd15")
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=True)))
    with pytest.raises(ValueError, match=r"strength=.* must be a number from 0"):
        progressive.generate(pipe, "a red circle", 128, 128, image=PICTURE, strength=strength)
    assert progressive.last_run(pipe) is None


def test_an_img2img_call_with_a_nan_strength_is_refused_before_its_stages():
    pipe = _flux_img2img()  # FluxImg2ImgPipeline's own check (strength < 0 or > 1) lets NaN through
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=True)))
    with pytest.raises(ValueError, match="strength=nan must be a number from 0"):
        _img2img(pipe, float("nan"))
    assert progressive.last_run(pipe) is None


def test_strength_without_a_picture_is_refused():
    pipe = build("sd15")
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=True)))
    with pytest.raises(ValueError, match="strength=0.3 needs image="):
        progressive.generate(pipe, "a red circle", 128, 128, strength=0.3)


def test_generate_passes_an_img2img_pipelines_picture_and_strength_to_its_own_call():
    pipe = _flux_img2img()
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=True)))
    direct = _img2img(pipe, 0.5)
    through = progressive.generate(pipe, "a red circle", 128, 128, image=PICTURE, strength=0.5, num_inference_steps=10,
                                   output_type="pt", generator=torch.Generator().manual_seed(0), **FLUX_ARGS).images
    assert torch.equal(direct, through)


def test_strength_changes_the_upscale_and_removal_gives_plain_img2img_back():
    pipe = _flux_img2img()
    plain = _img2img(pipe, 0.6)
    plain_small = _img2img(pipe, 0.6, size=64)
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=True)))
    low, high = _img2img(pipe, 0.2), _img2img(pipe, 0.9)
    assert not torch.equal(low, high) and not torch.equal(low, plain)
    # the closer to 0, the closer to the upscaled picture
    up = F.interpolate(PICTURE, size=(128, 128), mode="bicubic", align_corners=False)
    assert (low - up).abs().mean() < (high - up).abs().mean()
    # an image at least as large as the request is no upscale: a plain img2img call
    assert torch.equal(_img2img(pipe, 0.6, size=64), plain_small)
    hires.remove(pipe)
    assert torch.equal(_img2img(pipe, 0.6), plain)


def test_an_img2img_call_after_a_staged_one_runs_its_own_schedule():
    pipe = _flux_img2img()
    hires.apply(pipe, hires.HiresConfig(structure_guidance=SG(enabled=True)))
    _img2img(pipe, 0.5)
    trace = _Trace(pipe.transformer)
    _img2img(pipe, 0.5, size=64)  # plain: its own strength slices its own schedule
    trace.remove()
    assert trace.runs == 5 and len(trace.timesteps) == 5
    # the pass-through of the staged call's own step was taken out when that call ended
    assert "forward" not in [e.name for e in get_attachment(pipe)._shadows if e.owner is pipe.transformer]


# -- hires generate --image --strength ------------------------------------------------------------------
def _picture_file(path, width=96, height=64):
    from PIL import Image

    rng = torch.Generator().manual_seed(4)
    pixels = (torch.rand(height, width, 3, generator=rng) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def test_cli_strength_upscales_the_picture_as_the_api_does(tmp_path):
    import json

    import numpy as np
    from diffusers import DiffusionPipeline
    from PIL import Image

    from hires.cli import DEFAULT_MODEL, main

    source = _picture_file(tmp_path / "in.png")
    out = tmp_path / "up.png"
    assert main(["generate", "--prompt", "a red circle", "--image", str(source), "--strength", "0.3", "--scale", "2",
                 "--steps", "4", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    png = Image.open(out)
    assert png.size == (192, 128)  # --scale is a factor of the picture's 96x64, not of the model's base
    record = json.loads(png.text["hires"])
    assert record["strength"] == 0.3 and record["request"]["strength"] == 0.3
    pipe = DiffusionPipeline.from_pretrained(str(DEFAULT_MODEL))
    pipe.set_progress_bar_config(disable=True)
    hires.apply(pipe, hires.HiresConfig.from_dict(record["request"]["config"]))
    api = progressive.generate(pipe, "a red circle", 128, 192, image=Image.open(source), strength=0.3,
                               num_inference_steps=4, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert {r.steps for r in progressive.last_run(pipe)} == {1}  # 0.3 of 4 steps, exactly, in every stage
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(api))


def test_cli_refuses_a_bad_strength_and_a_strength_without_a_picture(tmp_path, capsys):
    from hires.cli import main

    source = _picture_file(tmp_path / "in.png")
    out = str(tmp_path / "up.png")
    for value, shown in (("1.5", "1.5"), ("-0.2", "-0.2"), ("half", "'half'"), ("nan", "nan")):
        assert main(["generate", "--prompt", "x", "--image", str(source), "--strength", value, "--out", out,
                     "--quiet"]) == 2
        assert f"--strength={shown} must be a number from 0" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--strength", "0.3", "--out", out, "--quiet"]) == 2
    assert "--strength 0.3 needs --image" in capsys.readouterr().err
    assert not (tmp_path / "up.png").exists()


def test_cli_dry_run_shows_the_steps_a_strength_leaves(tmp_path, capsys):
    from hires.cli import main

    source = _picture_file(tmp_path / "in.png", 64, 64)
    for strength, steps in (("0", "0 steps"), ("0.5", "10 steps"), ("1", "20 steps")):
        assert main(["generate", "--prompt", "x", "--image", str(source), "--strength", strength, "--size", "128x128",
                     "--dry-run", "--out", str(tmp_path / "up.png")]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert "stage 0: 64x64, input image" in "\n".join(lines)
        assert any(line.startswith(f"stage 1: 128x128, {steps};") for line in lines), lines


# -- every family's img2img and inpaint variants ------------------------------------------------------
VARIANTS = [("sd3", "StableDiffusion3Img2ImgPipeline"), ("flux", "FluxImg2ImgPipeline"),
            ("chroma", "ChromaImg2ImgPipeline"),
            ("qwenimage", "QwenImageImg2ImgPipeline")]


def _variant(family: str, name: str):
    import diffusers

    base = build(family)
    pipe = getattr(diffusers, name)(**base.components)
    pipe.set_progress_bar_config(disable=True)
    if hasattr(base, "default_sample_size"):
        pipe.default_sample_size = base.default_sample_size
    return pipe


def _variant_call(pipe, family, size, strength, **extra):
    if "mask_image" in inspect_parameters(pipe):
        extra.setdefault("mask_image", torch.ones(1, 1, 64, 64))
    extra.setdefault("image", PICTURE)
    return generate(pipe, family, size, steps=10, strength=strength, **extra)


def inspect_parameters(pipe):
    import inspect

    return inspect.signature(type(pipe).__call__).parameters


@pytest.mark.parametrize("family, name", VARIANTS, ids=[n for _, n in VARIANTS])
def test_every_img2img_and_inpaint_variant_upscales_with_its_strength_under_the_preset(family, name):
    pipe = _variant(family, name)
    assert hires.model_info(pipe).name == family
    plain = _variant_call(pipe, family, 128, 0.5)
    hires.apply(pipe)  # the automatic preset: structure guidance's stages
    out = _variant_call(pipe, family, 128, 0.5)
    stages = progressive.last_run(pipe)
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all() and not torch.equal(out, plain)
    assert [(s.height, s.steps) for s in stages] == [(128, 5)]  # from the picture, half of 10 steps
    hires.remove(pipe)
    assert torch.equal(_variant_call(pipe, family, 128, 0.5), plain)


def test_zimage_img2img_takes_only_a_picture_of_its_size_so_it_upscales_through_generate():
    from tiny_models import CALL_KWARGS

    pipe = _variant("zimage", "ZImageImg2ImgPipeline")
    with pytest.raises(RuntimeError, match="must match"):  # diffusers' own call: the image must have the call's size
        _variant_call(pipe, "zimage", 128, 0.5)
    plain = _variant_call(pipe, "zimage", 128, 0.5, image=F.interpolate(PICTURE, size=(128, 128), mode="bicubic"))
    hires.apply(pipe)
    out = progressive.generate(pipe, "a red circle", 128, 128, image=PICTURE, strength=0.5, num_inference_steps=10,
                               generator=torch.Generator().manual_seed(0), output_type="pt",
                               **CALL_KWARGS["zimage"]).images
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()
    assert [(s.height, s.steps) for s in progressive.last_run(pipe)] == [(128, 5)]
    hires.remove(pipe)
    assert torch.equal(_variant_call(pipe, "zimage", 128, 0.5, image=F.interpolate(PICTURE, size=(128, 128),
                                                                                     mode="bicubic")), plain)


def test_the_klein_inpaint_pipeline_is_flux2_klein_and_renders_at_its_pictures_size():
    # Flux2KleinInpaintPipeline renders at its image's size (at most 1 MP) whatever height and width say, so
    # its calls are never an upscale: plain calls, the techniques that act at one size acting on them.
    pipe = _variant("flux2_klein", "Flux2KleinInpaintPipeline")
    assert hires.model_info(pipe).name == "flux2_klein"
    big = F.interpolate(PICTURE, size=(128, 128), mode="bilinear")
    plain = _variant_call(pipe, "flux2_klein", 128, 0.5, image=big, mask_image=torch.ones(1, 1, 128, 128))
    hires.apply(pipe, hires.HiresConfig(positions=hires.PositionConfig(enabled=True)))
    out = _variant_call(pipe, "flux2_klein", 128, 0.5, image=big, mask_image=torch.ones(1, 1, 128, 128))
    assert out.shape == (1, 3, 128, 128) and not torch.equal(out, plain) and progressive_run(pipe) is None
    hires.remove(pipe)
    assert torch.equal(_variant_call(pipe, "flux2_klein", 128, 0.5, image=big, mask_image=torch.ones(1, 1, 128, 128)),
                       plain)


def progressive_run(pipe):
    engine = get_attachment(pipe).stages
    return None if engine is None else engine.last_run


def test_the_kv_cached_klein_and_the_chroma_inpaint_pipelines_are_refused_with_their_reasons():
    from diffusers import ChromaInpaintPipeline, Flux2KleinKVPipeline

    base = build("flux2_klein")
    pipe = Flux2KleinKVPipeline(**{k: v for k, v in base.components.items() if k != "is_distilled"})
    with pytest.raises(TypeError, match="Flux2KleinKVPipeline is not supported by hires: its __init__ replaces"):
        hires.apply(pipe)
    pipe = ChromaInpaintPipeline(**build("chroma").components)
    with pytest.raises(AttributeError, match="guidance_embeds"):  # the reason: its own call fails
        generate(pipe, "chroma", 64, image=PICTURE, mask_image=torch.ones(1, 1, 64, 64), strength=0.5)
    with pytest.raises(TypeError, match="ChromaInpaintPipeline is not supported by hires: in diffusers 0.42.1"):
        hires.apply(pipe)


# -- hires batch: "image" and "strength" per item ------------------------------------------------------
def test_batch_items_upscale_their_picture_with_their_strength_as_generate_does(tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from hires.cli import main

    _picture_file(tmp_path / "in.png", 64, 64)
    lines = [{"prompt": "a red circle", "image": "in.png", "strength": 0.3, "seed": 3, "size": "128x128"},
             {"prompt": "a red circle", "image": "in.png", "strength": 0, "seed": 3, "size": "128x128",
              "name": "zero"}]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--steps", "4", "--quiet"]) == 0
    first = out / "00000-a-red-circle.png"
    record = json.loads(Image.open(first).text["hires"])
    assert record["strength"] == 0.3 and record["request"]["image"] is not None
    single = tmp_path / "single.png"
    assert main(["generate", "--prompt", "a red circle", "--image", str(tmp_path / "in.png"), "--strength", "0.3",
                 "--seed", "3", "--size", "128x128", "--steps", "4", "--out", str(single), "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(single)))
    assert json.loads(Image.open(single).text["hires"])["key"] == record["key"]
    assert not np.array_equal(np.asarray(Image.open(out / "zero.png")), np.asarray(Image.open(first)))
    # a rerun finds both done: the picture's digest and the strength are part of each key
    assert main(["batch", str(prompts), "--out", str(out), "--steps", "4"]) == 0
    assert "rendered 0 here" in capsys.readouterr().out


@pytest.mark.parametrize("line, message", [
    ({"prompt": "x", "image": "in.png", "strength": 1.5}, "p.jsonl:2: strength=1.5 must be a number from 0"),
    ({"prompt": "x", "strength": 0.3}, "p.jsonl:2: strength=0.3 needs an 'image' in the same item"),
    ({"prompt": "x", "image": "missing.png"}, "p.jsonl:2: image '"),
    ({"prompt": "x", "image": 3}, "p.jsonl:2: image=3 must be a picture's path"),
])
def test_batch_refuses_a_bad_picture_or_strength_before_the_first_render(tmp_path, capsys, line, message):
    import json

    from hires.cli import main

    _picture_file(tmp_path / "in.png", 64, 64)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle", "image": "in.png", "size": "128x128"}) + "\n"
                       + json.dumps(line))
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--steps", "2", "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not any(out.glob("*.png")) if out.exists() else True


def test_a_ready_pipeline_upscales_with_a_strength_as_an_applied_one_does():
    base = build("sd15")
    ready = hires.HiresStableDiffusionPipeline(**build("sd15").components)  # the same weights, its own modules
    ready.set_progress_bar_config(disable=True)
    config = hires.HiresConfig(structure_guidance=SG(enabled=True))

    def upscale(pipe, **extra):
        return progressive.generate(pipe, "a red circle", 128, 128, image=PICTURE, strength=0.3,
                                    num_inference_steps=6, generator=torch.Generator().manual_seed(0),
                                    output_type="pt", **extra).images

    with pytest.raises(ValueError, match="structure guidance is not applied"):
        upscale(ready)  # before its first call a ready pipeline has no config
    ready(prompt="a red circle", height=64, width=64, num_inference_steps=1, hires_config=config)
    first = upscale(ready)
    hires.apply(base, config)
    assert torch.equal(first, upscale(base))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_controlnet_img2img_keeps_its_steps_under_the_preset(family):
    # Before: SDXL's ControlNet img2img sliced a 3-step stage to 0 steps and returned an empty batch.
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionXLControlNetImg2ImgPipeline,
    )

    base = build(family)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    components = {k: v for k, v in base.components.items()
                  if k not in ("image_encoder", "feature_extractor", "safety_checker")}
    if family == "sdxl":
        pipe = StableDiffusionXLControlNetImg2ImgPipeline(**components, controlnet=controlnet)
    else:
        pipe = StableDiffusionControlNetImg2ImgPipeline(**components, controlnet=controlnet, safety_checker=None,
                                                        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    runs = []
    pipe.unet.conv_in.register_forward_hook(lambda m, a, o: runs.append(1))
    hires.apply(pipe)
    out = generate(pipe, family, 128, steps=10, image=PICTURE, control_image=control, strength=0.3)
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()
    assert [(s.height, s.steps) for s in progressive.last_run(pipe)] == [(128, 3)] and len(runs) == 3


def test_an_img2img_call_whose_stages_would_start_from_noise_is_refused():
    pipe = _flux_img2img()
    hires.apply(pipe, hires.HiresConfig(bottleneck=hires.BottleneckConfig(enabled=True)))
    with pytest.raises(ValueError, match="image= cannot be combined with bottleneck.* the picture would be lost"):
        _img2img(pipe, 0.5, image=F.interpolate(PICTURE, size=(128, 128), mode="bilinear"))
    assert get_attachment(pipe).stages.last_run is None
