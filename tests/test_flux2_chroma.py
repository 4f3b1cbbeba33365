"""Issue #19, families flux2 (Flux.2 [dev]), flux2_klein (Flux.2 [klein]) and chroma, on their tiny models:
facts read from their configs, bit-identity off / removed / at the base size, every applicable technique
at 2x (runs, changes the output, removed exactly), sizes the family cannot do, non-square sizes, and
the family-specific pieces (Flux.2's latent normalisation, 4-axis RoPE ids and empirical shift,
Chroma's masked attention in windows, Klein's true CFG)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import hires
from hires.sampling import latent_space, schedules
from hires.sampling.latents import unpack
from hires.techniques.entropy_scaling import scaling as E
from hires.techniques.window_attention import windows as W
from surface_support import technique_options, techniques_for
from tiny_models import build, generate

NEW_FAMILIES = ("flux2", "flux2_klein", "chroma")
SIZE = 128  # 2x the tiny models' 64 px base
EXACT_BY_DESIGN = ("vae_tiling", "memory", "attention_backend")  # equal to the plain computation up to rounding


def _config(family: str, technique: str) -> hires.HiresConfig | None:
    return None if technique == "preset" else hires.HiresConfig.from_dict(technique_options(family, technique))


@pytest.fixture(params=NEW_FAMILIES)
def new_family(request):
    return request.param


# -- facts ---------------------------------------------------------------------------------------------
def test_facts_are_read_from_the_configs(new_family):
    pipe = build(new_family)
    info = hires.model_info(pipe)
    assert info.name == new_family
    assert (info.base_height, info.base_width, info.latent_factor, info.patch_size) == (64, 64, 8, 2)
    assert info.prediction_type == "flow"
    pipe.default_sample_size = 16  # the base is the pipeline's own default size, not the family's name
    assert hires.model_info(pipe).base_height == 128


def test_guidance_layouts_follow_the_pipelines():
    from hires.families import FAMILIES

    by_name = {f.name: f for f in FAMILIES}
    assert by_name["flux2"].guidance_layout == "none"  # distilled guidance embedding, no CFG
    assert by_name["flux2_klein"].guidance_layout == by_name["chroma"].guidance_layout == "separate"
    assert build("flux2").transformer.config.guidance_embeds
    assert not build("flux2_klein").transformer.config.guidance_embeds


def test_img2img_variant_is_recognised():
    from diffusers import ChromaImg2ImgPipeline

    from hires.families import detect_family

    assert detect_family(ChromaImg2ImgPipeline(**build("chroma").components)).name == "chroma"


# -- bit-identity ----------------------------------------------------------------------------------------
def test_off_removed_and_the_automatic_preset_at_the_base_size_are_plain_diffusers(new_family):
    pipe = build(new_family)
    plain_base, plain_2x = generate(pipe, new_family, 64), generate(pipe, new_family, SIZE)
    hires.apply(pipe, hires.HiresConfig())
    assert torch.equal(generate(pipe, new_family, SIZE), plain_2x)
    hires.apply(pipe)  # the automatic preset: structure guidance, which acts only above the base size
    assert torch.equal(generate(pipe, new_family, 64), plain_base)
    assert not torch.equal(generate(pipe, new_family, SIZE), plain_2x)
    hires.remove(pipe)
    assert torch.equal(generate(pipe, new_family, SIZE), plain_2x)


@pytest.mark.parametrize("family, technique", [
    pytest.param(f, t, id=f"{f}-{t}") for f in NEW_FAMILIES for t in techniques_for(f) if t != "preset"])
def test_each_technique_at_2x_changes_the_output_and_is_removed_exactly(family, technique):
    pipe = build(family)
    plain = generate(pipe, family, SIZE)
    hires.apply(pipe, _config(family, technique))
    out = generate(pipe, family, SIZE)
    if technique in EXACT_BY_DESIGN:
        assert torch.allclose(out, plain, atol=1e-5)
    else:
        assert not torch.equal(out, plain), technique
    hires.remove(pipe)
    assert torch.equal(generate(pipe, family, SIZE), plain)


def test_apg_on_flux2_dev_is_refused_when_applied():
    with pytest.raises(ValueError, match=r"APGConfig.*'flux2' never runs CFG.*guidance_scale"):
        hires.apply(build("flux2"), hires.HiresConfig(apg=hires.APGConfig(enabled=True)))


@pytest.mark.parametrize("family", ["flux2_klein", "chroma"])
def test_apg_without_cfg_names_the_scale(family):
    pipe = hires.apply(build(family), hires.HiresConfig(apg=hires.APGConfig(enabled=True)))
    with pytest.raises(ValueError, match=r"APGConfig needs classifier-free guidance.*guidance_scale=1\.0"):
        generate(pipe, family, SIZE, guidance_scale=1.0)


# -- sizes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, message", [
    ((64, 72), r"width=72 is not a multiple of 16.*{family}.*use 64 or 80"),
    ((88, 64), r"height=88 is not a multiple of 16.*{family}.*use 80 or 96"),
])
def test_sizes_the_family_cannot_do_name_its_multiple(new_family, size, message):
    pipe = hires.apply(build(new_family), hires.HiresConfig())
    with pytest.raises(ValueError, match=message.format(family=new_family)):
        generate(pipe, new_family, size)


@pytest.mark.parametrize("size", [(64, 128), (192, 64)], ids=["2to1", "1to3"])
@pytest.mark.parametrize("technique", ["preset", "positions", "window_attention", "bottleneck"])
def test_non_square_sizes(new_family, technique, size):
    pipe = build(new_family)
    plain = generate(pipe, new_family, size)
    config = _config(new_family, technique)
    hires.apply(pipe) if config is None else hires.apply(pipe, config)
    out = generate(pipe, new_family, size)
    assert out.shape == plain.shape == (1, 3, *size)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    record = hires.last_call(pipe)
    assert (record.height, record.width) == size and record.completed


def pipe_convention(pipe):
    return hires.model_info(pipe).family.layout


# -- Flux.2's latent normalisation ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux2", "flux2_klein"])
def test_latent_space_is_what_the_pipeline_decodes(family):
    """to_vae of the denoised latents equals what the pipeline hands its VAE (its batch-norm statistics
    undone on 2x2 patches); from_vae inverts it."""
    pipe = build(family)
    decoded = []
    original = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: (decoded.append(z.clone()), original(z, *a, **k))[1]
    final = []

    def keep(p, step, timestep, kwargs):
        final.append(kwargs["latents"].clone())
        return {}

    generate(pipe, family, 64, steps=2, callback_on_step_end=keep)
    del pipe.vae.decode
    z = unpack(final[-1], 8, 8, 2)  # the denoiser's latents on the 8x8 latent grid
    torch.testing.assert_close(latent_space.to_vae(pipe_convention(pipe), pipe.vae, z),
                               decoded[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent_space.from_vae(pipe_convention(pipe), pipe.vae, decoded[0]),
                               z, rtol=1e-4, atol=1e-5)
    # independently: channel 4c + 2i + j of the patchified latent is pixel (2y + i, 2x + j) of channel c
    bn = pipe.vae.bn
    mean, std = bn.running_mean, torch.sqrt(bn.running_var + pipe.vae.config.batch_norm_eps)
    c, i, j, y, x = 1, 1, 0, 2, 3
    k = 4 * c + 2 * i + j
    assert math.isclose(float(decoded[0][0, c, 2 * y + i, 2 * x + j]),
                        float(z[0, c, 2 * y + i, 2 * x + j] * std[k] + mean[k]),
                        rel_tol=1e-5, abs_tol=1e-6)


def test_latent_space_of_chroma_is_scale_and_shift():
    pipe = build("chroma")
    vae = pipe.vae
    z = torch.randn(1, 4, 8, 8)
    expected = z / vae.config.scaling_factor + vae.config.shift_factor
    torch.testing.assert_close(latent_space.to_vae(pipe_convention(pipe), vae, z), expected)
    torch.testing.assert_close(latent_space.from_vae(pipe_convention(pipe), vae, expected), z)


# -- Flux.2's shift and positions ------------------------------------------------------------------------------
def test_flux2_empirical_mu_against_its_two_fitted_lines():
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    def independent(n, steps):  # mu(n, 10) and mu(n, 200) on two lines in n; linear in steps between
        low, high = 8.73809524e-05 * n + 1.89833333, 0.00016927 * n + 0.45666666
        return high if n > 4300 else low + (high - low) * (steps - 10) / 190

    for n in (16, 256, 4096, 4300, 4301, 65536):
        for steps in (3, 10, 28, 50, 200):
            assert math.isclose(schedules.flux2_empirical_mu(n, steps), independent(n, steps), rel_tol=1e-9)
            assert math.isclose(schedules.flux2_empirical_mu(n, steps), compute_empirical_mu(n, steps), rel_tol=1e-9)


@pytest.mark.parametrize("family", ["flux2", "flux2_klein"])
def test_clamped_shift_uses_flux2s_rule_at_the_base_token_count(family):
    pipe = hires.apply(build(family), hires.HiresConfig(positions=hires.PositionConfig(enabled=True)))
    generate(pipe, family, SIZE, steps=3)
    decision = hires.last_call(pipe).notes["log.positions.timestep_shift"]
    assert decision["mu"] == pytest.approx(schedules.flux2_empirical_mu(64, 3))
    assert decision["applied_mu"] == pytest.approx(min(decision["mu"], schedules.flux2_empirical_mu(16, 3)))
    assert decision["applied_mu"] < decision["mu"]


def test_flux2_rope_rescales_only_the_row_and_column_axes():
    pipe = hires.apply(build("flux2"), hires.HiresConfig(positions=hires.PositionConfig(enabled=True)))
    generate(pipe, "flux2", (SIZE, 3 * 64), steps=1)
    method, used = hires.last_call(pipe).notes["log.positions.rope"]
    assert method == "yarn"
    assert [(axis, scale) for axis, scale, _ in used] == [(1, 2.0), (2, 3.0)]


def test_flux2_reference_image_tokens_are_not_counted_as_the_image():
    """Flux.2's reference images add tokens (time id 10) after the image: the call's size comes from the
    image's own ids, and windows keep the image tokens where they are."""
    from PIL import Image

    pipe = hires.apply(build("flux2"), hires.HiresConfig(window_attention=hires.WindowAttentionConfig(enabled=True)))
    reference = Image.new("RGB", (64, 64), (200, 30, 30))
    out = generate(pipe, "flux2", SIZE, image=reference)
    record = hires.last_call(pipe)
    assert out.shape == (1, 3, SIZE, SIZE) and (record.height, record.width) == (SIZE, SIZE)
    windows = record.notes[W.LOG_WINDOWS]
    assert all(w["grid"] == (8, 8) and w["windows"] == 4 for w in windows.values()), windows


# -- windows with an attention mask (Chroma) ---------------------------------------------------------------------
def test_windowed_attention_with_a_mask_against_one_masked_attention():
    """Windows plus a padding mask equal one attention whose mask is the window pattern AND the given mask."""
    torch.manual_seed(0)
    text, rows, cols, window = 3, 4, 6, (2, 3)
    tokens = text + rows * cols
    q, k, v = (torch.randn(2, 2, tokens, 8) for _ in range(3))
    keep = torch.ones(2, tokens, dtype=torch.bool)
    keep[0, 2] = False  # a padded text token in the first sample
    pad = keep[:, None, None, :] & keep[:, None, :, None]
    additive = torch.zeros(2, 1, tokens, tokens).masked_fill(~pad, float("-inf"))
    offset = (1, 2)

    # the window of each image token, after rolling the grid by -offset
    r = (torch.arange(rows)[:, None] - offset[0]) % rows
    c = (torch.arange(cols)[None, :] - offset[1]) % cols
    window_id = torch.full((tokens,), -1)
    window_id[text:] = ((r // window[0]) * (cols // window[1]) + c // window[1]).flatten()
    is_text = window_id < 0
    allowed = is_text[:, None] | is_text[None, :] | (window_id[:, None] == window_id[None, :])
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=additive.masked_fill(~allowed, float("-inf")))

    got = W.windowed_attention(q, k, v, (rows, cols), window, offset, image_start=text, attn_mask=additive)
    rows_ok = keep[:, :, None].expand(-1, -1, 8)[:, None].expand(-1, 2, -1, -1)  # padded query rows are NaN in both
    torch.testing.assert_close(got[rows_ok], expected[rows_ok], rtol=1e-5, atol=1e-5)
    boolean = W.windowed_attention(q, k, v, (rows, cols), window, offset, image_start=text, attn_mask=pad)
    torch.testing.assert_close(boolean[rows_ok], expected[rows_ok], rtol=1e-5, atol=1e-5)



def test_structure_guidance_stages_keep_flux2s_own_base_shift(monkeypatch):
    """Each later stage's mu is capped at the mu Flux2Pipeline itself uses at the base size (its
    empirical rule, not the scheduler config's linear one)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    seen = []
    original = FlowMatchEulerDiscreteScheduler.set_timesteps

    @functools.wraps(original)  # diffusers reads its signature for `sigmas`
    def record(self, *args, **kwargs):
        seen.append(kwargs.get("mu"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "set_timesteps", record)
    pipe = hires.apply(build("flux2"),
                       hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True)))
    generate(pipe, "flux2", SIZE, steps=3)
    base_mu = schedules.flux2_empirical_mu(16, 3)
    assert schedules.flux2_empirical_mu(64, 3) > base_mu  # so the 2x stage is capped
    assert [mu for mu in seen if mu is not None][:2] == pytest.approx([base_mu, base_mu])
    assert base_mu != pytest.approx(schedules.scheduler_shift_mu(pipe.scheduler.config, 16))


def test_chroma_img2img_runs_a_technique_and_is_plain_after_remove():
    from diffusers import ChromaImg2ImgPipeline

    pipe = ChromaImg2ImgPipeline(**build("chroma").components)
    pipe.set_progress_bar_config(disable=True)
    pipe.default_sample_size = 8
    image = torch.rand(1, 3, SIZE, SIZE)
    plain = generate(pipe, "chroma", SIZE, image=image, strength=0.7)
    hires.apply(pipe, hires.HiresConfig(entropy_scaling=hires.EntropyScalingConfig(enabled=True)))
    assert not torch.equal(generate(pipe, "chroma", SIZE, image=image, strength=0.7), plain)
    assert any(f > 1 for f in hires.last_call(pipe).notes[E.LOG_FACTORS].values())
    hires.remove(pipe)
    assert torch.equal(generate(pipe, "chroma", SIZE, image=image, strength=0.7), plain)
