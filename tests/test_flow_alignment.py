"""HiFlow's flow-aligned guidance (FlowAlignmentConfig) on top of structure guidance.

Math against HiFlow's own formulation written here (the x0-space alignment, its Butterworth loop,
the Haar block average); the guided velocities captured inside tiny Flux and SD3 pipelines against
the stage's reference flow; bit-identity when off and after remove; errors where it does not apply.
"""

import math

import pytest
import torch

import hires
from hires.config import FlowAlignmentConfig, HiresConfig, StructureGuidanceConfig
from hires.runtime import HOOK_PREFIX, get_attachment
from hires.techniques.flow_alignment import alignment as FA
from hires.sampling.latents import unpack
from tiny_models import build, generate

FLOW_FAMILIES = ("flux", "sd3")
_SG = StructureGuidanceConfig(enabled=True, space="latent", renoise=0.5)


def _config(**options):
    return HiresConfig(structure_guidance=_SG, flow_alignment=FlowAlignmentConfig(enabled=True, **options))


# -- math -------------------------------------------------------------------------------------------

def _hiflow_mask(h, w, ratio, n):
    """HiFlow's butterworth_low_pass_filter_2d, pixel by pixel."""
    mask = torch.zeros(h, w)
    for i in range(h):
        for j in range(w):
            d_square = (2 * i / h - 1) ** 2 + (2 * j / w - 1) ** 2
            mask[i, j] = 1 / (1 + (d_square / ratio**2) ** n)
    return mask


@pytest.mark.parametrize("h,w", [(8, 8), (6, 10)])
def test_butterworth_mask_is_hiflows(h, w):
    torch.testing.assert_close(FA.butterworth_mask(h, w, 0.2, 4), _hiflow_mask(h, w, 0.2, 4), atol=1e-6, rtol=0)
    # the zero frequency (centre after fftshift) passes whole
    assert FA.butterworth_mask(h, w, 0.2, 4)[h // 2, w // 2] == 1


def test_fft_low_pass_against_a_direct_fourier_sum():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    mask = FA.butterworth_mask(6, 8, 0.5, 2).double()
    got = FA.fft_low_pass(x, mask)
    # the same filter as a sum over frequencies: X(k) = sum x e^{-2pi i k.n / N}, weighted by the mask at
    # k's centred position, then the inverse sum (real part)
    h, w = 6, 8
    out = torch.zeros(h, w, dtype=torch.float64)
    for kh in range(h):
        for kw in range(w):
            weight = mask[(kh + h // 2) % h, (kw + w // 2) % w]
            coefficient = sum(x[0, 0, a, b] * complex(math.cos(-2 * math.pi * (kh * a / h + kw * b / w)),
                                                      math.sin(-2 * math.pi * (kh * a / h + kw * b / w)))
                              for a in range(h) for b in range(w))
            for a in range(h):
                for b in range(w):
                    phase = 2 * math.pi * (kh * a / h + kw * b / w)
                    out[a, b] += (weight * coefficient * complex(math.cos(phase), math.sin(phase))).real / (h * w)
    torch.testing.assert_close(got[0, 0].double(), out, atol=1e-5, rtol=0)
    flat = torch.full((1, 2, 6, 8), 3.0)
    torch.testing.assert_close(FA.fft_low_pass(flat, FA.butterworth_mask(6, 8, 0.2, 4)), flat)


def test_dwt_low_pass_is_the_haar_block_mean():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 6)
    blocks = torch.nn.functional.avg_pool2d(x, 2).repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    torch.testing.assert_close(FA.dwt_low_pass(x), blocks, atol=1e-5, rtol=0)


@pytest.mark.parametrize("band", ["fft", "dwt"])
def test_direction_alignment_is_hiflows_x0_alignment(band):
    """HiFlow aligns the predicted x0 and converts back: x0' = x0 + a (low(x0_ref) - low(x0)),
    v' = (x - x0') / sigma; hires works on the velocities directly."""
    torch.manual_seed(2)
    x, v, x0_ref = torch.randn(3, 1, 4, 8, 8).unbind(0)
    sigma, alpha = 0.6, 0.7
    low = FA.dwt_low_pass if band == "dwt" else (lambda t: FA.fft_low_pass(t, FA.butterworth_mask(8, 8, 0.2, 4)))
    x0 = x - sigma * v
    x0_aligned = x0 + alpha * (low(x0_ref) - low(x0))
    expected = (x - x0_aligned) / sigma
    reference = FA.reference_velocity(x, x0_ref, sigma)
    torch.testing.assert_close(FA.align_direction(v, reference, alpha, low), expected, atol=1e-5, rtol=0)


def test_acceleration_alignment_formula():
    v, v_prev, r, r_prev = torch.randn(4, 2, 3)
    beta = 0.3
    expected = (1 - beta) * v + beta * (v_prev + (r - r_prev))
    torch.testing.assert_close(FA.align_acceleration(v, v_prev, r, r_prev, beta), expected)


def test_both_maps_commute_with_the_guidance_combination():
    """Applied to each CFG half with the same references, the pipeline's u + w (c - u) gets exactly the
    map of the combined velocity."""
    torch.manual_seed(3)
    u, c, r, v_prev, r_prev = torch.randn(5, 1, 4, 8, 8).unbind(0)
    w, alpha, beta = 4.5, 0.8, 0.5
    low = FA.dwt_low_pass

    def both(v):
        return FA.align_acceleration(FA.align_direction(v, r, alpha, low), v_prev, r, r_prev, beta)

    combined = u + w * (c - u)
    torch.testing.assert_close(both(u) + w * (both(c) - both(u)), both(combined), atol=1e-4, rtol=1e-5)


def test_weights_decay_and_defaults():
    assert [FA.decayed(1.0, i, 4) for i in range(4)] == [1.0, 0.75, 0.5, 0.25]
    config = FlowAlignmentConfig(enabled=True)
    assert FA.stage_weights(config, 3) == [(1.0, 0.5), (0.25, 0.5), (0.25, 0.5)]
    assert FA.stage_weights(FlowAlignmentConfig(enabled=True, alphas=(0.5, 0.1), betas=0.0),
                            2) == [(0.5, 0.0), (0.1, 0.0)]
    with pytest.raises(ValueError,
                       match=r"FlowAlignmentConfig.alphas=\(0.5, 0.1\) has 2 values but structure guidance "
                                         r"plans 1 stage"):
        FA.stage_weights(FlowAlignmentConfig(enabled=True, alphas=(0.5, 0.1)), 1)


# -- inside tiny pipelines ---------------------------------------------------------------------------

class _Recorder:
    """Every denoiser call of the upscaled stages: the sample, the final output, the stage's clean start."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.calls = []
        self.handle = pipe.transformer.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        state = get_attachment(self.pipe).state
        if state is None or state.stage is None or state.stage.x0 is None:
            return
        sample = kwargs.get("hidden_states", args[0] if args else None)
        prediction = output[0] if isinstance(output, tuple) else output.sample
        self.calls.append((state.step_index, sample.clone(), prediction.clone(), state.stage.x0.clone(),
                           float(kwargs["timestep"].flatten()[0]), state.latent_height, state.latent_width))


def _spatial(pipe, family, tensor, lh, lw):
    return unpack(tensor, lh, lw, 2) if family == "flux" else tensor


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_the_first_step_takes_the_reference_flows_low_band(family):
    """With the Haar band (a projection) and alpha = 1 at the stage's first step, the guided velocity's low
    band is exactly the reference flow's, (x_t - x_ref) / sigma, for the stage's own clean start x_ref."""
    pipe = build(family)
    hires.apply(pipe, _config(band="dwt"))
    recorder = _Recorder(pipe)
    generate(pipe, family, 128, steps=4)  # SD3 runs batched CFG: each half gets the map
    recorder.handle.remove()
    step, sample, output, x0_ref, timestep, lh, lw = recorder.calls[0]
    assert step == 0 and sample.shape[0] == (2 if family == "sd3" else 1)
    x0_ref = x0_ref.repeat(sample.shape[0], 1, 1, 1)
    sigma = timestep if family == "flux" else timestep / 1000  # Flux passes t / 1000
    x = _spatial(pipe, family, sample, lh, lw).float()
    v = _spatial(pipe, family, output, lh, lw).float()
    reference = (x - x0_ref) / sigma
    torch.testing.assert_close(FA.dwt_low_pass(v), FA.dwt_low_pass(reference), atol=1e-4, rtol=1e-4)
    steps = hires.last_call(pipe).notes["log.flow_alignment.steps"]
    assert steps[0] == (0, 1.0, None) and steps[1] == (1, 0.5, 0.25)


@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_alignment_changes_structure_guidance_and_is_seeded(family):
    pipe = build(family)
    hires.apply(pipe, HiresConfig(structure_guidance=_SG))
    alone = generate(pipe, family, 128, steps=4)
    hires.apply(pipe, _config())
    aligned = generate(pipe, family, 128, steps=4)
    assert not torch.equal(aligned, alone)
    assert torch.equal(generate(pipe, family, 128, steps=4), aligned)
    notes = hires.last_call(pipe).notes["log.flow_alignment.steps"]
    assert [s for s, _, _ in notes] == [0, 1]  # the 128 px stage re-runs 2 of 4 steps, every one aligned


def test_acceleration_term_uses_the_previous_guided_velocity():
    """Step 1 of the stage: v' = a(v) + beta_1 (v_prev + v_ref - v_ref_prev - a(v)); recover a(v) from the
    captured output with alpha set to 0, so the map is the acceleration term alone."""
    pipe = build("flux")
    hires.apply(pipe, _config(alphas=0.0, betas=0.8))
    recorder = _Recorder(pipe)
    generate(pipe, "flux", 128, steps=4)
    recorder.handle.remove()
    (s0, x0s, out0, ref, t0, lh, lw), (s1, x1s, out1, _, t1, _, _) = recorder.calls
    assert (s0, s1) == (0, 1)

    def spatial(t):
        return unpack(t, lh, lw, 2).float()

    r0, r1 = (spatial(x0s) - ref) / t0, (spatial(x1s) - ref) / t1
    beta = 0.8 * (2 - 1) / 2
    # out1 = (1 - beta) v1 + beta (out0 + r1 - r0)  =>  v1 = (out1 - beta (out0 + r1 - r0)) / (1 - beta)
    raw1 = (spatial(out1) - beta * (spatial(out0) + r1 - r0)) / (1 - beta)
    # the raw prediction of step 1 without alignment, from a run with the technique off
    hires.apply(pipe, HiresConfig(structure_guidance=_SG))
    plain_recorder = _Recorder(pipe)
    generate(pipe, "flux", 128, steps=4)
    plain_recorder.handle.remove()
    # step 0 is left as it is with alpha 0, so the step-1 input is the same in both runs
    _, plain_x1, plain_out1, _, _, _, _ = plain_recorder.calls[1]
    torch.testing.assert_close(plain_x1, x1s, atol=1e-6, rtol=0)
    torch.testing.assert_close(raw1, spatial(plain_out1), atol=1e-4, rtol=1e-4)


def test_flux_true_cfg_aligns_both_calls():
    pipe = build("flux")
    hires.apply(pipe, HiresConfig(structure_guidance=_SG))
    alone = generate(pipe, "flux", 128, steps=4, true_cfg_scale=3.0, negative_prompt="blue")
    hires.apply(pipe, _config())
    recorder = _Recorder(pipe)
    aligned = generate(pipe, "flux", 128, steps=4, true_cfg_scale=3.0, negative_prompt="blue")
    recorder.handle.remove()
    assert not torch.equal(aligned, alone)
    assert [c[0] for c in recorder.calls] == [0, 0, 1, 1]  # cond and uncond call at each step


# -- bit-identity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FLOW_FAMILIES)
def test_off_base_size_and_remove_are_bit_identical(family):
    pipe = build(family)
    plain_base = generate(pipe, family, 64, steps=4)
    plain_up = generate(pipe, family, 128, steps=4)
    hires.apply(pipe, HiresConfig(structure_guidance=_SG))
    guided = generate(pipe, family, 128, steps=4)
    hires.apply(pipe, HiresConfig(structure_guidance=_SG,
                                  flow_alignment=FlowAlignmentConfig(enabled=False, betas=0.9)))
    assert torch.equal(generate(pipe, family, 128, steps=4), guided)
    hires.apply(pipe, _config())
    assert torch.equal(generate(pipe, family, 64, steps=4), plain_base)  # no stage at the base size
    generate(pipe, family, 128, steps=4)
    hires.remove(pipe)
    assert torch.equal(generate(pipe, family, 128, steps=4), plain_up)
    assert not any(n.startswith(HOOK_PREFIX) for m in pipe.transformer.modules()
                   for n in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}))


# -- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "pixart"])
def test_families_that_do_not_predict_flow_refuse_it(family):
    pipe = build(family)
    with pytest.raises(ValueError,
                       match=rf"FlowAlignmentConfig aligns a flow-matching model's velocity; family {family!r}"):
        hires.apply(pipe, _config())
    assert not hires.is_applied(pipe)


def test_without_structure_guidance_is_an_error():
    pipe = build("flux")
    with pytest.raises(ValueError, match=r"enable StructureGuidanceConfig\(enabled=True\) as well"):
        hires.apply(pipe, HiresConfig(flow_alignment=FlowAlignmentConfig(enabled=True)))
    assert not hires.is_applied(pipe)


@pytest.mark.parametrize("options,error,match", [
    ({"band": "wavelet"}, ValueError, r"FlowAlignmentConfig.band='wavelet' is not valid"),
    ({"cutoff": 0.0}, ValueError, r"FlowAlignmentConfig.cutoff=0.0 must be in \(0, 1\]"),
    ({"order": 0}, ValueError, r"FlowAlignmentConfig.order=0 must be an int >= 1"),
    ({"order": 2.5}, TypeError, r"FlowAlignmentConfig.order=2.5 is not valid"),
    ({"alphas": 1.5}, ValueError, r"FlowAlignmentConfig.alphas=1.5: each value must be a weight in \[0, 1\]"),
    ({"betas": (0.5, "x")}, ValueError, r"FlowAlignmentConfig.betas="),
])
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        FlowAlignmentConfig(enabled=True, **options)


def test_per_stage_weights_must_match_the_plan():
    pipe = build("flux")
    hires.apply(pipe, _config(alphas=(1.0, 0.25)))
    with pytest.raises(ValueError, match=r"FlowAlignmentConfig.alphas=\(1.0, 0.25\) has 2 values"):
        generate(pipe, "flux", 128, steps=4)
    hires.remove(pipe)


def test_config_round_trips_through_a_mapping():
    config = HiresConfig.from_dict({"structure_guidance": {"enabled": True},
                                    "flow_alignment": {"enabled": True, "alphas": [1.0, 0.25], "band": "dwt"}})
    assert config.flow_alignment == FlowAlignmentConfig(enabled=True, alphas=(1.0, 0.25), band="dwt")
    assert "flow_alignment" in config.enabled_techniques()


def test_composes_with_dype_and_entropy_scaling_on_flux():
    pipe = build("flux")
    config = _config().replace(positions=hires.PositionConfig(enabled=True, timestep_dependent=True),
                               entropy_scaling=hires.EntropyScalingConfig(enabled=True))
    hires.apply(pipe, config)
    image = generate(pipe, "flux", 128, steps=4)
    notes = hires.last_call(pipe).notes
    assert notes["log.flow_alignment.steps"] and notes["log.positions.dype"] and torch.isfinite(image).all()
    hires.remove(pipe)
