"""Tiled VAE with whole-image GroupNorm statistics: its math, its equality with the untiled VAE,
its effect inside tiny pipelines of every family, and bit-identity when off or removed."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hires
import tiny_models
from hires.config import HiresConfig, MemoryConfig, VAETilingConfig
from hires.techniques.memory import tiled_vae

# float32 tolerance: differences come only from summation order (per-tile convolutions, our
# GroupNorm in float32 vs torch's fused kernel); relative to the output's largest magnitude.
REL_TOL = 2e-5


def photo(side: int = 96) -> torch.Tensor:
    """scikit-image's astronaut photograph, resized to side x side, in [-1, 1], NCHW."""
    from skimage import data

    image = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1)[None].float() / 127.5 - 1
    return F.interpolate(image, size=(side, side), mode="area")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- math on small tensors against independent formulations ------------------------------------
def test_tile_statistics_match_whole_tensor_statistics():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 13, 11) * 3 + 5  # offset mean: Chan's combination must not cancel
    stats = tiled_vae._TileStatistics()
    for rows in (slice(0, 4), slice(4, 13)):
        for cols in (slice(0, 7), slice(7, 11)):
            stats.add(x[..., rows, cols], groups=4)
    mean, variance = stats.finish()
    grouped = x.reshape(2, 4, -1).double()
    assert torch.allclose(mean.double(), grouped.mean(-1), atol=1e-5)
    assert torch.allclose(variance.double(), grouped.var(-1, unbiased=False), rtol=1e-5)


def test_group_norm_with_whole_statistics_is_group_norm():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 5)
    weight, bias = torch.randn(8), torch.randn(8)
    grouped = x.reshape(2, 4, -1)
    mean, variance = grouped.mean(-1), grouped.var(-1, unbiased=False)
    ours = tiled_vae.group_norm_with_statistics(x, 4, mean, variance, weight, bias, 1e-6)
    assert torch.allclose(ours, F.group_norm(x, 4, weight, bias, 1e-6), atol=1e-5)


def test_halo_is_the_receptive_field_of_each_segment():
    vae = tiny_models.make_vae()
    _, units = tiled_vae.decoder_plan(vae.decoder)
    segments = tiled_vae.group_units(units, "unit")
    # In segment-input pixels: resnet (two 3x3 convs) 2; upsampler (3x3 conv at twice the
    # resolution: 1 input px) + resnet (2 px at twice the resolution: 1 input px) 2; head (conv_out) 1.
    # Tiny VAE: 2 resnets per up block, upsamplers on the first three blocks.
    assert [s.halo for s in segments] == [2, 2, 2, 2, 2, 2, 2, 2, 1]
    assert [str(s.scale) for s in segments] == ["1", "1", "2", "1", "2", "1", "2", "1", "1"]


# -- equality with the untiled VAE -------------------------------------------------------------
@pytest.mark.parametrize("grouping", ["unit", "level"])
@pytest.mark.parametrize("tile", [3, 5, 8])
def test_tiled_decode_equals_untiled_decode(grouping, tile):
    vae = tiny_models.make_vae()
    torch.manual_seed(1)
    z = torch.randn(2, 4, 16, 12)
    with torch.no_grad():
        expected = vae.decode(z).sample
        ours = tiled_vae.tiled_decode(vae, z, tile_size=tile, grouping=grouping)
    assert ours.shape == expected.shape
    assert relative_error(ours, expected) < REL_TOL


@pytest.mark.parametrize("grouping", ["unit", "level"])
def test_tiled_encode_equals_untiled_encode_on_a_photograph(grouping):
    vae = tiny_models.make_vae()
    x = photo(96)
    with torch.no_grad():
        expected = vae._encode(x)
        ours = tiled_vae.tiled_encode(vae, x, tile_size=4, grouping=grouping)
    assert relative_error(ours, expected) < REL_TOL


def test_photograph_round_trip_matches_untiled_and_diffusers_tiling_does_not():
    vae = tiny_models.make_vae()
    with torch.no_grad():
        z = vae.encode(photo(128)).latent_dist.mean
        expected = vae.decode(z).sample
        ours = tiled_vae.tiled_decode(vae, z, tile_size=8)
        vae.enable_tiling()  # tiles of sample_size / 8 = 8 latent px, like ours, overlapping by 25%
        theirs = vae.decode(z).sample
        vae.disable_tiling()
    assert relative_error(ours, expected) < REL_TOL
    # Per-tile GroupNorm statistics: far outside float32 tolerance (shows the comparison can fail).
    assert relative_error(theirs, expected) > 100 * REL_TOL


def test_too_small_a_halo_breaks_equality():
    vae = tiny_models.make_vae()
    torch.manual_seed(1)
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        expected = vae.decode(z).sample
        no_halo = tiled_vae.tiled_decode(vae, z, tile_size=4, halo=0)
    assert relative_error(no_halo, expected) > 100 * REL_TOL


def test_no_seam_across_tile_borders():
    """Seam measure: mean |difference between neighbouring output columns| across tile borders
    vs inside tiles, relative to the same for the untiled decode (1 = no seam)."""
    vae = tiny_models.make_vae()
    with torch.no_grad():
        z = vae.encode(photo(128)).latent_dist.mean
        expected = vae.decode(z).sample
        ours = tiled_vae.tiled_decode(vae, z, tile_size=4)
    border_cols = torch.arange(4 * 8, ours.shape[-1], 4 * 8)  # first column of each tile

    def jumps(image):
        step = (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1, 2))
        at_border = step[border_cols - 1].mean()
        inside = step[[c for c in range(step.shape[0]) if c + 1 not in set(border_cols.tolist())]].mean()
        return at_border, inside

    ours_border, ours_inside = jumps(ours)
    ref_border, ref_inside = jumps(expected)
    assert abs(float(ours_border / ref_border) - 1) < 1e-4
    assert abs(float(ours_inside / ref_inside) - 1) < 1e-4


# -- inside tiny pipelines -----------------------------------------------------------------------
@pytest.fixture
def count_tiled(monkeypatch):
    calls = {"segments": 0}
    original = tiled_vae.run_segment

    def counting(*args, **kwargs):
        calls["segments"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(tiled_vae, "run_segment", counting)
    return calls


def test_tiled_decode_inside_every_family_and_remove_is_bit_identical(family, count_tiled):
    pipe = tiny_models.build(family)
    if hires.model_info(pipe).family.vae.untileable:  # Qwen-Image's causal 3D VAE, Qwen-Image 2.1's: refused
        with pytest.raises(ValueError,
                           match=r"VAETilingConfig\(enabled=True\) does not apply to family.*VAE \(AutoencoderKLQwen"):
            hires.apply(pipe, HiresConfig(vae_tiling=VAETilingConfig(enabled=True, mode="always", tile_size=3)))
        assert not hires.is_applied(pipe) and not hasattr(pipe.vae, "_diffusers_hook")
        return
    plain = tiny_models.generate(pipe, family, size=64, steps=2)
    hires.apply(pipe, HiresConfig(vae_tiling=VAETilingConfig(enabled=True, mode="always", tile_size=3)))
    tiled = tiny_models.generate(pipe, family, size=64, steps=2)
    assert count_tiled["segments"] > 0
    assert relative_error(tiled, plain) < REL_TOL
    hires.remove(pipe)
    assert "_decode" not in pipe.vae.__dict__ and "_encode" not in pipe.vae.__dict__
    assert not hasattr(pipe.vae, "_diffusers_hook")
    assert torch.equal(tiny_models.generate(pipe, family, size=64, steps=2), plain)


def test_mode_never_and_disabled_are_bit_identical(count_tiled):
    pipe = tiny_models.build("sdxl")
    plain = tiny_models.generate(pipe, "sdxl", size=64, steps=2)
    for config in (VAETilingConfig(enabled=True, mode="never"), VAETilingConfig(enabled=False)):
        hires.apply(pipe, HiresConfig(vae_tiling=config))
        assert torch.equal(tiny_models.generate(pipe, "sdxl", size=64, steps=2), plain)
    assert count_tiled["segments"] == 0


def test_encode_through_the_installed_hook():
    pipe = tiny_models.build("sd15")
    x = photo(64)
    with torch.no_grad():
        expected = pipe.vae.encode(x).latent_dist.mean
        hires.apply(pipe, HiresConfig(vae_tiling=VAETilingConfig(enabled=True, mode="always", tile_size=2)))
        ours = pipe.vae.encode(x).latent_dist.mean
        hires.remove(pipe)
        again = pipe.vae.encode(x).latent_dist.mean
    assert relative_error(ours, expected) < REL_TOL
    assert torch.equal(again, expected)


def test_auto_mode_tiles_only_when_the_untiled_decode_does_not_fit(count_tiled):
    from hires.techniques.memory import estimate as memory_planner

    pipe = tiny_models.build("sd15")
    latent = (1, 4, 16, 16)
    cpu = dict(device_type="cpu")  # the VAE decodes on the CPU here, as the auto mode plans it
    untiled = memory_planner.vae_peak_bytes(pipe.vae, "decode", latent, torch.float32, tiled=False, **cpu)
    tiled = memory_planner.vae_peak_bytes(pipe.vae, "decode", latent, torch.float32, tiled=True, tile_size=4, **cpu)
    least = memory_planner.vae_peak_bytes(pipe.vae, "decode", latent, torch.float32, tiled=True, tile_size=4,
                                          grouping="level", **cpu)
    assert least <= tiled < untiled
    weights = memory_planner.module_bytes(pipe.vae)
    z = torch.randn(latent)
    with torch.no_grad():
        expected = pipe.vae.decode(z).sample
        for budget, should_tile in ((weights + 2 * untiled, False), (weights + (tiled + untiled) // 2, True)):
            count_tiled["segments"] = 0
            config = HiresConfig(vae_tiling=VAETilingConfig(enabled=True, mode="auto", tile_size=4),
                                 memory=MemoryConfig(enabled=True, max_memory=budget))
            hires.apply(pipe, config)
            out = pipe.vae.decode(z).sample
            assert (count_tiled["segments"] > 0) == should_tile
            assert relative_error(out, expected) < REL_TOL
        hires.apply(pipe, HiresConfig(vae_tiling=VAETilingConfig(enabled=True, mode="auto", tile_size=4),
                                      memory=MemoryConfig(enabled=True, max_memory=weights + least // 2)))
        with pytest.raises(memory_planner.MemoryBudgetError, match="needs"):
            pipe.vae.decode(z)
    hires.remove(pipe)


# -- the memory-lean parts: chunked-query attention, whole tensors held in bfloat16 ---------------
def test_lean_attention_equals_the_processor_and_the_formula():
    vae = tiny_models.make_vae()
    attn = vae.decoder.mid_block.attentions[0]
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 7)
    with torch.no_grad():
        ours = tiled_vae.lean_attention(attn, x, query_chunk=10)  # 63 tokens: 7 chunks, the last short
        theirs = attn(x)
        # softmax(q k^T / sqrt(d)) v, one head per `attn.heads`, written out
        tokens = F.group_norm(x.flatten(2), attn.group_norm.num_groups, attn.group_norm.weight,
                              attn.group_norm.bias, attn.group_norm.eps).transpose(1, 2)
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        d = q.shape[-1] // attn.heads
        heads = [torch.softmax(q[..., i * d:(i + 1) * d] @ k[..., i * d:(i + 1) * d].transpose(1, 2) / d**0.5, -1)
                 @ v[..., i * d:(i + 1) * d] for i in range(attn.heads)]
        formula = (attn.to_out[0](torch.cat(heads, -1)).transpose(1,
                                                                  2).reshape(x.shape) + x) / attn.rescale_output_factor
    assert relative_error(ours, theirs) < REL_TOL
    assert relative_error(ours, formula) < REL_TOL


def test_lean_parts_hold_less_than_the_stock_mid_block(monkeypatch):
    from hires.techniques.memory import estimate as memory_planner

    monkeypatch.setattr(tiled_vae, "ATTENTION_QUERY_CHUNK", 1024)  # 16 chunks, as 2**16 at SDXL's 8192 px
    vae = memory_planner.meta_copy(tiny_models.make_vae(), torch.float32)
    h = torch.empty(1, 16, 128, 128, device="meta")
    mid = vae.decoder.mid_block
    stock = memory_planner.meta_peak_bytes(lambda: mid(h, None), "cuda")
    lean = memory_planner.meta_peak_bytes(lambda: tiled_vae._mid_block(mid, h, 16), "cuda")
    assert lean < 0.8 * stock


@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_bfloat16_held_tiles_stay_close_to_the_float32_tiled_pass(kind):
    """Only the tensors held whole between segments are rounded to bfloat16 (8 significant bits);
    every tile computes in float32, so the error stays near bfloat16's rounding of the output."""
    vae = tiny_models.make_vae()
    with torch.no_grad():
        z = vae.encode(photo(128)).latent_dist.mean
        run = tiled_vae.tiled_decode if kind == "decode" else tiled_vae.tiled_encode
        x = z if kind == "decode" else photo(128)
        exact = run(vae, x, tile_size=4, grouping="level")
        held = run(vae, x, tile_size=4, grouping="level", storage_dtype=torch.bfloat16)
        rounded = exact.to(torch.bfloat16).float()  # the error of storing the output alone in bfloat16
    assert held.dtype == torch.float32
    error = relative_error(held, exact)
    assert 0 < error < 8 * relative_error(rounded, exact) + 1e-3
    assert error < 2e-2
    with pytest.raises(ValueError, match="storage_dtype=torch.float16 must be None"):
        run(vae, x, tile_size=4, storage_dtype=torch.float16)


def test_bfloat16_held_tiles_are_estimated_smaller():
    from hires.techniques.memory import estimate as memory_planner

    vae = tiny_models.make_vae()
    for kind, shape in (("decode", (1, 4, 64, 64)), ("encode", (1, 3, 512, 512))):
        exact = memory_planner.vae_peak_bytes(vae, kind, shape, torch.float32,
                                              tiled=True, tile_size=8, grouping="level")
        held = memory_planner.vae_peak_bytes(vae, kind, shape, torch.float32,
                                             tiled=True, tile_size=8, grouping="level",
                                             storage=torch.bfloat16)
        assert held < 0.9 * exact
