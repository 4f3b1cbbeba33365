"""The coherence testbed: its metrics (objects, colour, native-scale detail, texture retention, halo,
speckle, clipping), its data, and the shipped tiny models (their VAE's round trip included)."""

from __future__ import annotations

import colorsys
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import testbed_common as tc  # noqa: E402
import testbed_metrics as tm  # noqa: E402

SD15 = REPO / "hires" / "assets" / "testbed_sd15"


def _canvas(h, w, grey=200):
    return np.full((h, w, 3), grey, np.float32)


def _paint(img, shape, colour, cx, cy, r):
    cov = tc._shape_mask(shape, img.shape[0], cx, cy, r)[: img.shape[0], : img.shape[1], None]
    img[:] = img * (1 - cov) + np.array(tc.COLOURS[colour], np.float32) * cov


@pytest.mark.parametrize(
    "objects, expected",
    [
        ([], {"red": 0, "blue": 0}),
        ([("circle", "red", 20, 20, 8)], {"red": 1, "blue": 0}),
        ([("circle", "red", 20, 20, 8), ("square", "red", 70, 70, 10)], {"red": 2, "blue": 0}),
        (
            [("triangle", "red", 15, 15, 8), ("circle", "red", 75, 20, 8), ("square", "red", 20, 75, 8),
             ("circle", "blue", 70, 70, 12)],
            {"red": 3, "blue": 1, "green": 0, "yellow": 0},
        ),
    ],
)
def test_count_objects_known_counts(objects, expected):
    img = _canvas(96, 96)
    for shape, colour, cx, cy, r in objects:
        _paint(img, shape, colour, cx, cy, r)
    img = img.round().astype(np.uint8)
    for colour, n in expected.items():
        assert tc.count_objects(img, colour).n_objects == n, colour


def test_count_objects_ignores_specks_and_reports_area():
    img = _canvas(64, 64)
    _paint(img, "square", "green", 32, 32, 8)  # 16x16 = 256 px
    img = img.round().astype(np.uint8)
    img[2:5, 2:5] = tc.COLOURS["green"]  # 9 px speck, below min_object_area
    c = tc.count_objects(img, "green")
    assert c.n_objects == 1
    assert c.areas[0] == pytest.approx(256 / 64**2, rel=0.05)
    assert tc.count_objects(img, "green", min_area=5).n_objects == 2


def test_colour_mask_matches_colorsys_hue():
    # Independent formulation: hue/saturation/value from the standard library.
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, size=(1, 4000, 3)).astype(np.uint8)
    for colour, centre in tc.HUE_CENTRES.items():
        got = tc.colour_mask(px, colour)[0]
        want = []
        for r, g, b in px[0] / 255.0:
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            d = abs((h * 360 - centre + 180) % 360 - 180)
            want.append(d <= tc.HUE_HALF_WIDTH and s >= tc.MIN_SATURATION and v >= tc.MIN_VALUE)
        mismatch = np.mean(got != np.array(want))
        assert mismatch < 0.002, (colour, mismatch)  # only float ties at band edges may differ


def test_dataset_has_exactly_one_object_of_the_captioned_colour():
    for i in range(150):
        s = tc.make_sample(123, i)
        assert s.caption == f"a {s.colour} {s.shape}"
        counts = {c: tc.count_objects(s.image, c).n_objects for c in tc.COLOURS}
        assert counts[s.colour] == 1, (i, counts)
        assert sum(counts.values()) == 1, (i, counts)


def test_dataset_is_deterministic():
    a, b = tc.make_sample(5, 17), tc.make_sample(5, 17)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, tc.make_sample(5, 18).image)


def test_summarise():
    st = tc.summarise([tc.Count(1, (0.1,)), tc.Count(2, (0.02, 0.04)), tc.Count(0, ())])
    assert st.k == 3
    assert st.share_exactly_one == pytest.approx(1 / 3)
    assert st.mean_count == pytest.approx(1.0)
    assert st.mean_area == pytest.approx(0.16 / 3)


# ---------------------------------------------------------------- v2 metrics on drawn pictures


def _bicubic(img, k):
    from PIL import Image

    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((w * k, h * k), Image.BICUBIC))


@pytest.fixture(scope="module")
def drawn_reference():
    return tm.Reference.of([tm.measure(s.image, s.colour, s.shape) for s in (tc.make_sample(3, i) for i in range(12))])


def test_detail_separates_native_drawing_from_bicubic_upscale(drawn_reference):
    # 16x area: the same scene drawn at 256 px (texture at its native period) vs the 64 px
    # picture bicubic-upscaled 4x (texture 4x too coarse).
    native = [tm.measure(s.image, s.colour, s.shape) for s in (tc.make_sample(3, i, size=256) for i in range(4))]
    upscaled = [tm.measure(_bicubic(s.image, 4), s.colour, s.shape) for s in (tc.make_sample(3, i) for i in range(4))]
    nat, up = tm.summarise(native, drawn_reference), tm.summarise(upscaled, drawn_reference)
    assert nat["detail"] >= 0.8 and nat["detail_bg"] >= 0.8, nat
    assert up["detail"] <= 0.3 and up["detail_bg"] <= 0.3, up
    # Both keep one object of the right shape: only the detail tells them apart.
    assert nat["one"] == up["one"] == 1.0 and nat["shape"] == up["shape"] == 1.0


def test_detail_at_4x_area_still_separates(drawn_reference):
    native = [tm.measure(s.image, s.colour, s.shape) for s in (tc.make_sample(3, i, size=128) for i in range(4))]
    upscaled = [tm.measure(_bicubic(s.image, 2), s.colour, s.shape) for s in (tc.make_sample(3, i) for i in range(4))]
    assert tm.summarise(native, drawn_reference)["detail_bg"] >= 0.8
    assert tm.summarise(upscaled, drawn_reference)["detail_bg"] <= 0.3
    assert tm.summarise(native, drawn_reference)["detail"] > 2 * tm.summarise(upscaled, drawn_reference)["detail"]


def _red_circle(size=96):
    img = _canvas(size, size, 200)
    img += (tc.BACKGROUND_TEXTURE * tc.diagonal_wave((size, size), tc.BACKGROUND_PERIOD, 0.0, -1))[..., None]
    _paint(img, "circle", "red", size / 2, size / 2, size / 5)
    return img


def test_halo_scores_a_bright_ring_and_not_a_clean_or_blurred_edge():
    from scipy import ndimage

    clean = _red_circle()
    inside = tc.colour_mask(clean.round().astype(np.uint8), "red")
    ring = ndimage.binary_dilation(inside, iterations=6) & ~ndimage.binary_dilation(inside, iterations=2)
    haloed = clean.copy()
    haloed[ring] += 45.0  # overshoot beyond the (brighter) background, as sharpening rings do
    blurred = ndimage.gaussian_filter(clean, sigma=(2.0, 2.0, 0))
    score = {name: tm.halo(np.clip(im, 0, 255).round().astype(np.uint8), "red")
             for name, im in (("clean", clean), ("haloed", haloed), ("blurred", blurred))}
    assert score["haloed"] >= 0.2, score
    assert score["clean"] <= 0.05 and score["blurred"] <= 0.05, score


def _tinted_circle(hue_shift_deg=0.0, sat_scale=1.0):
    img = _canvas(96, 96, 200)
    h, s, v = colorsys.rgb_to_hsv(*(np.array(tc.COLOURS["green"]) / 255.0))
    rgb = np.array(colorsys.hsv_to_rgb((h + hue_shift_deg / 360.0) % 1.0, s * sat_scale, v)) * 255
    cov = tc._shape_mask("circle", 96, 48, 48, 20)[..., None]
    img[:] = img * (1 - cov) + rgb * cov
    return img.round().astype(np.uint8)


def test_colour_drift_scores_hue_and_saturation_shifts():
    hue0, sat0 = tm.colour_drift(_tinted_circle(), "green")
    hue1, _ = tm.colour_drift(_tinted_circle(hue_shift_deg=20.0), "green")
    _, sat1 = tm.colour_drift(_tinted_circle(sat_scale=0.65), "green")
    assert hue0 <= 2.0 and sat0 <= 0.02, (hue0, sat0)
    assert hue1 == pytest.approx(20.0, abs=2.0), hue1
    assert sat1 >= 0.2, sat1
    # beyond the prompted colour's hue band the error keeps growing: a red circle read as "green"
    hue_red, _ = tm.colour_drift(_tinted_circle(hue_shift_deg=-tm.trained_hue_sat("green")[0]), "green")
    assert hue_red == pytest.approx(tm.trained_hue_sat("green")[0], abs=2.0), hue_red


def test_colour_correct_reads_the_largest_object_whatever_its_hue():
    # Every drawn picture is correct for its own prompt and wrong for every other colour.
    for s in tc.drawn_pictures(24):
        assert tm.colour_correct(s.image, s.colour), s.caption
        assert not any(tm.colour_correct(s.image, c) for c in tc.COLOURS if c != s.colour), s.caption
    # A green circle asked for as red, a red patch inside a green circle (green still dominates),
    # and a hue shifted past half-way to yellow.
    assert not tm.colour_correct(_tinted_circle(), "red")
    patched = _tinted_circle()
    patched[44:52, 44:52] = tc.COLOURS["red"]
    assert tm.colour_correct(patched, "green") and not tm.colour_correct(patched, "red")
    assert not tm.colour_correct(_tinted_circle(hue_shift_deg=-45.0), "green")
    assert tm.colour_correct(_tinted_circle(hue_shift_deg=-25.0), "green")
    # no object at all is not a correct colour
    assert not tm.colour_correct(_canvas(96, 96).astype(np.uint8), "green")


def test_colour_share_is_a_wilson_interval_column():
    ref = tm.Reference.of([tm.measure(s.image, s.colour, s.shape) for s in tc.drawn_pictures(12)])
    wrong = [tm.measure(_tinted_circle(), "red", "circle")] * 3
    right = [tm.measure(s.image, s.colour, s.shape) for s in tc.drawn_pictures(9)]
    st = tm.summarise(wrong + right, ref)
    assert st["colour"] == pytest.approx(0.75) and st["colour_ci"] == pytest.approx(tm.wilson(9, 12))


def test_speckle_clipping_and_shape():
    img = _tinted_circle()
    assert tm.speckle(img, "green") == 0.0 and tm.clipped(img) == 0.0
    specked = img.copy()
    specked[5:7, 5:7] = tc.COLOURS["blue"]  # foreign colour
    specked[90:92, 5:7] = tc.COLOURS["green"]  # a speck of the prompted colour below the object size
    assert tm.speckle(specked, "green") == pytest.approx(8 / 96**2)
    burnt = img.copy()
    burnt[:10] = 255
    assert tm.clipped(burnt) == pytest.approx(10 / 96)
    for shape in tc.SHAPES:
        im = _canvas(96, 96)
        _paint(im, shape, "blue", 48, 48, 20)
        assert tm.classify_shape(tm.objects_mask(im.round().astype(np.uint8), "blue")[1]) == shape


def test_wilson_interval_matches_closed_form():
    # Independent values: the Wilson score interval for 0/10, 5/10 and 12/12 at z = 1.96.
    assert tm.wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    assert tm.wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-4)
    assert tm.wilson(12, 12) == pytest.approx((0.75751, 1.0), abs=1e-4)


def _without_stripes(seed, i, size=tc.IMAGE_SIZE, **prompt):
    old = tc.OBJECT_TEXTURE
    tc.OBJECT_TEXTURE = 0.0
    try:
        return tc.make_sample(seed, i, size, **prompt)
    finally:
        tc.OBJECT_TEXTURE = old


def test_object_detail_sees_stripes_not_the_edge():
    # The same pictures with flat objects: the ring applied to the whole picture read 0.22 of the
    # striped power there (the object's edge and the background grain); each region's own texture reads ~0.
    striped = [tc.make_sample(3, i) for i in range(12)]
    flat = [_without_stripes(3, i) for i in range(12)]
    s = np.mean([tm.object_detail(p.image, p.colour) ** 2 for p in striped])
    f = np.mean([tm.object_detail(p.image, p.colour) ** 2 for p in flat])
    assert f <= 0.01 * s, (f, s)
    # the stripes' power is the same for every colour: they scale the colour's value by 0.9 +- 0.18
    by_colour = {c: np.mean([tm.object_detail(p.image, c) ** 2 for p in tc.drawn_pictures(24) if p.colour == c])
                 for c in tc.COLOURS}
    assert max(by_colour.values()) <= 1.3 * min(by_colour.values()), by_colour


def _down_up(img, k):
    from PIL import Image

    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((w // k, h // k), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


def test_texture_retention_on_drawn_copies():
    pics = tc.drawn_pictures(24)
    orig, colours = [p.image for p in pics], [p.colour for p in pics]
    same = tm.texture_retention(orig, orig, colours)
    assert all(v == pytest.approx(1.0) for v in same.values()), same
    # the same scenes with flat objects (the draws are the same, only the stripes are gone)
    flat = [_without_stripes(424_242, i, colour=p.colour, shape=p.shape).image for i, p in enumerate(pics)]
    gone = tm.texture_retention(orig, flat, colours)
    assert gone["object"] <= 0.01 and gone["background"] == pytest.approx(1.0, abs=0.01), gone
    # a base image of a quarter the side, bicubic-upscaled: what a VAE that keeps no texture returns
    up = tm.texture_retention(orig, [_down_up(im, 4) for im in orig], colours)
    assert up["object"] <= 0.3 and up["background"] <= 0.3, up


def test_texture_retention_tells_power_from_phase():
    pics = tc.drawn_pictures(12)
    orig, colours = [p.image for p in pics], [p.colour for p in pics]
    # the same scenes with the stripes drawn half a period off: full power, opposite phase
    import unittest.mock as mock

    real = tc.diagonal_wave

    def opposite(size_hw, period, phase, sign):
        return real(size_hw, period, phase + (np.pi if period == tc.OBJECT_PERIOD else 0.0), sign)

    with mock.patch.object(tc, "diagonal_wave", opposite):
        flipped = [s.image for s in tc.drawn_pictures(12)]
    kept = tm.texture_retention(orig, flipped, colours)
    assert kept["object"] == pytest.approx(1.0, abs=0.05), kept
    assert kept["object_in_phase"] <= -0.9 and kept["background_in_phase"] == pytest.approx(1.0, abs=0.01), kept


def test_border_column_reads_a_tinted_edge_band_and_not_shading_or_objects():
    pics = tc.drawn_pictures(6, size=256, stride=5)
    assert max(tm.border_tint(p.image) for p in pics) <= 1.0
    image = pics[0].image.astype(np.int16)
    banded = image.copy()
    banded[-4:] += np.array([12, 6, -3], np.int16)  # the DiT's warm band along the bottom edge
    assert tm.border_tint(np.clip(banded, 0, 255).astype(np.uint8)) == pytest.approx(12.0, abs=0.5)
    # a slow shading across the whole picture is no band
    ramp = image + np.linspace(-10, 10, 256).round().astype(np.int16)[:, None, None]
    assert tm.border_tint(np.clip(ramp, 0, 255).astype(np.uint8)) <= 1.5
    # nor is an object's own colour at the edge: saturated pixels and their surroundings are left out
    edged = tc.make_sample(3, 0, size=256)
    img = edged.image.copy()
    img[-20:, :40] = (220, 30, 30)
    assert tm.border_tint(img) <= 1.0 + tm.border_tint(edged.image)


def test_stripes_column_reads_drawn_pictures_as_one_and_flat_objects_as_zero():
    drawn = [tm.measure(s.image, s.colour, s.shape) for s in tc.drawn_pictures(24)]
    ref = tm.Reference.of(drawn, drawn)
    others = [tm.measure(s.image, s.colour, s.shape) for s in (tc.make_sample(9, i) for i in range(24))]
    flat = [tm.measure(f.image, f.colour, f.shape) for f in (_without_stripes(9, i) for i in range(24))]
    assert tm.summarise(others, ref)["stripes"] == pytest.approx(1.0, abs=0.2)
    assert tm.summarise(flat, ref)["stripes"] <= 0.02
    assert math.isnan(tm.summarise(others, tm.Reference.of(drawn))["stripes"])  # no drawn pictures given


@pytest.fixture(scope="module")
def sd15_pipe():
    from diffusers import StableDiffusionPipeline

    assert (SD15 / "model_index.json").exists(), f"shipped testbed model missing at {SD15}"
    pipe = StableDiffusionPipeline.from_pretrained(SD15, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _round_trip(vae, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def test_shipped_vae_keeps_the_texture_through_its_round_trip(sd15_pipe):
    # Held-out drawn pictures (seeds no model trained on): the stripes and the grain survive the
    # round trip in power and in phase, so samples can carry them and the detail columns can see them.
    pics = tc.drawn_pictures(48)
    back = _round_trip(sd15_pipe.vae, np.stack([p.image for p in pics]))
    kept = tm.texture_retention([p.image for p in pics], back, [p.colour for p in pics])
    assert all(kept[k] >= 0.8 for k in ("object", "background", "object_in_phase", "background_in_phase")), kept
    assert all(tm.colour_correct(im, p.colour) and tc.count_objects(im, p.colour).n_objects == 1
               for im, p in zip(back, pics))


@pytest.mark.parametrize("size, n", [(64, 12), (128, 6), (256, 3), (512, 2)])
def test_shipped_vae_round_trip_adds_no_halo_clipping_or_colour_drift_at_any_size(sd15_pipe, size, n):
    # The eval decodes samples up to 512 px: a VAE that only works at its 64 px training size puts
    # its own halo, clipped pixels and hue shift into every large sample (v2's turned a 512 px red
    # circle orange with a green rim). Drawn pictures at each size, prompts spread over the colours.
    pics = tc.drawn_pictures(n, size=size, stride=5)
    back = [_round_trip(sd15_pipe.vae, p.image[None])[0] for p in pics]
    drawn_halo = tm.nanmean(tm.halo(p.image, p.colour) for p in pics)
    halo = tm.nanmean(tm.halo(b, p.colour) for b, p in zip(back, pics))
    clipped = float(np.mean([tm.clipped(b) for b in back]))
    hue = [tm.colour_drift(b, p.colour)[0] - tm.colour_drift(p.image, p.colour)[0] for b, p in zip(back, pics)]
    assert drawn_halo <= 0.02 and halo <= 0.02, (drawn_halo, halo)
    assert clipped <= 0.002, clipped
    assert all(tm.colour_correct(b, p.colour) for b, p in zip(back, pics)) and max(hue) <= 3.0, hue


# Structure guidance encodes the base image bicubic-upscaled, a smoother picture than the drawn ones. A VAE
# trained on drawn pictures alone tinted the bottom border of those (the 4 px strip off by 12 / 17 levels at
# 2x / 4x; top, left and right 3.5-7), which the preset's samples then carried; scripts/testbed_v3_vae's encoder
# is also trained on such pictures (train_testbed.py --encoder-only --upscaled-share).
@pytest.mark.parametrize("factor", [2, 4])
def test_shipped_vae_round_trip_of_an_upscaled_picture_keeps_its_borders(sd15_pipe, factor):
    pics = tc.drawn_pictures(6, size=64, stride=5)
    x = torch.from_numpy(np.stack([p.image for p in pics])).permute(0, 3, 1, 2).float()
    side = 64 * factor
    up = torch.nn.functional.interpolate(x, size=(side, side), mode="bicubic").clamp(0, 255).round()
    up = up.byte().permute(0, 2, 3, 1).numpy()
    back = _round_trip(sd15_pipe.vae, up).astype(np.float64)
    strips = {"top": np.s_[:, :4], "bottom": np.s_[:, -4:], "left": np.s_[:, :, :4], "right": np.s_[:, :, -4:]}
    # per picture and strip: the largest channel shift of the strip's mean colour, averaged over pictures
    shift = {name: float(np.mean(np.abs(back[sl].mean((1, 2)) - up[sl].astype(np.float64).mean((1, 2))).max(-1)))
             for name, sl in strips.items()}
    assert max(shift.values()) <= 10.0, shift


def test_shipped_models_share_the_training_vae(sd15_pipe):
    # both models were trained on scripts/testbed_v3_vae's latents (train_testbed.py --vae)
    from safetensors.torch import load_file

    sd15_vae = sd15_pipe.vae.state_dict()
    for folder in (REPO / "hires" / "assets" / "testbed_flux" / "vae", REPO / "scripts" / "testbed_v3_vae"):
        other = load_file(folder / "diffusion_pytorch_model.safetensors")
        assert other.keys() == sd15_vae.keys() and all(torch.equal(other[k], sd15_vae[k]) for k in other), folder


def test_shipped_tokenizer_round_trips(sd15_pipe):
    tok = sd15_pipe.tokenizer
    ids = tok("a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    vocab = tok.get_vocab()
    assert ids[:4] == [vocab["a"], vocab["red"], vocab["circle"], tok.eos_token_id]
    assert set(ids[4:]) == {tok.pad_token_id}
    assert tok("a purple circle").input_ids[1] == tok.unk_token_id


def test_shipped_sd15_draws_one_striped_object_of_the_prompted_colour(sd15_pipe):
    prompts = tc.all_prompts()
    gens = [torch.Generator().manual_seed(10_000 + i) for i in range(len(prompts))]
    images = sd15_pipe(
        [p for p, _, _ in prompts], height=64, width=64, num_inference_steps=15, guidance_scale=5.0,
        generator=gens, output_type="np",
    ).images
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    counts = [tc.count_objects(im, colour).n_objects for im, (_, colour, _) in zip(images, prompts)]
    bad = [(p, n) for (p, _, _), n in zip(prompts, counts) if n != 1]
    assert not bad, f"prompts without exactly one object of their colour: {bad}"
    assert all(tm.colour_correct(im, colour) for im, (_, colour, _) in zip(images, prompts))
    # the samples draw the stripes, prompt by prompt, as eval's model checks ask (0.5 of the drawn pictures'
    # texture power: the shipped UNet reads 0.61, rising about 0.1 per 1,000 training steps on this CPU)
    import eval_coherence as ev

    bound = next(b for kind, size, key, _, b in ev.MODEL_CHECKS if (kind, size, key) == ("plain", "1x", "stripes"))
    drawn = [tm.measure(p.image, p.colour, p.shape) for p in tc.drawn_pictures(48)]
    ref = tm.Reference.of(drawn, drawn)
    stripes = tm.summarise([tm.measure(im, c, s) for im, (_, c, s) in zip(images, prompts)], ref)["stripes"]
    assert bound == 0.5 and stripes >= bound, (stripes, bound)


def test_shipped_flux_loads_and_samples_native_size():
    from diffusers import FluxPipeline

    path = REPO / "hires" / "assets" / "testbed_flux"
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    tok = pipe.tokenizer_2
    assert tok("a blue square").input_ids == [tok.get_vocab()[w] for w in ("a", "blue", "square")] + [
        tok.eos_token_id
    ]
    image = pipe(
        "a blue square", height=64, width=64, num_inference_steps=15, negative_prompt="", true_cfg_scale=4.0,
        max_sequence_length=8, generator=torch.Generator().manual_seed(0), output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3)
    image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    assert tc.count_objects(image, "blue").n_objects == 1


def _cell(kind, size, **values):
    return {"kind": kind, "size": size, "row": kind, "n": 8, "one": 0.0, "detail": 0.0, "stripes": 0.0,
            "colour": 0.0, "hue_error": 0.0, "halo": 0.0, "clipped": 0.0, **values}


def test_model_checks_read_the_acceptance_cells():
    import eval_coherence as ev

    good = {"model": "m", "cells": [
        _cell("plain", "1x", one=0.96, stripes=0.85, colour=1.0, hue_error=2.0, halo=0.01, clipped=0.001),
        _cell("plain", "16x", one=0.25, detail=0.85),
        _cell("trivial", "16x", one=1.0, detail=0.1), _cell("preset", "16x", one=0.0)]}
    rows = ev.model_checks(good)
    assert len(rows) == len(ev.MODEL_CHECKS) and all(r.endswith("| yes |") for r in rows)
    # each bound fails on the wrong side, a failed cell is skipped rather than read, and so is a plain
    # row at other settings (the CLI's defaults) that comes first
    bad = {"model": "m", "cells": [
        _cell("plain", "1x", group="defaults", one=1.0, stripes=1.0, colour=1.0),
        _cell("plain", "1x", one=0.94, stripes=0.45, colour=0.95, hue_error=6.0, halo=0.03, clipped=0.003),
        _cell("plain", "16x", one=0.5, detail=0.7),
        _cell("trivial", "16x", one=0.8, detail=0.4), _cell("plain", "4x", error="RuntimeError")]}
    assert [r.endswith("| no |") for r in ev.model_checks(bad)] == [True] * len(ev.MODEL_CHECKS)
    assert ev.model_checks({"model": "m", "cells": [_cell("plain", "1x", error="x")]}) == []
    # a v2 run's cells lack the v3 measures: those checks are left out, not failed
    v2 = {k: v for k, v in _cell("plain", "1x", one=1.0, halo=0.0, clipped=0.0).items()
          if k not in ("stripes", "colour", "hue_error")}
    assert len(ev.model_checks({"model": "m", "cells": [v2]})) == 3  # one, halo, clipped


def test_mean_interval_brackets_the_mean_and_widens_with_a_heavy_tail():
    flat = tm.mean_interval([0.02] * 12)
    assert flat == pytest.approx((0.02, 0.02))
    tail = [0.0] * 11 + [0.3]  # one image carries the mean, as halo cells do
    lo, hi = tm.mean_interval(tail)
    # a resample of 12 misses the one bad image with probability (11/12)^12 = 0.35, so the lower end is 0
    assert lo == 0.0 and 0.3 / 12 < hi < 0.3
    assert tm.mean_interval([float("nan"), 0.1]) == (0.1, 0.1)
    assert all(math.isnan(x) for x in tm.mean_interval([float("nan")]))
    assert tm.mean_interval(tail) == tm.mean_interval(tail)  # fixed resampling seed


def test_preset_targets_judge_each_preset_row_against_plain_1x_at_its_settings():
    import eval_coherence as ev

    cli = ["20", "pipeline"]
    cells = [
        _cell("plain", "1x", group="standing", settings=[None, None], hue_error=2.0, halo=0.02, clipped=0.001),
        _cell("plain", "1x", group="defaults", settings=cli, hue_error=1.0, halo=0.04, clipped=0.002),
        _cell("trivial", "16x", one=1.0),
        _cell("preset", "16x", group="standing", settings=[None, None], one=0.95, colour=0.97, hue_error=5.0,
              halo=0.03, clipped=0.002, detail=0.8, detail_bg=0.8),
        _cell("preset", "64x", group="standing", settings=[None, None], one=0.9, colour=1.0, hue_error=5.1,
              halo=0.031, clipped=0.0021, detail=0.79, detail_bg=0.9),
        # at the CLI's settings the bounds come from plain 1x at those settings
        _cell("preset", "16x", group="defaults", settings=cli, one=1.0, colour=1.0, hue_error=3.9, halo=0.06,
              clipped=0.004, detail=1.0, detail_bg=1.0),
        # a family-steps config row with no plain 1x at its settings falls back to the standing plain row
        _cell("config", "16x", group="defaults", settings=["50", None], one=0.94, colour=1.0, hue_error=1.0,
              halo=0.01, clipped=0.0, detail=1.0, detail_bg=1.0),
        _cell("config", "16x", group="ablation", settings=[None, None]),  # not a preset row
        _cell("preset", "4x", group="standing", settings=[None, None]),  # not a target size
    ]
    judged = ev.preset_targets({"model": "m", "cells": cells})
    assert [(c["kind"], c["size"], c["group"]) for c, _ in judged] == [
        ("preset", "16x", "standing"), ("preset", "64x", "standing"), ("preset", "16x", "defaults"),
        ("config", "16x", "defaults")]
    missed = [[k for k, _, _, _, ok in checks if not ok] for _, checks in judged]
    assert missed == [[], ["hue_error", "halo", "clipped", "detail"], [], ["one"]]
    bounds = {k: b for k, _, _, b, _ in judged[2][1]}
    assert bounds["hue_error"] == pytest.approx(4.0) and bounds["halo"] == pytest.approx(0.06)
    assert bounds["clipped"] == pytest.approx(0.004) and bounds["one"] == 0.95
    row = ev.target_rows({"model": "m", "cells": cells})[1]
    assert row.endswith("| hue_error, halo, clipped, detail |") and "✗ (<= 0.030)" in row
    assert ev.preset_targets({"model": "m", "cells": cells[2:]}) == []  # no plain 1x: nothing to judge by
    # the legend is written from the same targets
    assert "one >= 0.95 at 16x / 0.9 at 64x" in ev.targets_text() and "halo <= 1.5x plain 1x's" in ev.targets_text()


def test_preset_rows_get_more_images_than_plain_above_1x():
    import eval_coherence as ev
    import testbed_rows as trows

    args = ev.parse([])
    plain, preset = trows.STANDING[0], trows.STANDING[2]
    assert ev.cell_n(plain, "1x", args) == ev.N_DEFAULT["standing"]["1x"]
    assert ev.cell_n(plain, "64x", args) == ev.N_DEFAULT["plain"]["64x"] < ev.cell_n(preset, "64x", args)
    assert ev.cell_n(preset, "16x", args) >= 24 and ev.cell_n(preset, "64x", args) >= 24
    assert ev.cell_n(preset, "64x", ev.parse(["--n", "2"])) == 2


def test_images_per_cell_text_reads_old_and_grouped_runs():
    import eval_coherence as ev

    assert ev._n_text({"1x": 48, "4x": 3}) == "n per size: 1x 48, 4x 3"
    grouped = ev._n_text({"1x": 48, "standing": {"16x": 8}, "technique": {"16x": 3}})
    assert grouped.startswith("n: 1x reference 48; standing rows 16x 8; technique rows 16x 3")
    v3 = ev._n_text({"standing": {"1x": 96, "64x": 12}, "technique": {"64x": 1}})
    assert v3.startswith("n: standing rows 1x 96, 64x 12; technique rows 64x 1")
    assert "plain counts" not in v3
    assert ev._n_text({"standing": {"64x": 24}, "plain": {"64x": 4}}).endswith(
        "(technique counts also for combinations; plain counts for plain rows above 1x)")


def test_object_detail_is_judged_against_its_own_prompt():
    # Two prompts whose native stripes differ 4x in raw contrast: each image is divided by its own
    # prompt's 1x mean, so a cell holding only the weak prompt still reads 1.0 at native detail.
    def m(colour, detail):
        return tm.Measure(colour, "circle", 1, True, True, detail, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0)

    ref = tm.Reference.of([m("yellow", 0.02), m("yellow", 0.04), m("blue", 0.12)])
    assert ref.object_by_prompt == {("yellow", "circle"): pytest.approx(0.03), ("blue", "circle"): 0.12}
    assert tm.summarise([m("yellow", 0.03)], ref)["detail"] == pytest.approx(1.0)
    assert tm.summarise([m("yellow", 0.03), m("blue", 0.06)], ref)["detail"] == pytest.approx(0.75)
    # a prompt missing from the reference falls back to the mean over every 1x sample
    assert tm.summarise([m("red", 0.06)], ref)["detail"] == pytest.approx(0.06 / ref.object_detail)
    assert ref.as_dict()["object_by_prompt"]["blue circle"] == 0.12


def test_rows_run_in_any_order_score_against_the_plain_row(tmp_path):
    # Workers return rows unscored and out of order; scoring puts them in row order, judges detail
    # against the plain row's 1x images and times every cell against plain at the same size.
    import eval_coherence as ev

    def m(detail):
        return tm.Measure("red", "circle", 1, True, True, detail, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0)

    def cell(kind, size, secs, details):
        return {"model": "sd15", "row": kind, "group": "standing", "kind": kind, "size": size,
                "seconds_per_image": secs, "measures": [m(d) for d in details]}

    plain = {"model": "sd15", "index": 0, "seconds": 3.0, "sheet": {},
             "cells": [cell("plain", "1x", 1.0, [0.02, 0.04]), cell("plain", "16x", 2.0, [0.03])]}
    preset = {"model": "sd15", "index": 1, "seconds": 5.0, "sheet": {},
              "cells": [cell("preset", "16x", 5.0, [0.015]),
                        {"model": "sd15", "row": "preset", "kind": "preset", "size": "64x", "n": 0, "error": "x"}]}
    args = ev.parse(["--sheet-dir", str(tmp_path)])
    scored = ev.score_model("sd15", [preset, plain], args)
    assert [(c["row"], c["size"]) for c in scored["cells"]] == [
        ("plain", "1x"), ("plain", "16x"), ("preset", "16x"), ("preset", "64x")]
    plain16, preset16 = scored["cells"][1], scored["cells"][2]
    assert plain16["detail"] == pytest.approx(1.0) and preset16["detail"] == pytest.approx(0.5)
    assert preset16["time_ratio"] == pytest.approx(2.5) and scored["seconds"] == pytest.approx(8.0)
    assert scored["cells"][3]["error"] == "x" and "measures" not in preset16
    with pytest.raises(RuntimeError, match="plain 1x failed"):
        ev.score_model("sd15", [{**plain, "cells": [{"kind": "plain", "size": "1x", "error": "boom"}]}], args)


def test_every_row_reads_beside_the_trivial_baseline_at_its_own_settings():
    # A row at the CLI's defaults is set beside the baseline sampled at those defaults; a row whose
    # settings no baseline row shares falls back to the baseline at the testbed's own settings.
    import eval_coherence as ev
    import testbed_rows as trows

    def cell(kind, size, settings, one, detail, error=None):
        c = {"kind": kind, "row": f"{kind} {settings}", "size": size, "settings": list(settings)}
        return {**c, "error": error} if error else {**c, "one": one, "colour": 1.0, "detail": detail, "detail_bg": 0.5}

    ref, cli, family = (None, None), (20, trows.PIPELINE_GUIDANCE), (50, None)
    cells = [cell("plain", "1x", ref, 1.0, 1.0), cell("trivial", "16x", ref, 0.9, 0.2),
             cell("trivial", "16x", cli, 0.8, 0.3), cell("preset", "16x", ref, 0.7, 0.9),
             cell("preset", "16x", cli, 0.6, 0.8), cell("config", "16x", family, 0.5, 0.7),
             cell("preset", "64x", ref, 0.4, 0.6), cell("trivial", "4x", ref, 0, 0, error="boom"),
             cell("preset", "4x", ref, 0.3, 0.5)]
    ev.attach_baselines(cells, list(ref))
    one = {(c["kind"], c["size"], tuple(c["settings"])): c.get("baseline", {}).get("one") for c in cells}
    assert one[("preset", "16x", ref)] == 0.9 and one[("preset", "16x", cli)] == 0.8
    assert one[("config", "16x", family)] == 0.9  # no baseline at 50 steps: the testbed's own
    assert one[("plain", "1x", ref)] is None and one[("preset", "64x", ref)] is None  # none at that size
    assert one[("preset", "4x", ref)] is None and "baseline" not in cells[1]  # a failed baseline is no baseline
    assert ev._baseline_text(cells[4]) == "0.80 / 1.00 / 0.30 / 0.50" and ev._baseline_text(cells[0]) == "—"
    # each settings group of the rows has its own baseline row
    for family_name in trows.ROWS:
        rows = trows.ROWS[family_name]()
        trivial_settings = {r.settings for r in rows if r.kind == trows.TRIVIAL}
        assert {r.settings for r in rows if r.group in ("standing", "defaults")} == trivial_settings
