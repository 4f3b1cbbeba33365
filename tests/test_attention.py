"""Attention at high resolution: entropy scaling, windowed attention, backend selection."""

import copy
import math
import re
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hires
from hires.config import AttentionBackendConfig, EntropyScalingConfig, WindowAttentionConfig
from hires.families import FAMILIES, ModelInfo
from hires.runtime import CallState
from hires.denoiser import attention as A
from hires.techniques.entropy_scaling import scaling as E
from hires.techniques.window_attention import windows as W
from surface_support import RESCALES_TO_BASE_AREA, plain_at
from tiny_models import CALL_KWARGS, JOINT_ATTENTION, build, generate

ENTROPY = EntropyScalingConfig(enabled=True)
WINDOWS = WindowAttentionConfig(enabled=True)
# "2x" and "4x" per family; SD3's tiny position table stops at 192 px (12 tokens a side).
SCALED_SIZES = {"sd3": [(64, 128), (128, 128), (64, 192)]}
DEFAULT_SCALED = [(128, 128), (256, 256)]


def _info(family: str, patch: int) -> ModelInfo:
    record = next(f for f in FAMILIES if f.name == family)
    return ModelInfo(family=record, base_height=64, base_width=64, latent_factor=8, patch_size=patch,
                     prediction_type="epsilon")


def _attachment(family: str, patch: int, height: int, width: int, steps: int = 3, seed: int = 0):
    state = CallState(info=_info(family, patch), height=height, width=width,
                      timesteps=torch.arange(steps, dtype=torch.float64),
                      call_locals={"generator": torch.Generator().manual_seed(seed)})
    state.step_index = 0
    return types.SimpleNamespace(state=state)


def _softmax_attention(q, k, v, factor):
    """softmax(factor * q k^T / sqrt(d)) v, in float64, (batch, tokens, heads, dim) layout."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    logits = factor * (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return (torch.softmax(logits, dim=-1) @ v).transpose(1, 2)


def _heads(x, heads):
    return x.unflatten(-1, (heads, -1))


# -- pure math ------------------------------------------------------------------------------

def test_entropy_factor_formula_and_clamp():
    assert E.entropy_factor(4096, 4096) == 1.0
    assert E.entropy_factor(16384, 4096) == pytest.approx(math.sqrt(14 / 12))
    assert E.entropy_factor(1024, 4096) == pytest.approx(math.sqrt(10 / 12))
    assert E.entropy_factor(1, 1) == 1.0  # both clamped to 2
    assert E.entropy_factor(64, 1) == pytest.approx(math.sqrt(math.log(64) / math.log(2)))


def test_layer_grids_follow_stride_two_downsampling():
    # 20x28 tokens -> 10x14 -> 5x7 -> 3x4 (ceil), base 8x8 -> 4x4 -> 2x2 -> 1x1
    assert A.layer_grids(560, (20, 28), (8, 8)) == ((20, 28), (8, 8))
    assert A.layer_grids(35, (20, 28), (8, 8)) == ((5, 7), (2, 2))
    assert A.layer_grids(12, (20, 28), (8, 8)) == ((3, 4), (1, 1))
    with pytest.raises(ValueError, match="no power-of-two"):
        A.layer_grids(50, (20, 28), (8, 8))


@pytest.mark.parametrize("length,window", [(16, 4), (17, 4), (7, 3), (5, 8), (12, 5)])
def test_window_runs_partition_exactly(length, window):
    runs = W.window_runs(length, window)
    covered = [i for start, count, size in runs for i in range(start, start + count * size)]
    assert covered == list(range(length))
    sizes = [size for _, count, size in runs for _ in range(count)]
    assert max(sizes) <= window and max(sizes) - min(sizes) <= 1
    assert len(sizes) == -(-length // window)


def _window_reference(q, k, v, grid, window, offset, image_start, scale):
    """Dense float64 reference: a token-level mask of who sees whom, written independently."""
    rows, cols = grid
    tokens = q.shape[2]
    n_img = rows * cols
    # Window id of each image token after the cyclic shift, from torch.tensor_split's near-equal split.
    row_ids = torch.empty(rows, dtype=torch.long)
    for i, part in enumerate(torch.tensor_split(torch.arange(rows), -(-rows // window[0]))):
        row_ids[part] = i
    col_ids = torch.empty(cols, dtype=torch.long)
    for j, part in enumerate(torch.tensor_split(torch.arange(cols), -(-cols // window[1]))):
        col_ids[part] = j
    shifted_r = (torch.arange(rows) - offset[0]) % rows  # token at row r sits at shifted row r - offset
    shifted_c = (torch.arange(cols) - offset[1]) % cols
    win = (row_ids[shifted_r][:, None] * 1000 + col_ids[shifted_c][None, :]).flatten()
    is_image = torch.zeros(tokens, dtype=torch.bool)
    is_image[image_start:image_start + n_img] = True
    window_of = torch.full((tokens,), -1, dtype=torch.long)
    window_of[is_image] = win
    allowed = (~is_image[None, :]) | (~is_image[:, None]) | (window_of[:, None] == window_of[None, :])
    logits = scale * q.double() @ k.double().transpose(-1, -2)
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v.double()


@pytest.mark.parametrize("grid,window,offset,text_before,text_after", [
    ((8, 8), (4, 4), (0, 0), 0, 0),
    ((8, 8), (4, 4), (3, 1), 0, 0),
    ((7, 10), (3, 4), (2, 5), 0, 0),  # not divisible: near-equal windows
    ((6, 9), (4, 4), (1, 2), 5, 0),  # text first (Flux)
    ((5, 6), (2, 4), (0, 3), 0, 4),  # text after (SD3)
])
def test_windowed_attention_equals_per_window_reference(grid, window, offset, text_before, text_after):
    torch.manual_seed(0)
    tokens = text_before + grid[0] * grid[1] + text_after
    q, k, v = (torch.randn(2, 3, tokens, 8, dtype=torch.float64) for _ in range(3))
    scale = 1.3 / math.sqrt(8)
    out = W.windowed_attention(q, k, v, grid, window, offset, image_start=text_before, scale=scale)
    ref = _window_reference(q, k, v, grid, window, offset, text_before, scale)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


# -- each processor path against an explicit float64 softmax --------------------------------

def _double(module):
    return copy.deepcopy(module).double()


def _wrapped(module, attachment, layer="layer", entropy=ENTROPY, window=None):
    changes = ([W.WindowAttention(window)] if window is not None else []) + (
        [E.EntropyScaling(entropy)] if entropy is not None else [])
    return A._wrapper_class(type(module.processor))(module.processor, layer, attachment, tuple(changes))


@pytest.mark.parametrize("family,path", [("sd15", "down_blocks.0.attentions.0.transformer_blocks.0.attn1"),
                                         ("pixart", "transformer_blocks.0.attn1")])
def test_self_attention_processor_equals_explicit_softmax(family, path):
    pipe = build(family)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    attn = _double(denoiser.get_submodule(path))
    patch = 1 if family == "sd15" else 2
    attachment = _attachment(family, patch, 128, 128)
    tokens = attachment.state.tokens
    base = (64 // (8 * patch)) ** 2
    x = torch.randn(2, tokens, attn.to_q.in_features, dtype=torch.float64)

    factor = math.sqrt(math.log(tokens) / math.log(base))
    out = _wrapped(attn, attachment)(attn, x)
    heads = attn.heads
    ref = _softmax_attention(_heads(attn.to_q(x), heads), _heads(attn.to_k(x), heads),
                             _heads(attn.to_v(x), heads), factor)
    ref = attn.to_out[0](ref.flatten(2))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert attachment.state.log[E.LOG_FACTORS]["layer"] == pytest.approx(factor)
    # no call state (outside a pipeline call): the processor is the original one, bit for bit
    plain = attn.processor(attn, x)
    assert torch.equal(_wrapped(attn, types.SimpleNamespace(state=None))(attn, x), plain)


@pytest.mark.parametrize("text_tokens", ["exclude", "include"])
def test_sd3_joint_processor_equals_explicit_softmax(text_tokens):
    attn = _double(build("sd3").transformer.transformer_blocks[0].attn)
    attachment = _attachment("sd3", 2, 128, 128)
    n_img, n_txt = attachment.state.tokens, 5
    x = torch.randn(2, n_img, attn.to_q.in_features, dtype=torch.float64)
    c = torch.randn(2, n_txt, attn.add_q_proj.in_features, dtype=torch.float64)
    entropy = EntropyScalingConfig(enabled=True, text_tokens=text_tokens)
    img, txt = _wrapped(attn, attachment, entropy=entropy)(attn, x, encoder_hidden_states=c)

    extra = n_txt if text_tokens == "include" else 0
    factor = math.sqrt(math.log(n_img + extra) / math.log(16 + extra))
    h = attn.heads
    q = torch.cat([_heads(attn.to_q(x), h), _heads(attn.add_q_proj(c), h)], 1)
    k = torch.cat([_heads(attn.to_k(x), h), _heads(attn.add_k_proj(c), h)], 1)
    v = torch.cat([_heads(attn.to_v(x), h), _heads(attn.add_v_proj(c), h)], 1)
    ref = _softmax_attention(q, k, v, factor).flatten(2)
    torch.testing.assert_close(img, attn.to_out[0](ref[:, :n_img]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(txt, attn.to_add_out(ref[:, n_img:]), rtol=1e-10, atol=1e-10)
    assert attachment.state.log[E.LOG_KEYS]["layer"] == (n_img + extra, 16 + extra)


@pytest.mark.parametrize("text_tokens", ["exclude", "include"])
def test_flux_dispatcher_processors_equal_explicit_softmax(text_tokens):
    transformer = build("flux").transformer
    attachment = _attachment("flux", 2, 128, 128)
    n_img, n_txt = attachment.state.tokens, 5
    extra = n_txt if text_tokens == "include" else 0
    factor = math.sqrt(math.log(n_img + extra) / math.log(16 + extra))
    entropy = EntropyScalingConfig(enabled=True, text_tokens=text_tokens)

    # double block: text and image streams, text first in the joint sequence
    attn = _double(transformer.transformer_blocks[0].attn)
    x = torch.randn(1, n_img, attn.query_dim, dtype=torch.float64)
    c = torch.randn(1, n_txt, attn.query_dim, dtype=torch.float64)
    img, txt = _wrapped(attn, attachment, entropy=entropy)(attn, x, c)
    d = attn.head_dim
    q = torch.cat([attn.norm_added_q(attn.add_q_proj(c).unflatten(-1, (-1, d))),
                   attn.norm_q(attn.to_q(x).unflatten(-1, (-1, d)))], 1)
    k = torch.cat([attn.norm_added_k(attn.add_k_proj(c).unflatten(-1, (-1, d))),
                   attn.norm_k(attn.to_k(x).unflatten(-1, (-1, d)))], 1)
    v = torch.cat([attn.add_v_proj(c).unflatten(-1, (-1, d)), attn.to_v(x).unflatten(-1, (-1, d))], 1)
    ref = _softmax_attention(q, k, v, factor).flatten(2)
    torch.testing.assert_close(img, attn.to_out[0](ref[:, n_txt:]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(txt, attn.to_add_out(ref[:, :n_txt]), rtol=1e-10, atol=1e-10)

    # single block: text and image already in one sequence, no encoder stream
    attn = _double(transformer.single_transformer_blocks[0].attn)
    x = torch.randn(1, n_txt + n_img, attn.query_dim, dtype=torch.float64)
    out = _wrapped(attn, attachment, entropy=entropy)(attn, x)
    q, k, v = (norm(proj(x).unflatten(-1, (-1, d))) for proj, norm in
               ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, lambda t: t)))
    torch.testing.assert_close(out, _softmax_attention(q, k, v, factor).flatten(2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size, expected", [
    ((64, 64), (8, 8)),      # the base size: one window of the whole grid
    ((56, 80), (7, 10)),     # an aspect bucket whose base-area size is itself (SDXL's 832x1216): one window
    ((128, 128), (8, 8)),    # square: the base grid
    ((96, 160), (6, 10)),    # 3:5 at 64x64 px: 48x80 px (multiples of 8) -> 6x10 tokens
])
def test_default_window_is_the_base_area_at_the_calls_aspect(size, expected):
    attachment = _attachment("sd15", 1, *size)
    state, unit = attachment.state, 8
    tokens = (size[0] // unit) * (size[1] // unit)
    call = A.describe_call(state, torch.zeros(1, tokens, 4), None, False, None)
    assert call.window_grid == expected
    # by hand: the request's aspect at 64x64 px, each side rounded to a multiple of 8 px
    shrink = math.sqrt(64 * 64 / (size[0] * size[1]))
    by_hand = tuple(max(8, round(side * shrink / 8) * 8) // unit for side in size)
    assert call.window_grid == tuple(min(a, b // unit) for a, b in zip(by_hand, size))


def test_windowed_processor_equals_per_window_reference():
    attn = _double(build("sd15").unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1)
    # 12x20 tokens; the default window is the base area at 3:5 (48x80 px): 6x10 tokens -> 2x2 windows
    attachment = _attachment("sd15", 1, 96, 160)
    x = torch.randn(1, 240, attn.to_q.in_features, dtype=torch.float64)
    out = _wrapped(attn, attachment, entropy=None, window=WINDOWS)(attn, x)
    record = attachment.state.log[W.LOG_WINDOWS]["layer"]
    assert record["grid"] == (12, 20) and record["windows"] == 4 and record["window"] == (6, 10)
    h = attn.heads
    q, k, v = (_heads(p(x), h).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
    ref = _window_reference(q, k, v, (12, 20), (6, 10), record["offset"], 0, 1 / math.sqrt(q.shape[-1]))
    ref = attn.to_out[0](ref.transpose(1, 2).flatten(2))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_windowed_flux_joint_processor_keeps_text_global():
    """Flux double block: text first in the joint sequence; image windows see all text keys."""
    attn = _double(build("flux").transformer.transformer_blocks[0].attn)
    attachment = _attachment("flux", 2, 128, 192)  # 8x12 tokens, 16 base tokens at 2:3: 3x5 windows -> 3x3
    n_img, n_txt, d = 96, 5, attn.head_dim
    x = torch.randn(1, n_img, attn.query_dim, dtype=torch.float64)
    c = torch.randn(1, n_txt, attn.query_dim, dtype=torch.float64)
    img, txt = _wrapped(attn, attachment, entropy=None, window=WINDOWS)(attn, x, c)
    record = attachment.state.log[W.LOG_WINDOWS]["layer"]
    assert record["windows"] == 9 and any(record["offset"])
    q = torch.cat([attn.norm_added_q(attn.add_q_proj(c).unflatten(-1, (-1, d))),
                   attn.norm_q(attn.to_q(x).unflatten(-1, (-1, d)))], 1)
    k = torch.cat([attn.norm_added_k(attn.add_k_proj(c).unflatten(-1, (-1, d))),
                   attn.norm_k(attn.to_k(x).unflatten(-1, (-1, d)))], 1)
    v = torch.cat([attn.add_v_proj(c).unflatten(-1, (-1, d)), attn.to_v(x).unflatten(-1, (-1, d))], 1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    ref = _window_reference(q, k, v, (8, 12), (3, 5), record["offset"], n_txt,
                            1 / math.sqrt(d)).transpose(1, 2).flatten(2)
    torch.testing.assert_close(img, attn.to_out[0](ref[:, n_txt:]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(txt, attn.to_add_out(ref[:, :n_txt]), rtol=1e-10, atol=1e-10)


def test_processor_that_bypasses_torch_sdpa_is_reported():
    from diffusers.models.attention_processor import AttnProcessor

    pipe = build("sd15")
    pipe.unet.set_attn_processor(AttnProcessor())  # the classic processor: baddbmm + softmax, no SDPA
    hires.apply(pipe, hires.HiresConfig(entropy_scaling=ENTROPY))
    with pytest.raises(RuntimeError, match="scaled_dot_product_attention"):
        generate(pipe, "sd15", 128)


# -- tiny pipelines of all six families -----------------------------------------------------

def _observed_image_keys(pipe, family, size):
    """Image key counts each self/joint attention layer really sees, observed by forward hooks;
    the text length the denoiser receives is stored under "text"."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    seen = {}

    def text_hook(mod, args, kwargs):
        seen["text"] = kwargs["encoder_hidden_states"].shape[1]
    handles = [denoiser.register_forward_pre_hook(text_hook, with_kwargs=True)]
    patch_tokens = (size[0] // 16) * (size[1] // 16)
    for name, processor in denoiser.attn_processors.items():
        layer = name[: -len(".processor")]
        module = denoiser.get_submodule(layer)
        if layer.endswith("attn2"):
            continue

        def hook(mod, args, kwargs, layer=layer):
            hidden = args[0] if args else kwargs["hidden_states"]
            # DiT layers see the call's patch grid; Flux single blocks carry text too
            seen[layer] = hidden.shape[1] if hires.model_info(pipe).family.architecture == "unet" else patch_tokens
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        generate(pipe, family, size, steps=1)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _refused(family) -> bool:
    """Whether the family's attention is one hires refuses to rewrite (Z-Image): checked, so the caller
    can stop there."""
    pipe = build(family)
    reason = hires.model_info(pipe).family.attention_unsupported
    if not reason:
        return False
    for config in (hires.HiresConfig(entropy_scaling=ENTROPY), hires.HiresConfig(window_attention=WINDOWS)):
        with pytest.raises(ValueError, match=rf"does not apply to family '{family}': {re.escape(reason)}"):
            hires.apply(pipe, config)
        assert not hires.is_applied(pipe)
    return True


def test_base_size_is_bit_identical_with_features_on(family):
    if _refused(family):
        return
    pipe = build(family)
    plain = generate(pipe, family, 64)
    hires.apply(pipe, hires.HiresConfig(entropy_scaling=ENTROPY, window_attention=WINDOWS))
    assert torch.equal(generate(pipe, family, 64), plain)
    factors = hires.last_call(pipe).notes[E.LOG_FACTORS]
    assert factors and set(factors.values()) == {1.0}
    assert W.LOG_WINDOWS not in hires.last_call(pipe).notes


def test_recorded_factors_equal_sqrt_log_ratio_at_2x_and_4x(family):
    if _refused(family):
        return
    pipe = build(family)
    base = _observed_image_keys(pipe, family, (64, 64))
    text = base.pop("text")
    for size in SCALED_SIZES.get(family, DEFAULT_SCALED):
        plain = generate(pipe, family, size)
        now = _observed_image_keys(pipe, family, size)
        assert now.pop("text") == text
        for text_tokens in ("exclude", "include"):
            hires.apply(pipe,
                        hires.HiresConfig(entropy_scaling=EntropyScalingConfig(enabled=True, text_tokens=text_tokens)))
            out = generate(pipe, family, size)
            factors = hires.last_call(pipe).notes[E.LOG_FACTORS]
            joint = family in JOINT_ATTENTION and text_tokens == "include"
            extra = text if joint else 0
            expected = {layer: math.sqrt(math.log(now[layer] + extra) / math.log(base[layer] + extra))
                        for layer in now}
            assert factors == pytest.approx(expected, rel=1e-12), (family, size, text_tokens)
            assert all(f > 1 for f in factors.values())
            assert not torch.equal(out, plain)
            hires.remove(pipe)
        assert torch.equal(generate(pipe, family, size), plain)


def test_cross_attention_layers_have_factor_one_with_all_layers():
    pipe = build("sd15")
    hires.apply(pipe, hires.HiresConfig(entropy_scaling=EntropyScalingConfig(enabled=True, layers="all")))
    generate(pipe, "sd15", 128)
    factors = hires.last_call(pipe).notes[E.LOG_FACTORS]
    cross = {k: v for k, v in factors.items() if k.endswith("attn2")}
    assert len(cross) == 7 and set(cross.values()) == {1.0}
    assert all(v > 1 for k, v in factors.items() if k.endswith("attn1"))


def test_disabled_config_is_bit_identical(family):
    pipe = build(family)
    size = (64, 128)
    plain = generate(pipe, family, size)
    hires.apply(pipe, hires.HiresConfig(entropy_scaling=EntropyScalingConfig(enabled=False),
                                        window_attention=WindowAttentionConfig(enabled=False)))
    assert torch.equal(generate(pipe, family, size), plain)


def test_windows_in_pipelines_are_seeded_and_removable(family):
    if _refused(family):
        return
    pipe = build(family)
    size = (64, 192) if family == "sd3" else (128, 128)
    plain = generate(pipe, family, size)
    hires.apply(pipe, hires.HiresConfig(window_attention=WINDOWS))
    first = generate(pipe, family, size, seed=1)
    offsets = hires.last_call(pipe).notes[W.LOG_WINDOW_OFFSETS]
    assert torch.equal(generate(pipe, family, size, seed=1), first)  # same seed, same image
    assert not torch.equal(first, plain)
    generate(pipe, family, size, seed=2)
    assert hires.last_call(pipe).notes[W.LOG_WINDOW_OFFSETS] != offsets  # other seed, other shifts
    windows = hires.last_call(pipe).notes[W.LOG_WINDOWS]
    assert windows and all(w["windows"] > 1 for w in windows.values())
    # the offsets come from the call's derived "windows" generator
    state = _attachment(family, 1, 64, 64, steps=3, seed=2).state
    assert hires.last_call(pipe).notes[W.LOG_WINDOW_OFFSETS] == [
        tuple(r) for r in torch.rand((3, 2), generator=state.generator("windows"), dtype=torch.float64).tolist()]
    hires.remove(pipe)
    assert torch.equal(generate(pipe, family, size), plain)


def test_unshifted_windows_with_window_larger_than_grid_change_nothing():
    pipe = build("sd15")
    plain = generate(pipe, "sd15", 128)
    hires.apply(pipe, hires.HiresConfig(window_attention=WindowAttentionConfig(enabled=True, window=64)))
    assert torch.equal(generate(pipe, "sd15", 128), plain)


def _latents(pipe, family, size):
    """One denoising step, latents out (no VAE decode)."""
    return pipe("a red circle", height=size, width=size, num_inference_steps=1, output_type="latent",
                generator=torch.Generator().manual_seed(0), **CALL_KWARGS[family]).images


# -- no attention matrix --------------------------------------------------------------------

class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("family,size", [("sd15", 256), ("flux", 768)])
@pytest.mark.parametrize("mode", ["plain", "entropy", "windows"])
def test_no_attention_matrix_is_materialised(family, size, mode):
    pipe = build(family)
    config = {"plain": hires.HiresConfig(), "entropy": hires.HiresConfig(entropy_scaling=ENTROPY),
              "windows": hires.HiresConfig(window_attention=WINDOWS)}[mode]
    hires.apply(pipe, config)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    heads = max(m.heads for m in denoiser.modules() if hasattr(m, "heads"))
    tokens = (size // 8) ** 2 if family == "sd15" else (size // 16) ** 2 + 16
    batch = 2 if family == "sd15" else 1  # CFG batches uncond and cond
    recorder = _LargestOutput()
    with recorder:
        _latents(pipe, family, size)
    assert hires.last_call(pipe).completed
    if mode == "entropy":
        assert max(hires.last_call(pipe).notes[E.LOG_FACTORS].values()) > 1
    attention_matrix = batch * heads * tokens**2
    assert recorder.largest * 16 < attention_matrix, (recorder.largest, attention_matrix)


# -- attention backend ----------------------------------------------------------------------

def test_native_backend_is_bit_identical_and_removable(family):
    pipe = build(family)
    # HiDream-I1 rescales a request to its base area, and pads a non-square one past it to more tokens than
    # its transformer takes: plain diffusers runs 2x the side only square, told its base is that size.
    size = (128, 128) if family in RESCALES_TO_BASE_AREA else (64, 128)
    untouched = generate(pipe, family, size)
    plain = generate(plain_at(build(family), family, *size), family, size)
    hires.apply(pipe, hires.HiresConfig(attention_backend=AttentionBackendConfig(enabled=True, backend="native")))
    assert torch.equal(generate(pipe, family, size), plain)
    hires.apply(pipe,
                hires.HiresConfig(attention_backend=AttentionBackendConfig(enabled=True, backend="_native_math")))
    torch.testing.assert_close(generate(pipe, family, size), plain, rtol=1e-4, atol=1e-4)
    hires.remove(pipe)
    assert torch.equal(generate(pipe, family, size), untouched)


def test_math_backend_is_the_kernel_that_runs():
    """With _native_math the denoiser's attention runs torch's math kernel (softmax ops appear and
    the fused CPU flash kernel runs only outside the denoiser), with entropy scaling on."""

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls.append(str(func))
            return func(*args, **(kwargs or {}))

    def count(pipe, family, backend):
        config = hires.HiresConfig(entropy_scaling=ENTROPY,
                                   attention_backend=AttentionBackendConfig(enabled=True, backend=backend))
        hires.apply(pipe, config)
        ops = Ops()
        with ops:
            _latents(pipe, family, 128)
        return (sum("flash_attention" in c for c in ops.calls), sum("_softmax.default" in c for c in ops.calls))

    for family in ("sd15", "flux"):
        pipe = build(family)
        flash_native, softmax_native = count(pipe, family, "native")
        flash_math, softmax_math = count(pipe, family, "_native_math")
        assert flash_native > flash_math and softmax_math > softmax_native, family
        assert flash_native - flash_math == softmax_math - softmax_native, family


def test_flux_entropy_scaling_runs_on_any_dispatcher_backend():
    """Flux's factor goes into its queries, so a non-SDPA dispatcher kernel (flex here) applies it too."""
    pipe = build("flux")
    results = {}
    for backend in ("native", "flex"):
        hires.apply(pipe, hires.HiresConfig(entropy_scaling=ENTROPY,
                                            attention_backend=AttentionBackendConfig(enabled=True, backend=backend)))
        results[backend] = generate(pipe, "flux", 128)
        assert max(hires.last_call(pipe).notes[E.LOG_FACTORS].values()) > 1
    hires.remove(pipe)
    plain = generate(pipe, "flux", 128)
    torch.testing.assert_close(results["flex"], results["native"], rtol=1e-4, atol=1e-4)
    assert (results["native"] - plain).abs().max() > 100 * (results["flex"] - results["native"]).abs().max()


def test_backend_errors_name_the_problem():
    pipe = build("sd15")
    with pytest.raises(ValueError, match="backend='flash'.*call torch's"):
        hires.apply(pipe, hires.HiresConfig(attention_backend=AttentionBackendConfig(enabled=True, backend="flash")))
    with pytest.raises(ValueError, match="conflicts with entropy_scaling"):
        hires.apply(pipe, hires.HiresConfig(entropy_scaling=ENTROPY,
                                            attention_backend=AttentionBackendConfig(enabled=True, backend="flex")))
    flux = build("flux")
    with pytest.raises(ValueError, match="conflicts with window_attention"):
        hires.apply(flux, hires.HiresConfig(window_attention=WINDOWS,
                                            attention_backend=AttentionBackendConfig(enabled=True, backend="flex")))
    assert not hires.is_applied(flux)
    with pytest.raises(ValueError, match="backend='xformers' cannot run here"):
        hires.apply(flux,
                    hires.HiresConfig(attention_backend=AttentionBackendConfig(enabled=True, backend="xformers")))
    with pytest.raises(ValueError, match="backend"):
        AttentionBackendConfig(enabled=True, backend="fastest")
    with pytest.raises(ValueError, match="window"):
        WindowAttentionConfig(enabled=True, window=0)
    with pytest.raises(ValueError, match="text_tokens"):
        EntropyScalingConfig(enabled=True, text_tokens="some")


