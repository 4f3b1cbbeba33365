"""The torch DWT against PyWavelets (test-only dependency), and the low-band swap's algebra."""

import numpy as np
import pytest
import torch

from hires.sampling import wavelets

pywt = pytest.importorskip("pywt")

SHAPES = [(16, 16), (11, 13), (8, 20), (5, 7), (3, 2)]


@pytest.mark.parametrize("order", range(1, wavelets.MAX_ORDER + 1))
def test_daubechies_filters_equal_pywavelets(order):
    ours = np.array(wavelets.daubechies_filter(order))
    assert np.abs(ours - np.array(pywt.Wavelet(f"db{order}").rec_lo)).max() < 1e-10


@pytest.mark.parametrize("mode", wavelets.MODES)
@pytest.mark.parametrize("wavelet", ["haar", "db2", "db4", "db6"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dwt2_and_idwt2_equal_pywavelets(mode, wavelet, shape):
    x = torch.randn(2, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ll, details = wavelets.dwt2(x, wavelet, mode)
    ref_ll, ref_details = pywt.dwt2(x.numpy(), wavelet, mode=mode)
    assert np.abs(ll.numpy() - ref_ll).max() < 1e-10
    for ours, ref in zip(details, ref_details):
        assert np.abs(ours.numpy() - ref).max() < 1e-10
    rebuilt = wavelets.idwt2(ll, details, wavelet, mode)
    ref_rebuilt = pywt.idwt2((ref_ll, ref_details), wavelet, mode=mode)
    assert rebuilt.shape == ref_rebuilt.shape
    assert np.abs(rebuilt.numpy() - ref_rebuilt).max() < 1e-10


@pytest.mark.parametrize("mode", wavelets.MODES)
@pytest.mark.parametrize("level", [1, 2, 3])
def test_multilevel_equals_pywavelets_and_round_trips_in_float32(mode, level):
    x = torch.randn(1, 4, 40, 36, generator=torch.Generator().manual_seed(2))
    ours = wavelets.wavedec2(x, "db4", level, mode)
    ref = pywt.wavedec2(x.double().numpy(), "db4", mode=mode, level=level)
    assert np.abs(ours[0].double().numpy() - ref[0]).max() < 1e-4
    for mine, theirs in zip(ours[1:], ref[1:]):
        for a, b in zip(mine, theirs):
            assert np.abs(a.double().numpy() - b).max() < 1e-4
    rebuilt = wavelets.waverec2(ours, "db4", mode)
    assert rebuilt.dtype == torch.float32
    assert (rebuilt - x).abs().max() < 1e-5


@pytest.mark.parametrize("mode", wavelets.MODES)
@pytest.mark.parametrize("level", [1, 2])
def test_swap_keeps_the_guides_low_band_and_the_samples_high_bands(level, mode):
    gen = torch.Generator().manual_seed(3)
    sample = torch.randn(2, 4, 32, 24, generator=gen)
    guide = torch.randn(2, 4, 32, 24, generator=gen)
    guide_low = wavelets.low_band(guide, "db4", level, mode)
    swapped = wavelets.swap_low_band(sample, guide_low, "db4", level, mode)
    assert swapped.shape == sample.shape and swapped.dtype == torch.float32
    # Independent check with PyWavelets: the swapped image's bands are the guide's LL and the sample's details.
    out = pywt.wavedec2(swapped.double().numpy(), "db4", mode=mode, level=level)
    ref_guide = pywt.wavedec2(guide.double().numpy(), "db4", mode=mode, level=level)
    ref_sample = pywt.wavedec2(sample.double().numpy(), "db4", mode=mode, level=level)
    # Periodization is critically sampled, so the swap is exact everywhere. Symmetric extension is
    # redundant: the coefficients within taps/2 - 1 = 3 (per level) of a border mix with the extension, so only
    # the interior is pinned (that is also true of pytorch_wavelets' symmetric mode in the paper's code).
    edge = 2 * level + 1  # 3 at level 1; the border grows by 2 coefficients per coarser level
    border = (slice(None), slice(None), slice(edge, -edge), slice(edge, -edge)) if mode == "symmetric" else ...
    assert np.abs(out[0] - ref_guide[0])[border].max() < 1e-5
    for mine, theirs in zip(out[1:], ref_sample[1:]):
        for a, b in zip(mine, theirs):
            assert np.abs(a - b)[border].max() < 1e-5
    # Swapping in the sample's own low band changes nothing (round trip within 1e-5 in float32).
    same = wavelets.swap_low_band(sample, wavelets.low_band(sample, "db4", level, mode), "db4", level, mode)
    assert (same - sample).abs().max() < 1e-5


def test_swap_is_affine_so_it_commutes_with_guidance_combinations():
    gen = torch.Generator().manual_seed(4)
    a, b, guide = (torch.randn(1, 4, 16, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    low = wavelets.low_band(guide)
    w = 5.0
    combined_then_swapped = wavelets.swap_low_band(a + w * (b - a), low)
    swapped_a, swapped_b = wavelets.swap_low_band(a, low), wavelets.swap_low_band(b, low)
    swapped_then_combined = swapped_a + w * (swapped_b - swapped_a)
    assert torch.allclose(combined_then_swapped, swapped_then_combined, atol=1e-10)


def test_bad_names_and_levels_are_clear_errors():
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="wavelet='sym4'.*db4"):
        wavelets.dwt2(x, "sym4")
    with pytest.raises(ValueError, match="mode='zero'"):
        wavelets.dwt2(x, "db4", "zero")
    with pytest.raises(ValueError, match="level=0"):
        wavelets.wavedec2(x, "db4", 0)
    with pytest.raises(ValueError, match="guide low band has shape"):
        wavelets.swap_low_band(x, torch.zeros(1, 1, 3, 3))
