"""The memory planner (meta-device estimates, plans and refusals) and the memory technique's hooks."""

import sys

import pytest
import torch
import torch.nn.functional as F

import hires
import tiny_models
from hires.techniques.memory import estimate as memory_planner
from hires.config import HiresConfig, MemoryConfig
from hires.techniques.memory.estimate import MemoryBudgetError
from hires.techniques.memory import chunking as memory_technique


# -- counting live bytes, against hand-counted allocations ------------------------------------
def test_peak_counts_live_tensors_only():
    def fn():
        a = torch.empty(1000, device="meta")  # 4000 B
        b = a * 2  # 4000 B, both alive: 8000
        del a
        c = b + 1  # b and c alive: 8000
        del b
        d = c.view(10, 100)  # a view: no new bytes
        return d.sum()

    assert memory_planner.meta_peak_bytes(fn) == 8000


def test_in_place_ops_allocate_nothing():
    def fn():
        a = torch.empty(1000, device="meta")
        a.mul_(2).add_(1)
        return a

    assert memory_planner.meta_peak_bytes(fn) == 4000


def test_attention_is_counted_as_a_memory_efficient_kernel():
    q = torch.empty(1, 2, 1024, 16, device="meta")
    peak = memory_planner.meta_peak_bytes(lambda: F.scaled_dot_product_attention(q, q, q))
    output, log_sum_exp = 2 * 1024 * 16 * 4, 2 * 1024 * 4
    assert peak == output + log_sum_exp
    assert peak < 2 * 1024 * 1024 * 4 / 10  # far below one N x N score matrix


def test_cpu_convolution_counts_its_input_and_weight_copies():
    x = torch.empty(1, 8, 32, 32, device="meta")
    weight = torch.empty(16, 8, 3, 3, device="meta")
    output, copies = 16 * 32 * 32 * 4, (8 * 32 * 32 + 16 * 8 * 9) * 4
    assert memory_planner.meta_peak_bytes(lambda: F.conv2d(x, weight, padding=1), "cuda") == output
    assert memory_planner.meta_peak_bytes(lambda: F.conv2d(x, weight, padding=1), "cpu") == output + copies


# Peak RSS from VmHWM after a reset: ru_maxrss would carry over the (large) pytest process's RSS.
_CONV_RSS = """
import resource, torch, torch.nn.functional as F
x, w = torch.randn(1, 64, 512, 512), torch.randn(64, 64, 3, 3)
with torch.no_grad():
    F.conv2d(x[..., :32, :32], w, padding=1)  # oneDNN's one-time setup is not activation memory
open("/proc/self/clear_refs", "w").write("5")
base = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
with torch.no_grad():
    y = F.conv2d(x, w, padding=1)
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")) - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from Linux's /proc/self")
def test_cpu_convolution_estimate_matches_its_measured_peak():
    """A real 64 MiB convolution in a fresh process: peak RSS above the inputs vs the meta estimate."""
    import os
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", OMP_NUM_THREADS="1")
    measured = int(subprocess.run([sys.executable, "-c", _CONV_RSS], env=env, capture_output=True, text=True,
                                  check=True).stdout.strip())
    x, w = torch.empty(1, 64, 512, 512, device="meta"), torch.empty(64, 64, 3, 3, device="meta")
    estimated = memory_planner.meta_peak_bytes(lambda: F.conv2d(x, w, padding=1), "cpu")
    assert abs(estimated / measured - 1) < 0.15, (estimated, measured)


def test_meta_estimate_matches_the_same_count_on_real_cpu_tensors():
    vae = tiny_models.make_vae()
    z = torch.randn(1, 4, 16, 16)
    measured = memory_planner.meta_peak_bytes(lambda: vae.decoder(vae.post_quant_conv(z)))
    estimated = memory_planner.vae_peak_bytes(vae, "decode", tuple(z.shape), torch.float32, tiled=False)
    assert abs(estimated / measured - 1) < 0.05


def test_tiled_estimate_is_below_untiled_and_grows_with_the_tile():
    vae = tiny_models.make_vae()
    latent = (1, 4, 64, 64)
    untiled = memory_planner.vae_peak_bytes(vae, "decode", latent, torch.float32, tiled=False)
    small = memory_planner.vae_peak_bytes(vae, "decode", latent, torch.float32, tiled=True, tile_size=8)
    large = memory_planner.vae_peak_bytes(vae, "decode", latent, torch.float32, tiled=True, tile_size=32)
    assert small < large < untiled


# -- plans and refusals ------------------------------------------------------------------------
def _models(family="sdxl"):
    pipe = tiny_models.build(family)
    return pipe, getattr(pipe, "unet", None) or pipe.transformer


def test_impossible_budget_is_refused_with_the_numbers():
    pipe, denoiser = _models()
    with pytest.raises(MemoryBudgetError) as error:
        memory_planner.plan(denoiser, pipe.vae, height=256, width=256, dtype=torch.float32, budget=2**20, name="sdxl")
    message = str(error.value)
    assert "256x256 sdxl float32" in message and "needs ≈" in message and "budget 1.0 MiB" in message
    assert "try" in message


def test_fitting_budget_plans_without_tiling_and_a_tight_one_tiles_the_vae():
    pipe, denoiser = _models()
    roomy = memory_planner.plan(denoiser, pipe.vae, height=512, width=512,
                                dtype=torch.float32, budget=2**34, tile_size=8)
    assert not roomy.tile_vae and roomy.feed_forward_chunks == 1 and not roomy.sequential_cfg
    assert roomy.peak <= roomy.budget
    tiled = memory_planner.vae_peak_bytes(pipe.vae, "decode", (1, 4, 64, 64), torch.float32, tiled=True, tile_size=8)
    assert roomy.denoiser_peak < tiled < roomy.vae_untiled_peak
    # The untiled decode does not fit, the denoiser and a tiled decode do.
    budget = roomy.weights + (tiled + roomy.vae_untiled_peak) // 2
    tight = memory_planner.plan(denoiser, pipe.vae, height=512, width=512,
                                dtype=torch.float32, budget=budget, tile_size=8)
    assert tight.tile_vae and tight.tile_size == 8 and tight.vae_peak == tiled and tight.peak <= budget


def test_sequential_cfg_is_chosen_when_the_batched_call_does_not_fit(monkeypatch):
    pipe, denoiser = _models("sd15")
    # Only the denoiser's choice is under test here: the (tiny, relatively large) VAE costs nothing.
    monkeypatch.setattr(memory_planner, "vae_peak_bytes", lambda *args, **kwargs: 0)
    batched = memory_planner.plan(denoiser, pipe.vae, height=256, width=256, dtype=torch.float32, budget=2**34,
                                  feed_forward_chunks=1, tile_vae=True, tile_size=8)
    sequential = memory_planner.denoiser_peak_bytes(denoiser, 32, 32, torch.float32, batch=1)
    assert sequential < batched.denoiser_peak
    budget = batched.weights + (sequential + batched.denoiser_peak) // 2
    chosen = memory_planner.plan(denoiser, pipe.vae, height=256, width=256, dtype=torch.float32, budget=budget,
                                 feed_forward_chunks=1, tile_vae=True, tile_size=8)
    assert chosen.sequential_cfg


# Denoisers with no meta-device model: Qwen-Image 2.1's transformer lays out its joint sequence from the values of
# its img_mask (a boolean scatter), which the meta device has none of. Its planner is refused (its VAE).
NO_MEMORY_MODEL = ("qwenimage21",)


def test_every_family_denoiser_has_a_memory_model(family):
    pipe, denoiser = _models(family)
    if family in NO_MEMORY_MODEL:
        with pytest.raises(TypeError, match=f"denoiser={type(denoiser).__name__} has no memory model"):
            memory_planner.denoiser_peak_bytes(denoiser, 8, 8, torch.float32, batch=1)
        return
    small = memory_planner.denoiser_peak_bytes(denoiser, 8, 8, torch.float32, batch=1)
    large = memory_planner.denoiser_peak_bytes(denoiser, 16, 16, torch.float32, batch=1)
    assert 0 < small < large


def test_chunk_size_divides_every_sequence():
    assert memory_technique.chunk_size_for([4096], 4) == (1024, 1)
    assert memory_technique.chunk_size_for([4096, 256], 4) == (256, 1)
    # No useful common divisor (SD3: image tokens and 333 text tokens): one sample at a time.
    assert memory_technique.chunk_size_for([4096, 333], 4) == (1, 0)


# -- inside tiny pipelines -----------------------------------------------------------------------
def test_memory_technique_with_room_is_bit_identical_and_logs_its_plan(family):
    pipe = tiny_models.build(family)
    if hires.model_info(pipe).family.vae.untileable:  # the planner could not tile this VAE: refused up front
        with pytest.raises(ValueError,
                           match=r"MemoryConfig\(enabled=True\) does not apply to family.*VAE \(AutoencoderKLQwen"):
            hires.apply(pipe, HiresConfig(memory=MemoryConfig(enabled=True, max_memory="64GiB")))
        assert not hires.is_applied(pipe)
        return
    plain = tiny_models.generate(pipe, family, size=64, steps=2)
    hires.apply(pipe, HiresConfig(memory=MemoryConfig(enabled=True, max_memory="64GiB")))
    assert torch.equal(tiny_models.generate(pipe, family, size=64, steps=2), plain)
    assert "64.00 GiB" in hires.last_call(pipe).notes["log.memory_plan"]
    hires.remove(pipe)
    assert torch.equal(tiny_models.generate(pipe, family, size=64, steps=2), plain)


def test_impossible_budget_stops_the_call_before_the_first_step():
    pipe = tiny_models.build("sd15")
    steps = []
    hires.apply(pipe, HiresConfig(memory=MemoryConfig(enabled=True, max_memory="1MiB")))
    with pytest.raises(MemoryBudgetError, match="needs"):
        tiny_models.generate(pipe, "sd15", size=64, steps=2,
                             **tiny_models.step_callback("sd15", lambda p, s: steps.append(s)))
    assert steps == []
    hires.remove(pipe)


def test_sequential_cfg_and_chunking_keep_the_output_and_remove_cleanly():
    pipe = tiny_models.build("sdxl")
    plain = tiny_models.generate(pipe, "sdxl", size=64, steps=2)
    blocks = memory_technique.chunkable_blocks(pipe.unet)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]) if a else None)
    hires.apply(pipe, HiresConfig(memory=MemoryConfig(enabled=True, max_memory="64GiB", sequential_cfg=True,
                                                      feed_forward_chunks=4)))
    out = tiny_models.generate(pipe, "sdxl", size=64, steps=2)
    assert torch.allclose(out, plain, atol=1e-5)
    hires.remove(pipe)
    assert all(b._chunk_size is None for b in blocks)
    assert torch.equal(tiny_models.generate(pipe, "sdxl", size=64, steps=2), plain)


def test_sequential_cfg_refuses_guidance_that_needs_both_halves():
    from hires.config import APGConfig

    pipe = tiny_models.build("sd15")
    with pytest.raises(ValueError, match="sequential_cfg=True cannot be combined with apg"):
        hires.apply(pipe, HiresConfig(apg=APGConfig(enabled=True),
                                      memory=MemoryConfig(enabled=True, sequential_cfg=True)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_cuda_budget_without_cuda_asks_for_an_explicit_budget():
    pipe, denoiser = _models()
    with pytest.raises(ValueError, match=r"no CUDA device here; pass the budget explicitly"):
        memory_planner.plan(denoiser, pipe.vae, height=128, width=128, dtype=torch.float32, device_type="cuda")


# -- whole-call plans: every VAE pass, the float32 upcast, the preset's structure guidance --------
_PRESET_GUIDANCE = dict(enabled=True, space="latent", upscale_space="pixel", ladder="doubling")


def _passes(info, guidance, side: int, batch: int = 1, decodes: bool = True):
    """The call's passes from the stage plan an applied pipeline would make (hires.runtime.stage_plan)."""
    from hires.config import HiresConfig
    from hires.runtime import StageRequest, stage_plan
    from hires.techniques.memory import install as planning

    stages = stage_plan(info, HiresConfig(structure_guidance=guidance), StageRequest(side, side, 20))
    return planning.call_passes(info, stages, batch, latent_channels=4, decodes=decodes)


def test_structure_guidance_stages_count_every_decode_and_encode():
    from hires.config import StructureGuidanceConfig
    from hires.families import read_model_info

    pipe = tiny_models.build("sdxl")
    info = read_model_info(pipe)
    preset = StructureGuidanceConfig(**_PRESET_GUIDANCE)
    denoiser, vae = _passes(info, preset, 256)
    assert [(p.height, p.width) for p in denoiser] == [(64, 64), (128, 128), (256, 256)]
    # per stage after the base: decode the previous result at its size, encode the upscaled image; then the call's
    # decode
    assert [(p.kind, p.shape) for p in vae] == [
        ("decode", (1, 4, 8, 8)), ("encode", (1, 3, 128, 128)),
        ("decode", (1, 4, 16, 16)), ("encode", (1, 3, 256, 256)),
        ("decode", (1, 4, 32, 32))]
    pixel = StructureGuidanceConfig(enabled=True, space="pixel", ladder="doubling")
    _, pixel_passes = _passes(info, pixel, 256, batch=2, decodes=False)
    # and each guided step decodes and encodes at the stage's size
    assert [(p.kind, p.shape[-1]) for p in pixel_passes] == [
        ("decode", 8), ("encode", 128), ("decode", 16), ("encode", 128),
        ("decode", 16), ("encode", 256), ("decode", 32), ("encode", 256)]
    assert all(p.shape[0] == 2 for p in pixel_passes)
    latent = StructureGuidanceConfig(enabled=True, space="latent", ladder="doubling")
    assert [p.what for p in _passes(info, latent, 256)[1]] == ["the call's decode"]


def test_call_plan_counts_encodes_and_the_float32_upcast():
    unet = tiny_models.build("sdxl").unet
    passes = dict(denoiser_passes=[(128, 128)], vae_passes=[("decode", (1, 4, 16, 16)), ("encode", (1, 3, 128, 128))],
                  dtype=torch.float16, budget=2**34, device_type="cuda")
    stored = tiny_models.make_vae(force_upcast=False)
    upcast = tiny_models.make_vae(force_upcast=True)
    half = memory_planner.plan_call(unet, stored, **passes)
    full = memory_planner.plan_call(unet, upcast, **passes)
    assert half.vae_dtype == torch.float16 and full.vae_dtype == torch.float32
    assert [p.kind for p in full.passes] == ["denoiser", "decode", "encode"]
    encode_only = memory_planner.plan_call(unet, upcast, **dict(passes, vae_passes=[("decode", (1, 4, 16, 16))]))
    assert len(full.vae_passes()) == 2 > len(encode_only.vae_passes())
    for h, f in zip(half.vae_passes(), full.vae_passes()):
        assert f.activations == 2 * h.activations  # the same graph in 4-byte floats
        assert f.resident - h.resident == memory_planner.module_bytes(upcast, torch.float16)  # float32 VAE weights
        assert f.dtype == torch.float32
    assert full.denoiser_passes()[0].activations == half.denoiser_passes()[0].activations
    assert full.peak > half.peak
    assert "encode 1x3x128x128 float32" in full.summary() and "peak" in full.summary()


def test_call_plan_tiles_only_the_passes_that_need_it_and_says_so():
    unet, vae = tiny_models.build("sdxl").unet, tiny_models.make_vae()
    kwargs = dict(denoiser_passes=[(64, 64)], dtype=torch.float32, tile_size=4, device_type="cuda")
    small, large = ("decode", (1, 4, 8, 8)), ("decode", (1, 4, 32, 32))
    roomy = memory_planner.plan_call(unet, vae, vae_passes=[small, large], budget=2**34, **kwargs)
    assert all(p.tiling is None for p in roomy.vae_passes())
    small_pass, large_pass = roomy.vae_passes()
    tiled = memory_planner.vae_peak_bytes(vae, "decode", large[1], torch.float32,
                                          tiled=True, tile_size=4, device_type="cuda")
    assert small_pass.untiled < tiled < large_pass.untiled
    budget = large_pass.resident + max(tiled, small_pass.untiled, roomy.denoiser_passes()[0].activations) + 1
    tight = memory_planner.plan_call(unet, vae, vae_passes=[small, large], budget=budget, **kwargs)
    assert tight.vae_passes()[0].tiling is None
    assert tight.vae_passes()[1].tiling == (4, "unit", None)
    assert "tiled 4 latent px unit" in tight.summary() and tight.peak <= budget


def _recorded_decisions(monkeypatch):
    decisions = []
    original = memory_planner.vae_tiling_decision

    def recording(vae, kind, shape, dtype, **kwargs):
        choice = original(vae, kind, shape, dtype, **kwargs)
        decisions.append((kind, tuple(shape), choice))
        return choice

    monkeypatch.setattr(memory_planner, "vae_tiling_decision", recording)
    return decisions


def _preset_config(max_memory, **tiling):
    from hires.config import StructureGuidanceConfig, VAETilingConfig

    extra = dict(vae_tiling=VAETilingConfig(enabled=True, mode="auto", **tiling)) if tiling else {}
    return HiresConfig(structure_guidance=StructureGuidanceConfig(**_PRESET_GUIDANCE, guided_steps=1, renoise=0.5),
                       memory=MemoryConfig(enabled=True, max_memory=max_memory), **extra)


def test_the_preset_call_is_planned_whole_and_tiles_each_pass_as_planned(monkeypatch):
    """Structure guidance as the automatic preset runs it, a budget that only tiled VAE passes fit:
    every decode and encode is decided on its own, as the whole-call plan predicted."""
    from hires.techniques.memory import install as planning

    pipe = tiny_models.build("sd15")
    hires.apply(pipe, _preset_config("64GiB", tile_size=4))
    tiny_models.generate(pipe, "sd15", size=256, steps=2)
    roomy = planning.call_plan(pipe)
    assert [p.kind for p in roomy.vae_passes()] == ["decode", "encode", "decode", "encode", "decode"]
    resident = roomy.vae_passes()[0].resident
    largest = max(roomy.vae_passes(), key=lambda p: p.untiled)
    tiled = memory_planner.vae_peak_bytes(pipe.vae, largest.kind, largest.shape,
                                          torch.float32, tiled=True, tile_size=4,
                                          device_type="cpu")
    needed = max(tiled, *(p.activations for p in roomy.denoiser_passes()))
    assert needed < largest.untiled
    budget = resident + (needed + largest.untiled) // 2
    decisions = _recorded_decisions(monkeypatch)
    hires.apply(pipe, _preset_config(budget, tile_size=4))
    tiny_models.generate(pipe, "sd15", size=256, steps=2)
    plan = planning.call_plan(pipe)
    assert plan.budget == budget and plan.peak <= budget
    assert [(kind, shape) for kind, shape, _ in decisions] == [(p.kind, p.shape) for p in plan.vae_passes()]
    assert [choice for *_, choice in decisions] == [p.tiling for p in plan.vae_passes()]
    assert {kind for kind, _, choice in decisions if choice is not None} == {"decode", "encode"}
    assert any(choice is None for *_, choice in decisions)  # the small passes stay untiled
    assert "stage 3 steps" in hires.last_call(pipe).notes["log.memory_call_plan"]
    hires.remove(pipe)


def test_a_staged_call_that_cannot_fit_is_refused_before_its_first_stage():
    pipe = tiny_models.build("sdxl")
    forwards = []
    pipe.unet.register_forward_pre_hook(lambda module, args: forwards.append(1))
    hires.apply(pipe, _preset_config("1MiB"))
    with pytest.raises(MemoryBudgetError,
                       match=r"256x256 sdxl in 3 stages float32 batch 1 needs ≈.* budget 1\.0 MiB") as error:
        tiny_models.generate(pipe, "sdxl", size=256, steps=2)
    assert forwards == []
    assert "stage 3" in str(error.value) and "try" in str(error.value)
    hires.remove(pipe)


# -- the estimate follows what the installed techniques make the denoiser do -----------------------
def test_the_automatic_preset_plans_sd3_past_its_position_table():
    """SD3's patch embedding refuses grids past pos_embed_max_size; with PositionConfig (in SD3's automatic
    preset) hires extends the table, and the planner's meta-device estimate must run the same way: the
    preset at 4x the tiny SD3's side (a 16-patch grid, table 12) raised in the planner before."""
    pipe = tiny_models.build("sd3")
    side = 4 * hires.model_info(pipe).base_height
    table = pipe.transformer.pos_embed.pos_embed_max_size
    assert side // 8 // 2 > table  # the request is past the table
    hires.apply(pipe)
    image = tiny_models.generate(pipe, "sd3", size=side, steps=2, output_type="pt")
    assert image.shape[-2:] == (side, side)
    notes = hires.last_call(pipe).notes
    assert notes["log.positions.table"][1:] == (side // 16, side // 16, table)
    assert f"{side}x{side}" in notes["log.memory_call_plan"]
    hires.remove(pipe)


def test_a_denoiser_estimate_past_sd3s_table_runs_with_the_positions_adaptation():
    from hires.techniques.positions.encodings import TableExtension

    transformer = tiny_models.build("sd3").transformer
    latent = 2 * 2 * transformer.pos_embed.pos_embed_max_size  # twice the table's side in patches
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        memory_planner.denoiser_peak_bytes(transformer, latent, latent, torch.float32, 1, device_type="cpu")
    extended = memory_planner.denoiser_peak_bytes(transformer, latent, latent, torch.float32, 1, device_type="cpu",
                                                  adaptations=(TableExtension("interpolate"),))
    at_table = memory_planner.denoiser_peak_bytes(transformer, latent // 2, latent // 2, torch.float32, 1,
                                                  device_type="cpu")
    assert extended > at_table  # four times the image tokens (the text tokens stay)
