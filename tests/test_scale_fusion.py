"""Scale fusion (FreeScale): the blur, the window layout and the fused attention against explicit
softmax formulations; tiny pipelines of every family; bit-identity at the base size, off and removed."""

import math

import pytest
import torch

import hires
import hires.families
from hires.techniques.scale_fusion import fusion as S
from test_attention import _LargestOutput, _latents
from tiny_models import FAMILY_NAMES, build, generate

FUSION = hires.ScaleFusionConfig(enabled=True)


def _explicit_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in float64, (batch, heads, tokens, dim): the reference only."""
    q, k, v = (t.double() for t in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _dense_blur(tokens, grid, size, sigma):
    """The Gaussian over the grid as one explicit 2D kernel: out[r, c] = sum w(dr) w(dc) x[r+dr, c+dc],
    taps outside the grid are zero."""
    rows, cols = grid
    half = size // 2
    taps = torch.tensor([math.exp(-(i - half) ** 2 / (2 * sigma**2)) for i in range(size)], dtype=torch.float64)
    taps = taps / taps.sum()
    x = tokens.double().unflatten(-2, grid)
    out = torch.zeros_like(x)
    for dr in range(-half, half + 1):
        for dc in range(-half, half + 1):
            weight = taps[dr + half] * taps[dc + half]
            for r in range(rows):
                for c in range(cols):
                    if 0 <= r + dr < rows and 0 <= c + dc < cols:
                        out[..., r, c, :] += weight * x[..., r + dr, c + dc, :]
    return out.flatten(-3, -2)


def _qkv(tokens, seed=0, batch=2, heads=2, dim=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, tokens, dim, generator=g) for _ in range(3)]


# -- math ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,size,sigma", [((6, 5), 3, 1.0), ((7, 9), 5, 1.0), ((4, 4), 7, 0.7), ((3, 3), 1, 1.0)])
def test_blur_equals_the_dense_2d_gaussian_with_zero_padding(grid, size, sigma):
    x = torch.randn(2, 3, grid[0] * grid[1], 4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(S.blur_grid(x, grid, size, sigma).double(), _dense_blur(x, grid, size, sigma), atol=1e-5)


def test_kernel_side_is_two_times_the_scale_minus_one():
    assert S.blur_kernel_size((16, 16), (8, 8)) == 3  # 2x: FreeScale's kernel 3
    assert S.blur_kernel_size((32, 16), (8, 8)) == 7  # 4x on the long side
    assert S.blur_kernel_size((12, 12), (8, 8)) == 3  # 1.5x rounds up
    assert S.gaussian_kernel(3, 1.0).tolist() == pytest.approx([0.2741, 0.4519, 0.2741], abs=1e-4)


@pytest.mark.parametrize("length,window", [(16, 8), (17, 8), (24, 8), (9, 8), (8, 8), (5, 8), (40, 6)])
def test_window_layout_is_freescales_and_covers_every_token(length, window):
    starts = S.window_starts(length, window)
    stride = window // 2
    if length > window:  # FreeScale's get_views: int((L - w) / stride - 1e-6) + 2 windows
        assert len(starts) == int((length - window) / stride - 1e-6) + 2
        assert starts[:-1] == [i * stride for i in range(len(starts) - 1)] and starts[-1] == length - window
    else:
        assert starts == [0]
    jittered = S.window_starts(length, window, max(window // 8, 1), torch.Generator().manual_seed(3))
    for plain_start, start in zip(starts, jittered):
        assert abs(plain_start - start) <= max(window // 8, 1) and 0 <= start <= max(length - window, 0)
    for layout in (starts, jittered):
        covered = torch.zeros(length, dtype=torch.bool)
        for start in layout:
            covered[start:start + window] = True
        assert covered.all()
    assert jittered == S.window_starts(length, window, max(window // 8, 1), torch.Generator().manual_seed(3))


def test_interior_windows_jitter_with_the_seed():
    layouts = {tuple(S.window_starts(64, 16, 2, torch.Generator().manual_seed(seed))) for seed in range(8)}
    assert len(layouts) > 1
    assert all(layout[0] == 0 and layout[-1] == 48 for layout in layouts)  # edge windows stay on the edges


def _reference_local(q, k, v, grid, window, row_starts, col_starts, image_start, image_end):
    rows, cols = grid
    text = list(range(image_start)) + list(range(image_end, q.shape[2]))
    total = torch.zeros(*q.shape[:2], rows * cols, v.shape[-1], dtype=torch.float64)
    count = torch.zeros(rows * cols, dtype=torch.float64)
    for r0 in row_starts:
        for c0 in col_starts:
            cells = [image_start + r * cols + c for r in range(r0, r0 + window[0]) for c in range(c0, c0 + window[1])]
            keys = cells + text
            out = _explicit_attention(q[:, :, cells], k[:, :, keys], v[:, :, keys])
            index = torch.tensor(cells) - image_start
            total[:, :, index] += out
            count[index] += 1
    return total / count[:, None]


@pytest.mark.parametrize("text_before,text_after", [(0, 0), (3, 0), (0, 2)])
def test_local_branch_equals_per_window_softmax_averaged_over_overlaps(text_before, text_after):
    grid, window = (7, 6), (4, 4)
    tokens = text_before + grid[0] * grid[1] + text_after
    q, k, v = _qkv(tokens)
    rows, cols = S.window_starts(7, 4, 1, torch.Generator().manual_seed(0)), S.window_starts(6, 4)
    out = S.local_attention(q, k, v, grid, window, rows, cols, image_start=text_before)
    expected = _reference_local(q, k, v, grid, window, rows, cols, text_before, text_before + 42)
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_dilated_global_branch_equals_per_subgrid_softmax():
    grid, dilation, text = (6, 5), (2, 2), 3
    q, k, v = _qkv(text + 30, seed=4)
    out = S.dilated_attention(q, k, v, grid, dilation, image_start=text)
    expected = torch.zeros(*q.shape[:2], 30, v.shape[-1], dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            cells = [text + r * 5 + c for r in range(i, 6, 2) for c in range(j, 5, 2)]
            keys = cells + list(range(text))
            expected[:, :, torch.tensor(cells) - text] = _explicit_attention(q[:, :, cells], k[:, :, keys],
                                                                             v[:, :, keys])
    assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("dilated", [False, True])
@pytest.mark.parametrize("text_before,text_after", [(0, 0), (4, 0), (0, 3)])
def test_fused_attention_is_blurred_local_plus_the_globals_high_band(dilated, text_before, text_after):
    grid, window = (8, 8), (4, 4)
    image_end = text_before + 64
    q, k, v = _qkv(image_end + text_after, seed=2)
    rows = cols = S.window_starts(8, 4)
    kernel = S.blur_kernel_size(grid, window)
    out = S.fused_attention(q, k, v, grid, window, rows, cols, kernel, 1.0, dilation=(2, 2) if dilated else None,
                            image_start=text_before)
    full = _explicit_attention(q, k, v)
    if dilated:
        global_image = S.dilated_attention(q, k, v, grid, (2, 2), image_start=text_before).double()
    else:
        global_image = full[:, :, text_before:image_end]
    local = _reference_local(q, k, v, grid, window, rows, cols, text_before, image_end)
    fused = _dense_blur(local, grid, kernel, 1.0) + (global_image - _dense_blur(global_image, grid, kernel, 1.0))
    expected = torch.cat([full[:, :, :text_before], fused, full[:, :, image_end:]], dim=2)
    assert torch.allclose(out.double(), expected, atol=1e-5)


# -- tiny pipelines ------------------------------------------------------------------------------

def _fusable(name):
    family = next(f for f in hires.families.FAMILIES if f.name == name)
    return not family.attention_unsupported and not getattr(family, "attention_masked", False)


@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if _fusable(f)])
def test_fusion_changes_the_image_above_the_base_size_only_and_is_removed_exactly(family):
    pipe = build(family)
    plain, plain_base = generate(pipe, family, 128), generate(pipe, family, 64)
    hires.apply(pipe, hires.HiresConfig())
    assert torch.equal(generate(pipe, family, 128), plain)
    hires.apply(pipe, hires.HiresConfig(scale_fusion=FUSION))
    assert torch.equal(generate(pipe, family, 64), plain_base)  # base size: no layer exceeds its base grid
    assert S.LOG_FUSION not in hires.last_call(pipe).notes
    fused = generate(pipe, family, 128)
    layers = hires.last_call(pipe).notes[S.LOG_FUSION]
    assert not torch.equal(fused, plain)
    assert layers and all(entry["windows"] == 9 and entry["kernel"] == 3 for entry in layers.values())
    assert torch.equal(generate(pipe, family, 128), fused)  # same seed, same image
    hires.remove(pipe)
    assert torch.equal(generate(pipe, family, 128), plain)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_fast_mode_runs_the_dilated_global_branch(family):
    pipe = build(family)
    hires.apply(pipe, hires.HiresConfig(scale_fusion=FUSION))
    full = generate(pipe, family, 128)
    hires.apply(pipe, hires.HiresConfig(scale_fusion=hires.ScaleFusionConfig(enabled=True, global_branch="dilated")))
    fast = generate(pipe, family, 128)
    assert not torch.equal(fast, full)
    assert all(e["dilation"] == (2, 2) for e in hires.last_call(pipe).notes[S.LOG_FUSION].values())


def test_unet_cross_attention_is_left_alone():
    pipe = build("sd15")
    hires.apply(pipe, hires.HiresConfig(scale_fusion=FUSION))
    generate(pipe, "sd15", 128)
    layers = hires.last_call(pipe).notes[S.LOG_FUSION]
    assert layers and all(name.endswith("attn1") for name in layers)


def test_composes_with_entropy_scaling_and_structure_guidance():
    pipe = build("sd15")
    hires.apply(pipe, hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True)))
    guided = generate(pipe, "sd15", 128, steps=4)
    hires.apply(pipe, hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True),
                                        scale_fusion=FUSION, entropy_scaling=hires.EntropyScalingConfig(enabled=True)))
    assert not torch.equal(generate(pipe, "sd15", 128, steps=4), guided)


@pytest.mark.parametrize("family,size", [("sd15", 256), ("flux", 768)])
def test_no_attention_matrix_is_materialised(family, size):
    pipe = build(family)
    hires.apply(pipe, hires.HiresConfig(scale_fusion=FUSION))
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    heads = max(m.heads for m in denoiser.modules() if hasattr(m, "heads"))
    tokens = (size // 8) ** 2 if family == "sd15" else (size // 16) ** 2 + 16
    batch = 2 if family == "sd15" else 1
    recorder = _LargestOutput()
    with recorder:
        _latents(pipe, family, size)
    assert hires.last_call(pipe).notes[S.LOG_FUSION]
    assert recorder.largest * 16 < batch * heads * tokens**2, recorder.largest


# -- validation -------------------------------------------------------------------------------------

def test_bad_values_name_the_parameter_and_what_works():
    with pytest.raises(ValueError, match="global_branch='fast'.*'full', 'dilated'"):
        hires.ScaleFusionConfig(global_branch="fast")
    with pytest.raises(ValueError, match="window=1 must be an int >= 2"):
        hires.ScaleFusionConfig(window=1)
    with pytest.raises(TypeError, match="window"):
        hires.ScaleFusionConfig(window=2.5)
    with pytest.raises(ValueError, match="blur_sigma=0"):
        hires.ScaleFusionConfig(blur_sigma=0)
    with pytest.raises(ValueError, match="WindowAttentionConfig"):
        hires.apply(build("sd15"), hires.HiresConfig(scale_fusion=FUSION,
                                                     window_attention=hires.WindowAttentionConfig(enabled=True)))


def test_a_non_torch_attention_backend_is_refused():
    with pytest.raises(ValueError, match="scale_fusion"):
        hires.apply(build("flux"), hires.HiresConfig(
            scale_fusion=FUSION, attention_backend=hires.AttentionBackendConfig(enabled=True, backend="flex")))


def test_a_window_as_large_as_the_grid_gives_plain_attention():
    """Local and global branches then agree, and global + G(local - global) is the global output."""
    pipe = build("sd15")
    plain = generate(pipe, "sd15", 128)
    hires.apply(pipe, hires.HiresConfig(scale_fusion=hires.ScaleFusionConfig(enabled=True, window=64)))
    assert torch.allclose(generate(pipe, "sd15", 128), plain, atol=1e-5)


def test_blur_of_a_constant_is_attenuated_only_at_the_border():
    x = torch.ones(1, 1, 36, 2)
    out = S.blur_grid(x, (6, 6), 3, 1.0).unflatten(2, (6, 6))
    assert torch.allclose(out[0, 0, 1:-1, 1:-1], torch.ones(4, 4, 2), atol=1e-6)
    assert (out[0, 0, 0] < 1).all()


def test_half_precision_inputs_keep_their_dtype_and_the_float32_result():
    q, k, v = (t.bfloat16() for t in _qkv(64 + 3, seed=6))
    starts = S.window_starts(8, 4)
    out = S.fused_attention(q, k, v, (8, 8), (4, 4), starts, starts, 3, 1.0, image_start=3)
    reference = S.fused_attention(q.float(), k.float(), v.float(), (8, 8), (4, 4), starts, starts, 3, 1.0,
                                  image_start=3)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=2e-2)
