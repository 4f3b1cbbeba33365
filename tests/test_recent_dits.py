"""Issue #19 for the Qwen-Image, Z-Image, ERNIE-Image, Krea-2 and HiDream-I1 families: every applicable technique at 2x
runs, changes the image and is removed exactly; non-square sizes; Qwen-Image's and Z-Image's RoPE
extrapolation against independent formulas; Qwen-Image's 3D VAE latent codec; Z-Image's tensor view of its
list-in, list-out transformer and its few-step, no-CFG (Turbo) use; the img2img and ControlNet variants."""

from __future__ import annotations

import math

import pytest
import torch

import hires
import tiny_models
from hires.config import HiresConfig, PositionConfig
from hires.families import detect_family
from hires.sampling import latent_space
from hires.techniques.structure_guidance import guidance as progressive
from surface_support import DITS, PRESET, call_arguments, plain_at, technique_options, techniques_for

NEW_FAMILIES = ("qwenimage", "zimage", "ernie_image", "krea2", "hidream", "qwenimage21")
# the default backend by name, the tiled VAE, the planner with room: the same computation up to rounding
EXACT_BY_DESIGN = ("attention_backend", "vae_tiling", "memory")
TRUE_CFG = {"true_cfg_scale": 4.0, "negative_prompt": "blue square"}


def _generate(pipe, family, size, technique=None, **extra):
    arguments = dict(call_arguments(family, technique or PRESET))
    arguments.update(extra)
    return tiny_models.generate(pipe, family, size, **arguments)


def _cases():
    return [pytest.param(f, t, id=f"{f}-{t}") for f in NEW_FAMILIES for t in techniques_for(f) if t != PRESET]


@pytest.mark.parametrize("family, technique", _cases())
def test_each_technique_at_2x_runs_changes_the_image_and_is_removed_exactly(family, technique):
    pipe = tiny_models.build(family)
    plain = _generate(pipe, family, 128, technique)
    # HiDream-I1's pipeline rescales the request to its base area; told its base is 128 px it denoises 128 px
    as_asked = _generate(plain_at(tiny_models.build(family), family, 128, 128), family, 128, technique)
    hires.apply(pipe, HiresConfig.from_dict(technique_options(family, technique)))
    changed = _generate(pipe, family, 128, technique)
    record = hires.last_call(pipe)
    assert record is not None and (record.height, record.width) == (128, 128) and record.completed
    if technique in EXACT_BY_DESIGN:
        torch.testing.assert_close(changed, as_asked, atol=1e-5, rtol=0)
    else:
        assert not torch.equal(changed, plain), technique
    hires.remove(pipe)
    assert torch.equal(_generate(pipe, family, 128, technique), plain)


def _non_square_cases():
    # with PositionConfig where it applies (ERNIE-Image and Krea-2 refuse it)
    return [pytest.param(f, p, id=f"{f}-preset{'+positions' if p else ''}")
            for f in NEW_FAMILIES for p in (False, True) if not p or f in DITS]


@pytest.mark.parametrize("family, positions", _non_square_cases())
@pytest.mark.parametrize("height, width", [(96, 192), (192, 64)], ids=["2:1", "1:3"])
def test_non_square_sizes_run(family, height, width, positions):
    pipe = tiny_models.build(family)
    plain = _generate(pipe, family, (height, width))
    config = hires.presets.AUTOMATIC[family]
    if positions:
        config = HiresConfig(structure_guidance=config.structure_guidance, positions=PositionConfig(enabled=True))
    hires.apply(pipe, config)
    image = _generate(pipe, family, (height, width))
    assert image.shape[-2:] == (height, width) and torch.isfinite(image).all()
    assert not torch.equal(image, plain)
    stages = progressive.last_run(pipe)
    assert stages is not None and (stages[-1].height, stages[-1].width) == (height, width)
    if positions:
        assert hires.last_call(pipe).notes["log.positions.rope"][1]  # the longer side was rescaled
    hires.remove(pipe)
    assert torch.equal(_generate(pipe, family, (height, width)), plain)


# -- Qwen-Image's centred RoPE ---------------------------------------------------------------------------
def _rope_outputs(pipe, size, **options):
    """The (image, text) rotations QwenEmbedRope handed the blocks in one call at `size`."""
    seen = []
    handle = pipe.transformer.pos_embed.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        if options is not None:
            hires.apply(pipe, HiresConfig(positions=PositionConfig(enabled=True, **options)))
        _generate(pipe, "qwenimage", size, steps=1)
    finally:
        handle.remove()
        hires.remove(pipe)
    return seen[0]


def _independent_rotations(rows, cols, text, axes, theta, scale_h, scale_w, method):
    """Image and text rotations written out: positions centred on the image (-(n - n//2) .. n//2 - 1),
    text after the image from max(rows//2, cols//2); the frame axis at 0 for the image."""
    def axis_freqs(dim):
        return theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)

    def rotation(positions, dim, scale):
        angles = positions[:, None] * axis_freqs(dim)[None] / (scale if method == "interpolation" else 1.0)
        return torch.polar(torch.ones_like(angles), angles)

    row_pos = torch.arange(rows, dtype=torch.float64) - (rows - rows // 2)
    col_pos = torch.arange(cols, dtype=torch.float64) - (cols - cols // 2)
    start = max(rows // 2, cols // 2)
    text_pos = torch.arange(start, start + text, dtype=torch.float64)
    frame = rotation(torch.zeros(1, dtype=torch.float64), axes[0], 1.0).expand(rows * cols, -1)
    rows_rot = rotation(row_pos, axes[1], scale_h)[:, None].expand(rows, cols, -1).reshape(rows * cols, -1)
    cols_rot = rotation(col_pos, axes[2], scale_w)[None].expand(rows, cols, -1).reshape(rows * cols, -1)
    image = torch.cat([frame, rows_rot, cols_rot], dim=-1)
    text_rot = torch.cat([rotation(text_pos, axes[0], 1.0), rotation(text_pos, axes[1], scale_h),
                          rotation(text_pos, axes[2], scale_w)], dim=-1)
    return image, text_rot


@pytest.mark.parametrize("size", [(128, 128), (256, 64)])
def test_centred_rope_interpolation_equals_the_formula_and_only_the_grown_sides_change(size):
    pipe = tiny_models.build("qwenimage")
    module = pipe.transformer.pos_embed
    image, text = _rope_outputs(pipe, size, rope="interpolation")
    rows, cols = size[0] // 16, size[1] // 16
    scale_h, scale_w = max(size[0] / 64, 1.0), max(size[1] / 64, 1.0)
    expected_image, expected_text = _independent_rotations(rows, cols, text.shape[0], module.axes_dim, module.theta,
                                                           scale_h, scale_w, "interpolation")
    torch.testing.assert_close(image, expected_image.to(image.dtype), atol=1e-5, rtol=0)
    torch.testing.assert_close(text, expected_text.to(text.dtype), atol=1e-5, rtol=0)
    # the model's own positions differ wherever a side grew (the check can fail)
    own_image, _ = _rope_outputs(pipe, size, rope="none")
    assert not torch.allclose(image, own_image, atol=1e-3)


def test_centred_rope_yarn_scales_the_rotated_axes_by_mscale_and_is_inert_at_the_base_size():
    pipe = tiny_models.build("qwenimage")
    frame_dim = pipe.transformer.pos_embed.axes_dim[0] // 2
    image, text = _rope_outputs(pipe, 256)  # 4x the side: YaRN (the default)
    mscale = 0.1 * math.log(4.0) + 1.0
    for rotations in (image, text):
        torch.testing.assert_close(rotations[:, :frame_dim].abs(), torch.ones_like(rotations[:, :frame_dim].abs()))
        side_moduli = rotations[:, frame_dim:].abs()
        torch.testing.assert_close(side_moduli, torch.full_like(side_moduli, mscale))
    base_with, text_with = _rope_outputs(pipe, 64)
    base_own, text_own = _rope_outputs(pipe, 64, rope="none")
    assert torch.equal(base_with, base_own) and torch.equal(text_with, text_own)


# -- the causal 3D VAE --------------------------------------------------------------------------------
def test_structure_guidance_codec_decodes_as_the_pipeline_does():
    """Qwen-Image's latents are normalised per channel (mean / std) and decoded with a frame axis; the
    structure-guidance codec must give the image the pipeline gives, and encode back to the latent."""
    pipe = tiny_models.build("qwenimage")
    packed = _generate(pipe, "qwenimage", 64, output_type="latent")
    image = _generate(pipe, "qwenimage", 64)  # postprocessed to [0, 1]
    latent = pipe._unpack_latents(packed, 64, 64, pipe.vae_scale_factor)[:, :, 0]
    convention = hires.model_info(pipe).family.layout
    codec = latent_space.VAECodec(pipe, convention)
    decoded = codec.decode(latent)
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), image, atol=1e-6, rtol=0)
    # the per-channel statistics the codec converts with (hires.sampling.latent_space): z = (x - mean) / std
    zero = latent_space.to_vae(convention, pipe.vae, torch.zeros(1, 4, 2, 2))
    unit = latent_space.to_vae(convention, pipe.vae, torch.ones(1, 4, 2, 2)) - zero
    assert torch.equal(zero[0, :, 0, 0], torch.tensor(pipe.vae.config.latents_mean))
    torch.testing.assert_close(unit[0, :, 0, 0], torch.tensor(pipe.vae.config.latents_std))
    torch.testing.assert_close(latent_space.from_vae(convention, pipe.vae, zero + unit), torch.ones(1, 4, 2, 2))


# -- variants -------------------------------------------------------------------------------------------
def test_img2img_and_controlnet_variants_are_qwenimage_and_run_above_the_base_size():
    from diffusers import QwenImageControlNetModel, QwenImageControlNetPipeline, QwenImageImg2ImgPipeline

    base = tiny_models.build("qwenimage")
    img2img = QwenImageImg2ImgPipeline(**base.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.default_sample_size = base.default_sample_size
    assert detect_family(img2img).name == "qwenimage"
    picture = torch.rand(1, 3, 128, 128)
    plain = _generate(img2img, "qwenimage", 128, image=picture, strength=0.7, steps=10)
    hires.apply(img2img, HiresConfig(entropy_scaling=hires.EntropyScalingConfig(enabled=True),
                                     positions=PositionConfig(enabled=True)))
    out = _generate(img2img, "qwenimage", 128, image=picture, strength=0.7, steps=10)
    assert out.shape[-2:] == (128, 128) and not torch.equal(out, plain)
    hires.remove(img2img)
    assert torch.equal(_generate(img2img, "qwenimage", 128, image=picture, strength=0.7, steps=10), plain)

    torch.manual_seed(0)
    controlnet = QwenImageControlNetModel.from_transformer(base.transformer, num_layers=1, attention_head_dim=16,
                                                           num_attention_heads=2)
    control = QwenImageControlNetPipeline(**tiny_models.build("qwenimage").components, controlnet=controlnet)
    control.set_progress_bar_config(disable=True)
    control.default_sample_size = base.default_sample_size
    assert detect_family(control).name == "qwenimage"
    hires.apply(control)
    out = _generate(control, "qwenimage", 128, control_image=torch.rand(1, 3, 128, 128))
    assert out.shape[-2:] == (128, 128) and torch.isfinite(out).all()
    assert len(progressive.last_run(control)) > 1


# -- Z-Image ------------------------------------------------------------------------------------------
def _zimage_rope(pipe, size, **options):
    """The rotations Z-Image's RopeEmbedder returned for the image tokens' ids in one call at `size`."""
    from hires.runtime import get_attachment

    seen = []
    hires.apply(pipe, HiresConfig(positions=PositionConfig(enabled=True, **options)))
    embedder = pipe.transformer.rope_embedder

    class Spy:
        def __getattr__(self, name):
            return getattr(embedder, name)

        def __call__(self, ids):
            out = embedder(ids)
            seen.append((ids.clone(), out))
            return out

    entry = get_attachment(pipe).shadow(pipe.transformer, "rope_embedder", Spy())
    try:
        _generate(pipe, "zimage", size, steps=1, guidance_scale=0.0)
    finally:
        get_attachment(pipe).unshadow(entry)
        hires.remove(pipe)
    return seen[0]  # the first call: the image tokens' ids (and their padding)


def test_zimage_rope_interpolation_rescales_rows_and_columns_past_the_tables():
    """At 16x the width the row of 64 tokens runs past the tiny model's 32-entry column table, where
    plain diffusers fails; with PositionConfig the rotations are exp(i p f / s) on the grown axis only."""
    pipe = tiny_models.build("zimage")
    with pytest.raises(IndexError):
        _generate(pipe, "zimage", (64, 1024), steps=1, guidance_scale=0.0)
    ids, rotations = _zimage_rope(pipe, (64, 1024), rope="interpolation")
    theta = pipe.transformer.config.rope_theta
    dims = pipe.transformer.config.axes_dims
    assert int(ids[:, 2].max()) == 63 and int(ids[:, 1].max()) == 3
    expected = []
    for axis, dim in enumerate(dims):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        scale = 16.0 if axis == 2 else 1.0
        angles = torch.outer(ids[:, axis].double(), freqs) / scale
        expected.append(torch.polar(torch.ones_like(angles), angles))
    torch.testing.assert_close(rotations, torch.cat(expected, dim=-1).to(rotations.dtype), atol=1e-5, rtol=0)


def test_zimage_rope_is_the_models_own_at_the_base_size():
    pipe = tiny_models.build("zimage")
    ids, with_positions = _zimage_rope(pipe, 64)
    assert torch.equal(with_positions, pipe.transformer.rope_embedder(ids))


def test_zimage_hooks_see_a_tensor_view_and_the_pipeline_gets_its_lists_back():
    """Inside the adapter a hook sees (B, C, h, w) latents, sigma and the velocity the scheduler steps
    with; the pipeline still gets the transformer's list of negated velocities."""
    from diffusers.hooks import HookRegistry, ModelHook

    pipe = tiny_models.build("zimage")
    hires.apply(pipe, HiresConfig(positions=PositionConfig(enabled=True)))
    seen, stepped = [], []

    class Look(ModelHook):
        def new_forward(self, module, sample, time, *args, **kwargs):
            output = self.fn_ref.original_forward(sample, time, *args, **kwargs)
            seen.append((sample.shape, float(time.flatten()[0]),
                         output[0] if isinstance(output, tuple) else output.sample))
            return output

    HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(Look(), "test.look")
    # registered last, so outside the adapter: move it inside by re-registering the adapter's outer half
    registry = pipe.transformer._diffusers_hook
    view = registry.get_hook("hires.frame_list.view")
    registry.remove_hook("test.look", recurse=False)
    registry.remove_hook("hires.frame_list.view", recurse=False)
    registry.register_hook(Look(), "test.look")
    registry.register_hook(view, "hires.frame_list.view")
    original_step = pipe.scheduler.step
    def step(model_output, *args, **kwargs):
        stepped.append(model_output.clone())
        return original_step(model_output, *args, **kwargs)

    pipe.scheduler.step = step
    try:
        _generate(pipe, "zimage", 128, steps=2, guidance_scale=0.0)
    finally:
        del pipe.scheduler.step
    assert [shape for shape, _, _ in seen] == [torch.Size([1, 4, 16, 16])] * 2
    sigmas = [float(s) for s in pipe.scheduler.sigmas[:2]]
    assert [t for _, t, _ in seen] == pytest.approx(sigmas, abs=1e-6)
    for (_, _, velocity), received in zip(seen, stepped):
        torch.testing.assert_close(received, velocity.float(), atol=0, rtol=0)


def test_zimage_turbo_few_steps_without_cfg():
    """Z-Image Turbo runs a few steps with guidance_scale 0 (no CFG): the preset works there, APG says
    it needs CFG."""
    pipe = tiny_models.build("zimage")
    plain = _generate(pipe, "zimage", 128, steps=4, guidance_scale=0.0)
    hires.apply(pipe)
    image = _generate(pipe, "zimage", 128, steps=4, guidance_scale=0.0)
    assert not torch.equal(image, plain) and len(progressive.last_run(pipe)) > 1
    assert torch.equal(_generate(pipe, "zimage", 64, steps=4, guidance_scale=0.0),
                       _generate(tiny_models.build("zimage"), "zimage", 64, steps=4, guidance_scale=0.0))
    hires.apply(pipe, HiresConfig(apg=hires.APGConfig(enabled=True)))
    with pytest.raises(ValueError, match=r"APGConfig needs classifier-free guidance.*guidance_scale=0\.0"):
        _generate(pipe, "zimage", 128, steps=4, guidance_scale=0.0)


def test_zimage_img2img_variant_is_zimage_and_runs_above_the_base_size():
    from diffusers import ZImageImg2ImgPipeline

    base = tiny_models.build("zimage")
    img2img = ZImageImg2ImgPipeline(**base.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.default_sample_size = base.default_sample_size
    assert detect_family(img2img).name == "zimage"
    picture = torch.rand(1, 3, 128, 128)
    plain = _generate(img2img, "zimage", 128, image=picture, strength=0.7, steps=10)
    hires.apply(img2img, HiresConfig(positions=PositionConfig(enabled=True)))
    out = _generate(img2img, "zimage", 128, image=picture, strength=0.7, steps=10)
    assert out.shape[-2:] == (128, 128) and not torch.equal(out, plain)
    hires.remove(img2img)
    assert torch.equal(_generate(img2img, "zimage", 128, image=picture, strength=0.7, steps=10), plain)


# -- base sizes ---------------------------------------------------------------------------------------
def test_qwenimage_base_size_is_the_pipelines_default_sample_size():
    pipe = tiny_models.build("qwenimage")
    pipe.default_sample_size = 16
    assert hires.model_info(pipe).base_height == 128
    pipe.default_sample_size = 128  # what QwenImagePipeline.__init__ sets (the tiny model overrides it)
    assert (hires.model_info(pipe).base_height, hires.model_info(pipe).base_width) == (1024, 1024)


def test_zimage_base_size_is_1024_unless_the_pipeline_says_otherwise():
    pipe = tiny_models.build("zimage")
    assert hires.model_info(pipe).base_height == 64  # the tiny model sets default_sample_size 8
    del pipe.default_sample_size  # ZImagePipeline has none: its __call__'s 1024 px
    assert (hires.model_info(pipe).base_height, hires.model_info(pipe).base_width) == (1024, 1024)
    assert hires.model_info(pipe).size_multiple == 16


@pytest.mark.parametrize("options, reason", [
    ({"entropy_scaling": {"enabled": True}}, r"block-causal.*queries are a subset of the keys"),
    ({"window_attention": {"enabled": True}}, r"block-causal.*queries are a subset of the keys"),
    ({"scale_fusion": {"enabled": True}}, r"block-causal.*queries are a subset of the keys"),
    ({"positions": {"enabled": True}}, r"QwenImage21Rope.*cached post-RoPE"),
    ({"positions": {"enabled": True, "timestep_dependent": True}}, r"cached post-RoPE.*per step \(DyPE\)"),
    ({"dilated_sampling": {"enabled": True}}, r"cannot be split into sub-lattices.*img_shapes"),
    ({"vae_tiling": {"enabled": True}}, r"AutoencoderKLQwenImage21.*no GroupNorm head"),
    ({"memory": {"enabled": True}}, r"AutoencoderKLQwenImage21.*no GroupNorm head"),
], ids=["entropy", "windows", "scale_fusion", "positions", "dype", "dilated", "vae_tiling", "memory"])
def test_qwenimage21_refuses_what_cannot_apply_by_name_with_the_reason(options, reason):
    pipe = tiny_models.build("qwenimage21")
    with pytest.raises(ValueError, match=r"qwenimage21.*" + reason):
        hires.apply(pipe, HiresConfig.from_dict(options))
    assert not hires.is_applied(pipe)


def test_qwenimage21_hooks_see_the_latent_rows_of_its_kv_cache_prefill_output():
    # On the step that fills its KV cache the transformer returns the text rows before the image's; the
    # pipeline keeps the last rows. Under hires every hook (and so anything outside them) sees those rows only.
    pipe = tiny_models.build("qwenimage21")
    rows = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, out: rows.append((kwargs["hidden_states"].shape[1], out[0].shape[1])),
        with_kwargs=True)
    plain = _generate(pipe, "qwenimage21", 128)
    assert rows[0][1] > rows[0][0] and all(latent == out for latent, out in rows[1:])  # the prefill's text rows
    rows.clear()
    hires.apply(pipe, HiresConfig())
    assert torch.equal(_generate(pipe, "qwenimage21", 128), plain)
    assert rows and all(latent == out for latent, out in rows)
    hires.remove(pipe)
    handle.remove()


def test_qwenimage21_condition_images_are_refused_while_hires_is_attached():
    from PIL import Image

    pipe = tiny_models.build("qwenimage21")
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    hires.apply(pipe, HiresConfig())
    with pytest.raises(ValueError, match=r"img_shapes lists 1 condition image\(s\).*without image="):
        _generate(pipe, "qwenimage21", 64, image=picture)
    assert hires.last_call(pipe) is None or not hires.last_call(pipe).completed
    hires.remove(pipe)
