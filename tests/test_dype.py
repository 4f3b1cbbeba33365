"""DyPE: timestep-dependent RoPE extrapolation (PositionConfig(timestep_dependent=True)).

Math against DyPE's formulas written out here per frequency; the rotary tables captured inside a tiny
Flux pipeline at every step against the scheduler's own sigmas; bit-identity at the base size, off and
after remove; the errors where it does not apply.
"""

import math

import numpy as np
import pytest
import torch

import hires
from hires.config import HiresConfig, PositionConfig
from hires.techniques.positions import encodings as P
from tiny_models import build, generate


def _apply(pipe, **options):
    return hires.apply(pipe, HiresConfig(positions=PositionConfig(enabled=True, timestep_dependent=True, **options)))


# -- math: DyPE's formulas, one frequency at a time --------------------------------------------------

def _ramp_index(rotations, dim, theta, length):
    """Index k whose frequency theta^(-2k/dim) turns `rotations` times over `length` positions."""
    return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def _ramp_value(k, start, end):
    width = end - start if end != start else 0.001
    return min(max((k - start) / width, 0.0), 1.0)


def _expected_dype_yarn(dim, theta, scale, length, kappa, beta=(1.25, 0.75), gamma=(16.0, 2.0)):
    """DyPE's two ramps per frequency: PI -> NTK between kappa*beta rotations, then -> original
    between kappa*gamma rotations (ramp ends as floor / ceil of the index, at most dim/2)."""
    half = dim // 2
    ntk_theta = theta * scale ** (dim / (dim - 2))
    out = []

    def ends(fast, slow):
        start = min(max(math.floor(_ramp_index(fast * kappa, dim, theta, length)), 0), half)
        end = min(math.ceil(_ramp_index(slow * kappa, dim, theta, length)), dim - 1, half)
        return start, end

    b_start, b_end = ends(*beta)
    g_start, g_end = ends(*gamma)
    for k in range(half):
        original = theta ** (-2 * k / dim)
        ntk = ntk_theta ** (-2 * k / dim)
        to_ntk = 1 - _ramp_value(k, b_start, b_end)
        freq = (original / scale) * (1 - to_ntk) + ntk * to_ntk
        to_original = 1 - _ramp_value(k, g_start, g_end)
        out.append(freq * (1 - to_original) + original * to_original)
    return out


@pytest.mark.parametrize("scale", [2.0, 4.0])
@pytest.mark.parametrize("kappa", [1.0, 0.5, 0.09, 0.01])
def test_dype_yarn_frequencies_follow_the_two_ramps(scale, kappa):
    dim, theta, length = 56, 10000.0, 64  # Flux.1's row / column axes at 1024 px
    got = P.dype_yarn_frequencies(dim, theta, scale, length, kappa, 1.25, 0.75)
    expected = _expected_dype_yarn(dim, theta, scale, length, kappa)
    assert got.tolist() == pytest.approx(expected, rel=1e-12)


def test_dype_yarn_limits_and_monotone_fade():
    dim, theta, length, scale = 56, 10000.0, 64, 4.0
    original = P.rope_frequencies(dim, theta)
    # full strength: the slowest frequency is interpolated, the fastest kept
    full = P.dype_yarn_frequencies(dim, theta, scale, length, 1.0, 1.25, 0.75)
    assert full[-1].item() == pytest.approx(original[-1].item() / scale, rel=1e-12)
    assert full[0].item() == original[0].item()
    # clean (kappa -> 0): every frequency is the model's own again
    assert torch.equal(P.dype_yarn_frequencies(dim, theta, scale, length, 0.0, 1.25, 0.75), original)
    # the share of frequencies left at their original value grows as the noise fades
    kept = [int((P.dype_yarn_frequencies(dim, theta, scale, length, sigma**2, 1.25, 0.75) == original).sum())
            for sigma in (1.0, 0.7, 0.4, 0.1)]
    assert kept == sorted(kept) and kept[-1] > kept[0]


@pytest.mark.parametrize("dim,scale,sigma", [(56, 2.0, 1.0), (56, 4.0, 0.5), (6, 2.0, 0.3), (16, 3.0, 0.0)])
def test_dype_ntk_factor(dim, scale, sigma):
    kappa = P.noise_kappa(sigma)
    assert kappa == sigma * sigma
    expected = max(1.0, (scale ** (dim / (dim - 2))) ** (2 * sigma * sigma))
    assert P.dype_ntk_factor(scale, dim, kappa) == pytest.approx(expected, rel=1e-12)
    freqs, mscale = P.dype_axis_frequencies("ntk", dim, 10000.0, scale, 64, kappa, 1.25, 0.75)
    assert mscale == 1.0
    reference = [(10000.0 * expected) ** (-k / dim) for k in range(0, dim, 2)]
    assert freqs.tolist() == pytest.approx(reference, rel=1e-12)


def test_dype_yarn_keeps_yarn_attention_factor():
    _, mscale = P.dype_axis_frequencies("yarn", 56, 10000.0, 3.0, 64, 0.2, 1.25, 0.75)
    assert mscale == 0.1 * math.log(3.0) + 1


# -- inside a tiny Flux pipeline --------------------------------------------------------------------

def _expected_tables(ids, axes_dim, scales, base_length, method, kappa, theta=10000.0):
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dim):
        s = scales[axis]
        if s > 1:
            if method == "yarn":
                freqs = _expected_dype_yarn(dim, theta, s, base_length, kappa)
                m = 0.1 * math.log(s) + 1
            else:
                factor = max(1.0, (s ** (dim / (dim - 2))) ** (2 * kappa))
                freqs = [(theta * factor) ** (-k / dim) for k in range(0, dim, 2)]
                m = 1.0
        else:
            freqs, m = [theta ** (-k / dim) for k in range(0, dim, 2)], 1.0
        angles = ids[:, axis].double()[:, None] * torch.tensor(freqs, dtype=torch.float64)[None]
        cos_parts.append((m * angles.cos()).repeat_interleave(2, dim=1))
        sin_parts.append((m * angles.sin()).repeat_interleave(2, dim=1))
    return torch.cat(cos_parts, dim=1).float(), torch.cat(sin_parts, dim=1).float()


@pytest.mark.parametrize("method", ["yarn", "ntk"])
def test_flux_tables_follow_each_steps_sigma(method):
    pipe = build("flux")
    module = pipe.transformer.pos_embed
    _apply(pipe, rope=method)
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    steps = 3
    generate(pipe, "flux", (256, 128), steps=steps)
    handle.remove()
    sigmas = pipe.scheduler.sigmas[:-1].double().tolist()  # the schedule this call ran
    assert len(seen) == steps
    for (ids, (cos, sin)), sigma in zip(seen, sigmas):
        expected_cos, expected_sin = _expected_tables(ids, module.axes_dim, (1.0, 4.0, 2.0), 4, method, sigma**2)
        torch.testing.assert_close(cos, expected_cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, expected_sin, atol=1e-6, rtol=0)
    if method == "ntk":  # the factor fades with every step (the tiny 6-dim axes keep YaRN's ramp ends
        # over these sigmas; the fade of the ramps is checked on Flux's 56-dim axes above)
        assert not torch.equal(seen[0][1][0], seen[-1][1][0])
    logged = hires.last_call(pipe).notes["log.positions.dype"]
    assert [step for step, _ in logged] == list(range(steps))
    assert [k for _, k in logged] == pytest.approx([s**2 for s in sigmas], rel=1e-6)
    # DyPE's flow-shift cap: mu clamped to the base size's value (the default timestep_shift)
    shift = hires.last_call(pipe).notes["log.positions.timestep_shift"]
    assert shift["policy"] == "clamp" and shift["applied_mu"] == pytest.approx(0.5) and shift["mu"] > 0.5


def test_dype_changes_the_image_against_static_extrapolation():
    pipe = build("flux")
    hires.apply(pipe, HiresConfig(positions=PositionConfig(enabled=True)))
    static = generate(pipe, "flux", 128, steps=3)
    _apply(pipe)
    dynamic = generate(pipe, "flux", 128, steps=3)
    assert not torch.equal(static, dynamic)
    # same seed, same image
    assert torch.equal(generate(pipe, "flux", 128, steps=3), dynamic)


def test_bit_identical_at_the_base_size_off_and_after_remove():
    pipe = build("flux")
    plain_base = generate(pipe, "flux", 64, steps=2)
    plain_up = generate(pipe, "flux", 128, steps=2)
    for method in ("yarn", "ntk"):
        _apply(pipe, rope=method)
        assert torch.equal(generate(pipe, "flux", 64, steps=2), plain_base), method
        assert not torch.equal(generate(pipe, "flux", 128, steps=2), plain_up), method
        hires.remove(pipe)
        assert torch.equal(generate(pipe, "flux", 128, steps=2), plain_up), method
    hires.apply(pipe, HiresConfig(positions=PositionConfig(enabled=False, timestep_dependent=True)))
    assert torch.equal(generate(pipe, "flux", 128, steps=2), plain_up)
    hires.remove(pipe)


# -- where it does not apply -------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_families_without_rope_refuse_it(family):
    pipe = build(family)
    with pytest.raises(ValueError, match=r"PositionConfig.timestep_dependent=True does not apply to family"):
        _apply(pipe)
    assert not hires.is_applied(pipe)


@pytest.mark.parametrize("rope", ["none", "interpolation"])
def test_methods_without_ramps_refuse_it(rope):
    with pytest.raises(ValueError, match=rf"timestep_dependent=True \(DyPE\).*rope={rope!r}"):
        PositionConfig(enabled=True, rope=rope, timestep_dependent=True)


def test_timestep_dependent_is_a_boolean():
    with pytest.raises(TypeError, match=r"PositionConfig.timestep_dependent=the string 'yes'"):
        PositionConfig(timestep_dependent="yes")


def test_kappa_is_sigma_squared_on_real_schedules():
    # Flux's 28-step schedule with the base mu (1.15): kappa falls from 1 to about 0.01 by the last step
    sigma = np.linspace(1.0, 1 / 28, 28)
    shifted = math.exp(1.15) / (math.exp(1.15) + (1 / sigma - 1))
    kappas = [P.noise_kappa(s) for s in shifted]
    assert kappas[0] == 1.0 and kappas == sorted(kappas, reverse=True) and kappas[-1] < 0.02
