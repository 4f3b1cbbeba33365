"""Dispersed convolution: the least-squares 3x3 -> 5x5 map, its use on kernels, and in a pipeline."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import hires
from hires.techniques.redilation import dispersion
from hires.techniques.redilation.dilation import dispersed_conv
from tiny_models import build, generate


def _bilinear_corner_aligned(n: int, scale: int) -> torch.Tensor:
    """1-D interpolation matrix (m x n), m = scale (n - 1) + 1: output i sits at input i / scale."""
    m = scale * (n - 1) + 1
    matrix = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        pos = i / scale
        left = min(int(pos), n - 2)
        frac = pos - left
        matrix[i, left] += 1 - frac
        matrix[i, left + 1] += frac
    return matrix


def _correlation_rows(side: int, ksize: int) -> torch.Tensor:
    """T[(oy, ox), (iy, ix), (ky, kx)]: zero-padded 'same' correlation written as index arithmetic."""
    half = ksize // 2
    t = torch.zeros(side * side, side * side, ksize * ksize, dtype=torch.float64)
    for oy, ox, ky, kx in itertools.product(range(side), range(side), range(ksize), range(ksize)):
        iy, ix = oy + ky - half, ox + kx - half
        if 0 <= iy < side and 0 <= ix < side:
            t[oy * side + ox, iy * side + ix, ky * ksize + kx] = 1.0
    return t


def _independent_map(eta: float, n: int = 3, scale: int = 2, small: int = 3, large: int = 5) -> torch.Tensor:
    m = scale * (n - 1) + 1
    u1 = _bilinear_corner_aligned(n, scale)
    up = torch.kron(u1, u1)  # (m*m, n*n): upsampling of a flattened n x n image
    corr_m_large = _correlation_rows(m, large)  # (m*m out, m*m in, 25)
    corr_n_large = _correlation_rows(n, large)
    corr_n_small = _correlation_rows(n, small)
    rows_a, rows_b = [], []
    for j in range(n * n):  # the symbolic input: one pixel at a time
        x = torch.zeros(n * n, dtype=torch.float64)
        x[j] = 1
        x_up = up @ x
        rows_a.append(torch.einsum("oik,i->ok", corr_m_large, x_up))  # conv(up(x), K), linear in K
        rows_b.append(up @ torch.einsum("oik,i->ok", corr_n_small, x))  # up(conv(x, k)), linear in k
    pixel_a = [torch.einsum("oik,i->ok", corr_n_large, torch.eye(n * n, dtype=torch.float64)[j]) for j in range(n * n)]
    pixel_b = [torch.einsum("oik,i->ok", corr_n_small, torch.eye(n * n, dtype=torch.float64)[j]) for j in range(n * n)]
    a = torch.cat([torch.cat(rows_a), eta * torch.cat(pixel_a)])
    b = torch.cat([torch.cat(rows_b), eta * torch.cat(pixel_b)])
    return torch.linalg.lstsq(a, b).solution


@pytest.mark.parametrize("eta", [0.05, 0.5, 0.0])
def test_map_equals_an_independent_least_squares_solve(eta):
    ours = dispersion.dispersion_map(eta=eta)
    assert ours.shape == (25, 9)
    assert torch.allclose(ours, _independent_map(eta), atol=1e-9)


def test_map_matches_the_released_transform_on_an_all_ones_kernel():
    # The official R20to1_new maps an all-ones 3x3 kernel to a 5x5 kernel summing to about 9.75.
    kernel = dispersion.dispersion_map(eta=0.05) @ torch.ones(9, dtype=torch.float64)
    assert abs(kernel.sum().item() - 9.75) < 0.01
    assert torch.allclose(kernel.reshape(5, 5), kernel.reshape(5, 5).flip(0))  # symmetric, as the input is


def test_map_is_cached_per_shape():
    dispersion._dispersion_map.cache_clear()
    first = dispersion.dispersion_map(eta=0.05)
    first += 1  # callers get a copy: the cached map cannot be corrupted
    second = dispersion.dispersion_map(eta=0.05)
    assert dispersion._dispersion_map.cache_info().hits == 1
    assert not torch.equal(first, second)
    assert torch.equal(second, dispersion.dispersion_map(eta=0.05))


def test_disperse_kernel_maps_every_channel_pair_and_keeps_dtype():
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float16)
    r = dispersion.dispersion_map(eta=0.05).float()
    expected = torch.stack([torch.stack([(r @ weight[o, i].float().flatten()).reshape(5, 5) for i in range(4)])
                            for o in range(6)])
    out = dispersion.disperse_kernel(weight, eta=0.05)
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), expected, atol=1e-2)


def test_dispersed_conv_is_a_5x5_conv_with_the_mapped_kernel():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 4, 12, 12), torch.randn(5, 4, 3, 3), torch.randn(5)
    kernel = torch.einsum("pq,oiq->oip", dispersion.dispersion_map(eta=0.05).float(),
                          weight.flatten(2)).reshape(5, 4, 5, 5)
    for stride, factor in ((1, 1.0), (1, 2.0), (2, 2.0)):
        expected = F.conv2d(x, kernel, bias, stride=stride, padding=2 * int(factor), dilation=int(factor))
        assert torch.allclose(dispersed_conv(x, weight, bias, stride, 1, factor, 0.05), expected, atol=1e-5)
    # fractional: resize by ceil(d)/d, dilated 5x5 conv, resize back
    resized = F.interpolate(x, size=(int(12 * 2 / 1.5),) * 2, mode="bilinear")
    expected = F.interpolate(F.conv2d(resized, kernel, bias, padding=4, dilation=2), size=(12, 12), mode="bilinear")
    assert torch.allclose(dispersed_conv(x, weight, bias, 1, 1, 1.5, 0.05), expected, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"small": 4}, {"large": 1}, {"eta": -1}, {"scale": 0}, {"input_size": 2.5}])
def test_bad_map_arguments_name_the_parameter(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        dispersion.dispersion_map(**kwargs)


def test_dispersion_runs_in_the_16x_preset_and_changes_the_output():
    family, size, steps = "sd15", 256, 6
    pipe = build(family)
    with_dispersion = hires.HiresConfig(redilation=hires.RedilationConfig(enabled=True, noise_damped_guidance=False))
    hires.apply(pipe, with_dispersion)
    dispersed = generate(pipe, family, size, steps=steps)
    notes = hires.last_call(pipe).notes
    plan = notes["log.redilation.plan"]
    assert plan["dispersion"] and plan["dispersion_steps"] == 5  # 16x preset: steps with i / 6 < 0.7
    assert sorted(notes["log.redilation.dispersed_convs_per_step"]) == list(range(5))
    assert set(notes["log.redilation.dispersed_convs_per_step"].values()) == {len(plan["dispersion"])}
    hires.apply(pipe, with_dispersion.replace(redilation=with_dispersion.redilation.__class__(
        enabled=True, noise_damped_guidance=False, dispersion_modules=())))
    dilated_only = generate(pipe, family, size, steps=steps)
    assert "log.redilation.dispersed_convs_per_step" not in hires.last_call(pipe).notes
    assert not torch.allclose(dispersed, dilated_only, atol=1e-3)
