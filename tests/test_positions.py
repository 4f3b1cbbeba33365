"""Positional extrapolation (PixArt-Sigma, SD3, Flux) and the flow timestep-shift policy.

Math against formulas written here; positions captured inside tiny pipelines at 2x and 4x the base
side; bit-identity at the base size, when off, and after remove; errors.
"""

import math
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import PatchEmbed

import hires
from hires.config import HiresConfig, PositionConfig
from hires.runtime import HOOK_PREFIX
from hires.sampling import schedules
from hires.techniques.positions import encodings as P
from tiny_models import build, generate

DIT_FAMILIES = ("pixart", "sd3", "flux", "flux2", "flux2_klein", "chroma", "qwenimage", "zimage")


def _apply(pipe, **options):
    return hires.apply(pipe, HiresConfig(positions=PositionConfig(enabled=True, **options)))


def _positions_sincos(count, base, scale):
    return [i * base / count / scale for i in range(count)]


def _sincos_entry(dim, row_pos, col_pos):
    """One token's 2D sin-cos vector, written out: [sin, cos of the column; sin, cos of the row]."""
    quarter = dim // 4
    omegas = [10000 ** (-k / quarter) for k in range(quarter)]
    col = [math.sin(col_pos * w) for w in omegas] + [math.cos(col_pos * w) for w in omegas]
    row = [math.sin(row_pos * w) for w in omegas] + [math.cos(row_pos * w) for w in omegas]
    return col + row


def _sincos_table(dim, row_positions, col_positions):
    return torch.tensor([_sincos_entry(dim, r, c) for r in row_positions for c in col_positions])


# -- math ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols,base,scale", [(4, 4, 4, 1.0), (8, 16, 4, 1.0), (12, 6, 8, 0.5), (5, 7, 4, 2.0)])
def test_interpolated_sincos_table_matches_the_formula_and_diffusers(rows, cols, base, scale):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    dim = 16
    expected = _sincos_table(dim, _positions_sincos(rows, base, scale), _positions_sincos(cols, base, scale))
    ours = P.sincos_2d_embedding(dim, P.sincos_positions(rows, base, scale), P.sincos_positions(cols, base, scale))
    theirs = get_2d_sincos_pos_embed(dim, (rows, cols), base_size=base, interpolation_scale=scale).float()
    torch.testing.assert_close(ours, expected.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs, expected.float(), atol=1e-5, rtol=0)


def _table_source(n, m):
    """Index (float) of an m-long table side sampled by each of n tokens, written out."""
    if n <= m:
        start = (m - n) // 2
        return [float(start + i) for i in range(n)]
    return [min(max((i + 0.5) * m / n - 0.5, 0.0), m - 1.0) for i in range(n)]


def _lerp_rows(values, coords):
    out = []
    for c in coords:
        lo = int(math.floor(c))
        hi = min(lo + 1, values.shape[0] - 1)
        w = c - lo
        out.append(values[lo] * (1 - w) + values[hi] * w)
    return torch.stack(out)


def _resampled_table(grid, rows, cols):
    side = grid.shape[0]
    out = _lerp_rows(grid, _table_source(rows, side))
    return _lerp_rows(out.transpose(0, 1), _table_source(cols, side)).transpose(0, 1)


def test_interpolated_table_is_a_crop_where_it_fits_and_bilinear_over_the_whole_table_past_it():
    side, dim = 6, 3
    table = torch.randn(1, side * side, dim)
    grid = table.reshape(side, side, dim)

    for rows, cols in [(4, 4), (6, 6), (9, 4), (4, 10), (15, 8)]:
        expected = _resampled_table(grid, rows, cols)
        got = P.interpolate_table(table, side, rows, cols).reshape(rows, cols, dim)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # where both sides fit it is exactly diffusers' centred crop
    crop = grid[1:5, 1:5].reshape(1, 16, dim)
    assert torch.equal(P.interpolate_table(table, side, 4, 4), crop)


def test_extrapolated_table_continues_the_stored_formula_past_its_ends():
    side, base, scale, dim = 6, 4, 1.0, 8
    step = base / side / scale
    stored = _sincos_table(dim, [j * step for j in range(side)], [j * step for j in range(side)]).float()
    # inside the table: the stored entries
    inside = P.extrapolate_table(dim, side, base, scale, 4, 4)[0].reshape(4, 4, dim)
    torch.testing.assert_close(inside, stored.reshape(side, side, dim)[1:5, 1:5], atol=1e-6, rtol=0)
    # past it: indices -2..7 and -1..6, at the same step
    got = P.extrapolate_table(dim, side, base, scale, 10, 8)[0]
    expected = _sincos_table(dim, [j * step for j in range(-2, 8)], [j * step for j in range(-1, 7)]).float()
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dim", [4, 6, 16, 56])
@pytest.mark.parametrize("scale", [1.5, 2.0, 4.0])
def test_ntk_base(dim, scale):
    theta = 10000.0
    new = P.ntk_base(theta, scale, dim)
    assert new == pytest.approx(theta * scale ** (dim / (dim - 2)), rel=1e-12)
    # what NTK is built for: the lowest frequency becomes exactly the interpolated one, the highest is kept
    def lowest(base):
        return base ** (-(dim - 2) / dim)

    assert lowest(new) == pytest.approx(lowest(theta) / scale, rel=1e-10)
    freqs = P.rope_frequencies(dim, new)
    assert freqs[0].item() == 1.0 and freqs[-1].item() == pytest.approx(lowest(theta) / scale, rel=1e-10)
    assert P.ntk_base(theta, scale, 2) == theta  # one frequency (1.0): nothing to rescale


def test_yarn_frequencies_ramp_and_attention_factor():
    dim, theta, length, fast, slow = 56, 10000.0, 64, 1.25, 0.75
    for scale in (2.0, 3.0, 4.0):
        got = P.yarn_frequencies(dim, theta, scale, length, fast, slow)
        for k in range(dim // 2):
            freq = theta ** (-2 * k / dim)
            rotations = length / (2 * math.pi / freq)
            if rotations < slow:
                expected = freq / scale
            elif rotations > fast:
                expected = freq
            else:
                keep = (rotations - slow) / (fast - slow)
                expected = keep * freq + (1 - keep) * freq / scale
            assert got[k].item() == pytest.approx(expected, rel=1e-12), (scale, k)
    # Flux at 64 positions: 7 frequencies kept, 20 interpolated, one on the ramp
    kept = P.yarn_ramp(length * P.rope_frequencies(dim, theta) / (2 * math.pi), fast, slow)
    assert (int((kept == 1).sum()), int((kept == 0).sum())) == (7, 20)
    # mscale = 0.1 ln s + 1 (reference: 1.069, 1.110, 1.139 at s = 2, 3, 4); 1 at or below the base
    for scale, value in [(2, 1.069), (3, 1.110), (4, 1.139)]:
        assert P.yarn_attention_factor(scale) == pytest.approx(value, abs=5e-4)
        assert P.yarn_attention_factor(scale) == 0.1 * math.log(scale) + 1
    assert P.yarn_attention_factor(1.0) == 1.0 and P.yarn_attention_factor(0.5) == 1.0


def test_interpolation_frequencies_and_rotary_layout():
    freqs, mscale = P.axis_frequencies("interpolation", 8, 10000.0, 4.0, 64, 1.25, 0.75)
    assert mscale == 1.0
    torch.testing.assert_close(freqs, torch.tensor([10000 ** (-k / 8) / 4 for k in range(0, 8, 2)],
                                                   dtype=torch.float64))
    cos, sin = P.rotary_cos_sin(torch.tensor([0.0, 3.0]), freqs, 1.5)
    angle = 3.0 * freqs[1].item()
    assert cos[1, 2].item() == pytest.approx(1.5 * math.cos(angle), rel=1e-6) == pytest.approx(cos[1, 3].item())
    assert sin[0].abs().max() == 0 and torch.all(cos[0] == 1.5)


def test_timestep_shift_math():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    # the reference's table for Flux (base 256, max 4096 tokens, shifts 0.5 and 1.15)
    for tokens, mu in [(4096, 1.15), (9216, 2.02), (16384, 3.23), (36864, 6.70), (65536, 11.55)]:
        got = schedules.dynamic_shift_mu(tokens, 256, 4096, 0.5, 1.15)
        assert got == pytest.approx(mu, abs=0.006)
        assert got == calculate_shift(tokens, 256, 4096, 0.5, 1.15)  # same float operations
    sigma = np.linspace(1.0, 0.05, 7)
    for shift in (3.0, 6.0):
        exponential = math.exp(schedules.mu_for_shift(shift, "exponential"))
        np.testing.assert_allclose(exponential / (exponential + (1 / sigma - 1)),
                                   shift * sigma / (1 + (shift - 1) * sigma))
        linear = schedules.mu_for_shift(shift, "linear")
        np.testing.assert_allclose(linear / (linear + (1 / sigma - 1)), shift * sigma / (1 + (shift - 1) * sigma))


def position_variants(pipe) -> dict[str, PositionConfig]:
    """Named PositionConfigs to compare on `pipe`'s family; "plain" is diffusers alone.

    PixArt's "double_range" halves the model's own interpolation scale: positions span twice the
    trained range instead of being squeezed into it.
    """
    info = hires.model_info(pipe)
    encoding = info.family.position_encoding
    options: dict[str, dict[str, Any]] = {
        "rope": {f"rope_{method}": {"rope": method} for method in ("none", "interpolation", "ntk", "yarn")},
        "sincos_cropped_table": {f"table_{mode}": {"table": mode} for mode in ("interpolate", "extrapolate")},
        "sincos_interpolated": {"model_scale": {}},
    }.get("rope" if encoding in ("rope_centred", "rope_id_tables") else encoding, {})
    if encoding == "sincos_interpolated":
        own = P._find_module(getattr(pipe, info.family.denoiser_attr),
                             PatchEmbed, "patch embedding").interpolation_scale
        options["double_range"] = {"interpolation_scale": own / 2}
    if info.prediction_type == "flow":
        options.update({f"shift_{policy}": {"timestep_shift": policy} for policy in ("dynamic", "clamp", "static")})
    variants = {"plain": PositionConfig(enabled=False)}
    variants.update({name: PositionConfig(enabled=True, **values) for name, values in options.items()})
    return variants


# -- bit-identity ------------------------------------------------------------------------------------

def _variants(family, pipe):
    variants = dict(position_variants(pipe))
    if family == "flux":
        variants["yarn_wide_ramp"] = PositionConfig(enabled=True, rope="yarn", yarn_beta_fast=32, yarn_beta_slow=1)
    if family in ("flux", "sd3", "qwenimage", "zimage"):
        variants["static_6"] = PositionConfig(enabled=True, timestep_shift="static", shift=6.0)
    if family == "pixart":
        variants["scale_3"] = PositionConfig(enabled=True, interpolation_scale=3.0)
    return variants


def _module_dicts(pipe):
    return {name: sorted(m.__dict__) for name, m in pipe.transformer.named_modules()}, sorted(pipe.scheduler.__dict__)


@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_every_option_is_bit_identical_at_the_base_size_and_after_remove(family):
    pipe = build(family)
    plain_base = generate(pipe, family, 64, steps=2)
    plain_up = generate(pipe, family, 128, steps=2)
    before = _module_dicts(pipe)
    for name, config in _variants(family, pipe).items():
        hires.apply(pipe, HiresConfig(positions=config))
        assert torch.equal(generate(pipe, family, 64, steps=2), plain_base), name
        if config.enabled:
            generate(pipe, family, 256, steps=2)  # exercise the changed path before removing
        hires.remove(pipe)
        assert torch.equal(generate(pipe, family, 128, steps=2), plain_up), name
        assert _module_dicts(pipe) == before, name
    # off, with options given: nothing attached
    hires.apply(pipe, HiresConfig(positions=PositionConfig(enabled=False, timestep_shift="static", shift=9.0)))
    assert torch.equal(generate(pipe, family, 128, steps=2), plain_up)
    hires.remove(pipe)


@pytest.mark.parametrize("family", ["flux", "pixart"])
def test_above_the_base_size_options_change_the_output(family):
    pipe = build(family)
    plain = generate(pipe, family, 128, steps=2)
    options = {"flux": {"rope": "ntk", "timestep_shift": "dynamic"}, "pixart": {"interpolation_scale": 0.5}}[family]
    _apply(pipe, **options)
    assert not torch.equal(generate(pipe, family, 128, steps=2), plain)


# -- positions used inside the pipelines ----------------------------------------------------------

def _capture_patch_positions(pipe):
    """The positional table each PatchEmbed call added: (proj output + pos) - proj output."""
    module = pipe.transformer.pos_embed
    seen, projected = [], []
    h1 = module.proj.register_forward_hook(lambda m, i, o: projected.append(o.flatten(2).transpose(1, 2)))
    h2 = module.register_forward_hook(lambda m, i, o: seen.append((o - projected[-1])[0]))
    return seen, (h1, h2)


@pytest.mark.parametrize("size", [(128, 128), (256, 256), (256, 128)])
def test_pixart_uses_the_configured_interpolation_scale(size):
    pipe = build("pixart")
    module = pipe.transformer.pos_embed
    assert module.interpolation_scale == 1 and module.base_size == 4
    _apply(pipe, interpolation_scale=0.5)
    seen, handles = _capture_patch_positions(pipe)
    generate(pipe, "pixart", size, steps=2)
    [h.remove() for h in handles]
    rows, cols = size[0] // 16, size[1] // 16
    expected = _sincos_table(module.pos_embed.shape[-1], _positions_sincos(rows, 4, 0.5),
                             _positions_sincos(cols, 4, 0.5))
    default = _sincos_table(module.pos_embed.shape[-1], _positions_sincos(rows, 4, 1), _positions_sincos(cols, 4, 1))
    assert len(seen) == 2
    for table in seen:
        torch.testing.assert_close(table, expected.float(), atol=1e-5, rtol=0)
        assert (table - default.float()).abs().max() > 0.1
    assert module.interpolation_scale == 1  # set only during the call


def test_pixart_default_keeps_diffusers_positions():
    pipe = build("pixart")
    plain = generate(pipe, "pixart", 256, steps=2)
    _apply(pipe)
    assert torch.equal(generate(pipe, "pixart", 256, steps=2), plain)


def _pixart_with_bins():
    """Tiny PixArt-Sigma with sample_size 32 (256 px), which the pipeline's 256 bin table serves."""
    from diffusers import PixArtTransformer2DModel

    pipe = build("pixart")
    torch.manual_seed(0)
    pipe.transformer = PixArtTransformer2DModel.from_config({**pipe.transformer.config, "sample_size": 32}).eval()
    return pipe


def test_pixart_resolution_binning_is_refused_when_it_would_snap_the_size():
    pipe = _pixart_with_bins()
    assert hires.model_info(pipe).base_height == 256
    _apply(pipe)
    with pytest.raises(ValueError, match=r"use_resolution_binning=False.*512x512"):
        generate(pipe, "pixart", 512, steps=1, use_resolution_binning=True)
    # a request that is its own bin denoises as asked, so it runs
    generate(pipe, "pixart", 256, steps=1, use_resolution_binning=True)
    assert (hires.last_call(pipe).height, hires.last_call(pipe).width) == (256, 256)
    # what the error prevents: plain diffusers denoising at the bin and resizing
    hires.remove(pipe)
    hires.apply(pipe, HiresConfig())
    generate(pipe, "pixart", 512, steps=1, use_resolution_binning=True)
    assert hires.last_call(pipe).height == 256


@pytest.mark.parametrize("size", [(256, 256), (512, 128)])
def test_sd3_runs_past_its_table_with_the_interpolated_table(size):
    pipe = build("sd3")
    module = pipe.transformer.pos_embed
    assert module.pos_embed_max_size == 12
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        generate(pipe, "sd3", size, steps=1)  # plain diffusers refuses
    _apply(pipe)
    seen, handles = _capture_patch_positions(pipe)
    out = generate(pipe, "sd3", size, steps=2)
    [h.remove() for h in handles]
    assert out.shape[-2:] == size and torch.isfinite(out).all()
    rows, cols = size[0] // 16, size[1] // 16
    # independent: sides past 12 resampled over the whole table, sides that fit the centred crop
    expected = _resampled_table(module.pos_embed.reshape(12, 12, -1), rows, cols).reshape(rows * cols, -1)
    assert len(seen) == 2
    for table in seen:
        torch.testing.assert_close(table, expected, atol=1e-5, rtol=0)
    assert hires.last_call(pipe).notes["log.positions.table"] == ("interpolate", rows, cols, 12)


def test_sd3_extrapolated_table_continues_the_sincos_formula():
    pipe = build("sd3")
    module = pipe.transformer.pos_embed
    _apply(pipe, table="extrapolate")
    seen, handles = _capture_patch_positions(pipe)
    generate(pipe, "sd3", 256, steps=2)
    [h.remove() for h in handles]
    step = module.base_size / 12 / module.interpolation_scale  # table index j sits at j * base / side
    positions = [j * step for j in range(-2, 14)]
    expected = _sincos_table(module.pos_embed.shape[-1], positions, positions).float()
    for table in seen:
        torch.testing.assert_close(table, expected, atol=1e-5, rtol=0)


def test_sd3_within_the_table_is_diffusers_crop():
    pipe = build("sd3")
    plain = generate(pipe, "sd3", 192, steps=2)
    _apply(pipe, table="extrapolate")
    assert torch.equal(generate(pipe, "sd3", 192, steps=2), plain)


def test_sd3_extrapolation_refuses_a_table_that_is_not_the_formula():
    pipe = build("sd3")
    with torch.no_grad():
        pipe.transformer.pos_embed.pos_embed.add_(0.05 * torch.randn_like(pipe.transformer.pos_embed.pos_embed))
    before = _module_dicts(pipe)
    with pytest.raises(ValueError, match="table='interpolate'"):
        _apply(pipe, table="extrapolate")
    assert not hires.is_applied(pipe) and _module_dicts(pipe) == before
    _apply(pipe, table="interpolate")  # any table can be resampled
    generate(pipe, "sd3", 256, steps=1)


def _flux_expected(method, ids, axes_dim, scales, base_length, fast=1.25, slow=0.75, theta=10000.0):
    """cos, sin per token written out per axis (axis 0 and unscaled axes plain)."""
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dim):
        s = scales[axis]
        cos_cols, sin_cols = [], []
        for k in range(dim // 2):
            freq = theta ** (-2 * k / dim)
            m = 1.0
            if s > 1:
                if method == "interpolation":
                    freq = freq / s
                elif method == "ntk":
                    freq = (theta * s ** (dim / (dim - 2))) ** (-2 * k / dim)
                else:
                    r = base_length * freq / (2 * math.pi)
                    keep = 0.0 if r < slow else 1.0 if r > fast else (r - slow) / (fast - slow)
                    freq = keep * freq + (1 - keep) * freq / s
                    m = 0.1 * math.log(s) + 1
            angle = ids[:, axis].double() * freq
            cos_cols += [m * angle.cos()] * 2
            sin_cols += [m * angle.sin()] * 2
        cos_parts.append(torch.stack(cos_cols, dim=1))
        sin_parts.append(torch.stack(sin_cols, dim=1))
    return torch.cat(cos_parts, dim=1).float(), torch.cat(sin_parts, dim=1).float()


@pytest.mark.parametrize("method", ["interpolation", "ntk", "yarn"])
@pytest.mark.parametrize("size", [(128, 128), (256, 256), (256, 64)])
def test_flux_rotary_positions_are_the_configured_ones(method, size):
    pipe = build("flux")
    module = pipe.transformer.pos_embed
    plain_seen = []
    handle = module.register_forward_hook(lambda m, i, o: plain_seen.append((i[0], o)))
    generate(pipe, "flux", size, steps=1)
    options = {"rope": method}
    if method == "yarn":  # a ramp the tiny model's 4-position grid reaches (its fastest axis turns 0.64 times)
        options.update(yarn_beta_fast=0.5, yarn_beta_slow=0.01)
    _apply(pipe, **options)
    seen = []
    handle.remove()
    handle = module.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    generate(pipe, "flux", size, steps=2)
    handle.remove()
    scales = (1.0, size[0] / 64, size[1] / 64)
    assert len(seen) == 2
    ids, (cos, sin) = seen[0]
    expected_cos, expected_sin = _flux_expected(method, ids, module.axes_dim, scales, 4,
                                                fast=options.get("yarn_beta_fast", 1.25),
                                                slow=options.get("yarn_beta_slow", 0.75))
    torch.testing.assert_close(cos, expected_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, expected_sin, atol=1e-6, rtol=0)
    assert torch.equal(seen[1][1][0], cos) and torch.equal(seen[1][1][1], sin)  # the second step reuses them
    plain_cos, plain_sin = plain_seen[0][1]
    axis0 = module.axes_dim[0]
    assert torch.equal(cos[:, :axis0], plain_cos[:, :axis0]) and torch.equal(sin[:, :axis0], plain_sin[:, :axis0])
    assert not torch.equal(cos, plain_cos)
    if size[1] == 64:  # the width is at its base: the column axis keeps diffusers' values
        assert torch.equal(cos[:, -module.axes_dim[2]:], plain_cos[:, -module.axes_dim[2]:])
    used = hires.last_call(pipe).notes["log.positions.rope"]
    assert used[0] == method and [a for a, _, _ in used[1]] == [i for i in (1, 2) if scales[i] > 1]


# -- timestep shift --------------------------------------------------------------------------------

def _expected_sigmas(steps, shift):
    sigma = np.linspace(1.0, 1 / steps, steps)
    return shift * sigma / (1 + (shift - 1) * sigma)


@pytest.mark.parametrize("policy,shift", [("dynamic", None), ("clamp", None), ("static", None), ("static", 6.0)])
def test_flux_timestep_shift_policy(policy, shift):
    pipe = build("flux")
    _apply(pipe, rope="none", timestep_shift=policy, shift=shift)
    steps = 4
    generate(pipe, "flux", 256, steps=steps)  # 256 tokens: diffusers' mu = 1.15; base (16 tokens): 0.5
    exponent = {"dynamic": 1.15, "clamp": 0.5, "static": 0.5 if shift is None else math.log(6.0)}[policy]
    np.testing.assert_allclose(pipe.scheduler.sigmas[:-1].numpy(),
                               _expected_sigmas(steps, math.exp(exponent)), rtol=1e-5)
    notes = hires.last_call(pipe).notes
    if policy != "dynamic":
        assert notes["log.positions.timestep_shift"]["applied_mu"] == pytest.approx(exponent)
    # at the base size every policy leaves diffusers' schedule alone
    generate(pipe, "flux", 64, steps=steps)
    np.testing.assert_allclose(pipe.scheduler.sigmas[:-1].numpy(), _expected_sigmas(steps, math.exp(0.5)), rtol=1e-5)


def test_sd3_static_shift_on_a_static_scheduler_is_restored_after_the_call():
    pipe = build("sd3")
    assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.shift == 3.0
    _apply(pipe, timestep_shift="static", shift=6.0)
    generate(pipe, "sd3", 128, steps=4)
    # SD3's pipeline passes no sigmas: the scheduler spaces its own range [sigma_min, 1], where its init
    # already shifted sigma_min = 1/1000 by 3, then shifts by the shift in force
    sigma_min = 3.0 * 0.001 / (1 + 2.0 * 0.001)
    unshifted = np.linspace(1.0, sigma_min, 4)
    np.testing.assert_allclose(pipe.scheduler.sigmas[:-1].numpy(), 6 * unshifted / (1 + 5 * unshifted), rtol=1e-5)
    assert pipe.scheduler.shift == 3.0
    _apply(pipe)  # clamp: a static scheduler shift does not grow, so nothing changes
    generate(pipe, "sd3", 128, steps=4)
    np.testing.assert_allclose(pipe.scheduler.sigmas[:-1].numpy(), 3 * unshifted / (1 + 2 * unshifted), rtol=1e-5)


def test_replacing_the_scheduler_after_apply_is_an_error():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = build("flux")
    _apply(pipe)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(RuntimeError, match="hires.apply"):
        generate(pipe, "flux", 128, steps=1)


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_positions_on_a_unet_family_is_an_error(family):
    pipe = build(family)
    with pytest.raises(ValueError, match="PositionConfig.*UNet"):
        _apply(pipe)
    assert not hires.is_applied(pipe)


@pytest.mark.parametrize("family,options,match", [
    ("sd3", {"rope": "ntk"}, r"PositionConfig.rope='ntk' does not apply to family 'sd3'"),
    ("flux", {"table": "extrapolate"}, r"PositionConfig.table='extrapolate' does not apply to family 'flux'"),
    ("flux", {"interpolation_scale": 2.0}, r"PositionConfig.interpolation_scale=2.0 does not apply"),
    ("pixart", {"timestep_shift": "clamp"},
     r"PositionConfig.timestep_shift='clamp' does not apply to family 'pixart'.*flow"),
    ("flux", {"rope": "ntk", "yarn_beta_fast": 4.0}, r"act only with rope='yarn'"),
    ("flux", {"yarn_beta_fast": 1.0, "yarn_beta_slow": 2.0}, r"yarn_beta_fast > yarn_beta_slow"),
])
def test_options_that_do_not_apply_are_errors(family, options, match):
    pipe = build(family)
    with pytest.raises(ValueError, match=match):
        _apply(pipe, **options)
    assert not hires.is_applied(pipe)
    assert not any(n.startswith(HOOK_PREFIX) for m in pipe.transformer.modules()
                   for n in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}))


# -- composition with offload, real sizes, testbed variants -----------------------------------------

@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("order", ["offload_then_apply", "apply_then_offload"])
def test_model_cpu_offload_before_or_after_apply(family, order):
    reference = build(family)
    _apply(reference)
    expected = generate(reference, family, 256, steps=2)
    plain = generate(build(family), family, 128, steps=2)
    pipe = build(family)
    if order == "offload_then_apply":
        pipe.enable_model_cpu_offload(device="cpu")
        _apply(pipe)
    else:
        _apply(pipe)
        pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(generate(pipe, family, 256, steps=2), expected)
    hires.remove(pipe)
    assert torch.equal(generate(pipe, family, 128, steps=2), plain)


def test_sd3_tables_at_real_sizes():
    # SD3-Medium / SD3.5-Large: a 192-patch table, 128-patch base (1024 px), patch 2, VAE 8 -> 16 px a patch.
    side, base, dim = 192, 64, 8
    table = P.sincos_2d_embedding(dim, P.sincos_positions(side, base, 1.0), P.sincos_positions(side, base, 1.0))[None]
    for pixels in (3072, 4096, 8192):
        patches = pixels // 16
        for built in (P.interpolate_table(table, side, patches, patches),
                      P.extrapolate_table(dim, side, base, 1.0, patches, patches)):
            assert built.shape == (1, patches * patches, dim) and torch.isfinite(built).all()
    # at the table's own size both meet diffusers' crop (the whole table)
    assert torch.equal(P.interpolate_table(table, side, side, side), table)
    torch.testing.assert_close(P.extrapolate_table(dim, side, base, 1.0, side, side), table, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family,names", [
    ("pixart", {"plain", "model_scale", "double_range"}),
    ("sd3", {"plain", "table_interpolate", "table_extrapolate", "shift_dynamic", "shift_clamp", "shift_static"}),
    ("flux", {"plain", "rope_none", "rope_interpolation", "rope_ntk",
              "rope_yarn", "shift_dynamic", "shift_clamp", "shift_static"}),
    ("qwenimage", {"plain", "rope_none", "rope_interpolation", "rope_ntk", "rope_yarn", "shift_dynamic", "shift_clamp",
                   "shift_static"}),
    ("zimage", {"plain", "rope_none", "rope_interpolation", "rope_ntk", "rope_yarn", "shift_dynamic", "shift_clamp",
                "shift_static"}),
])
def test_position_variants_cover_every_option_of_the_encoding(family, names):
    pipe = build(family)
    variants = position_variants(pipe)
    assert set(variants) == names and not variants["plain"].enabled
    if family == "pixart":
        assert variants["double_range"].interpolation_scale == pipe.transformer.pos_embed.interpolation_scale / 2
