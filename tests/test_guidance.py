"""The guidance hook: the pipeline's own combination of what it returns is exactly the guided G."""

import pytest
import torch

import hires
from hires.runtime import get_attachment
from hires.denoiser.guidance import GUIDANCE_HOOK, GuidanceCall, ensure_guidance_hook, prediction_channels
from hires.families import FAMILIES
from tiny_models import CALL_KWARGS, CFG_ARGUMENTS, FAMILY_NAMES, NO_CFG, SEPARATE_CFG, build, generate

TRUE_CFG = CFG_ARGUMENTS["flux"]
CFG_FAMILIES = tuple(f for f in FAMILY_NAMES if f not in NO_CFG)


def cfg_kwargs(family):
    return dict(CFG_ARGUMENTS.get(family, {}))


def cfg_scale(family):
    """The CFG scale of `family`'s call with cfg_kwargs (uncond + w (cond - uncond)); Z-Image's
    guidance_scale 3 combines cond + 3 (cond - uncond): w = 4 (Krea-2's 4.5 likewise: 5.5)."""
    if family in CFG_ARGUMENTS:
        return TRUE_CFG["true_cfg_scale"]
    return CALL_KWARGS[family]["guidance_scale"] + RECORDS[family].guidance_scale_offset


def pipeline_rescale(family, guided, cond):
    """What the pipeline does with the combined prediction: QwenImagePipeline rescales it, per token,
    to the cond prediction's norm; the others take it as it is."""
    if family != "qwenimage":
        return guided
    return guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))


RECORDS = {f.name: f for f in FAMILIES}
# A list of (C, 1, h, w) latents in and negated velocities out (Z-Image); the negated velocity out (HiDream-I1: the
# pipeline flips it back); [cond, uncond] batches (Z-Image).
FRAME_LIST = tuple(f for f in FAMILY_NAMES if RECORDS[f].layout.frame_list)
NEGATED_OUTPUT = tuple(f for f in FAMILY_NAMES if RECORDS[f].layout.negated_output)
COND_FIRST = tuple(f for f in FAMILY_NAMES if RECORDS[f].cfg_cond_first)
# Text rows first on the KV-cache prefill call (Qwen-Image 2.1: the pipeline cuts them).
PREFIXED_OUTPUT = tuple(f for f in FAMILY_NAMES if RECORDS[f].layout.prefixed_output)


class Recorder:
    """Records the denoiser's arguments per call and what the scheduler's step receives."""

    def __init__(self, pipe, family):
        self.pipe, self.family = pipe, family
        self.denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        self.calls, self.stepped = [], []
        self._handle = self.denoiser.register_forward_pre_hook(self._record, with_kwargs=True)
        self._step = pipe.scheduler.step
        pipe.scheduler.step = self._scheduler_step

    def _record(self, module, args, kwargs):
        self.calls.append((args, dict(kwargs)))

    def _scheduler_step(self, model_output, *args, **kwargs):
        self.stepped.append(model_output.detach().clone())
        return self._step(model_output, *args, **kwargs)

    def close(self):
        self._handle.remove()
        del self.pipe.scheduler.step

    def raw(self, index):
        """The denoiser's own output for recorded call `index`, computed below every hook."""
        args, kwargs = self.calls[index]
        with torch.no_grad():
            out = type(self.denoiser).forward(self.denoiser, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out.sample
        if self.family in FRAME_LIST:  # the velocity the scheduler steps with, as a (B, C, h, w) tensor
            out = -torch.stack([frame[:, 0] for frame in out]).float()
        if self.family in NEGATED_OUTPUT:
            out = -out
        if self.family in PREFIXED_OUTPUT:
            out = out[:, -kwargs["hidden_states"].shape[1]:]
        return out

    def raw_pairs(self):
        """(uncond, cond) prediction channels per step, from recomputed raw outputs."""
        channels = prediction_channels(self.denoiser.config)
        cut = (lambda t: t) if channels is None else (lambda t: t[:, :channels])
        pairs = []
        if self.family in SEPARATE_CFG:  # true CFG: cond call then uncond call
            for i in range(0, len(self.calls), 2):
                pairs.append((cut(self.raw(i + 1)), cut(self.raw(i))))
        else:
            for i in range(len(self.calls)):
                out = self.raw(i)
                half = out.shape[0] // 2
                first, second = cut(out[:half]), cut(out[half:])
                pairs.append((second, first) if self.family in COND_FIRST else (first, second))
        return pairs


def odd_combiner(uncond, cond, scale, state):
    # Deliberately not CFG: any G must come out of the pipeline unchanged.
    return cond + 0.5 * scale * torch.tanh(cond - uncond) - 0.1 * uncond


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_the_scheduler_receives_exactly_the_combiners_prediction(family):
    pipe = build(family)
    scale = cfg_scale(family)
    hires.apply(pipe)
    hook = ensure_guidance_hook(get_attachment(pipe))
    hook.set_combiner(odd_combiner, owner="test")
    rec = Recorder(pipe, family)
    generate(pipe, family, 64, steps=3, **cfg_kwargs(family))
    rec.close()
    pairs = rec.raw_pairs()
    assert len(pairs) == len(rec.stepped) == 3
    for (uncond, cond), received in zip(pairs, rec.stepped):
        expected = pipeline_rescale(family, odd_combiner(uncond, cond, scale, None), cond)
        assert received.shape == expected.shape
        torch.testing.assert_close(received, expected, rtol=1e-5, atol=1e-5)
        # and it is not plain CFG (the check can fail)
        assert not torch.allclose(received, pipeline_rescale(family, uncond + scale * (cond - uncond), cond),
                                  atol=1e-3)


@pytest.mark.parametrize("family", ["sd15", "pixart", "flux"])
def test_offsets_are_added_and_can_run_an_extra_pass(family):
    pipe = build(family)
    scale = 3.0 if family == "flux" else {"pixart": 4.5}.get(family, 5.0)
    hires.apply(pipe)
    hook = ensure_guidance_hook(get_attachment(pipe))
    extra = []

    def offset(run, args, kwargs, uncond, cond, state):
        out = run(args, kwargs)
        tensor = out[0] if isinstance(out, tuple) else out.sample
        extra.append(tensor)
        assert isinstance(state.slot(GuidanceCall).step.timestep, float)
        return torch.full_like(uncond, 0.25) if state.step_index != 1 else None

    hook.add_offset("test.constant", offset)
    rec = Recorder(pipe, family)
    generate(pipe, family, 64, steps=3, **cfg_kwargs(family))
    rec.close()
    assert len(extra) == 3  # one extra pass per step, seen by the offset
    for step, ((uncond, cond), received) in enumerate(zip(rec.raw_pairs(), rec.stepped)):
        expected = uncond + scale * (cond - uncond) + (0.25 if step != 1 else 0.0)
        torch.testing.assert_close(received, expected, rtol=1e-5, atol=1e-5)


def test_pixart_learned_sigma_channels_are_left_as_the_model_made_them():
    pipe = build("pixart")
    hires.apply(pipe)
    hook = ensure_guidance_hook(get_attachment(pipe))
    hook.set_combiner(odd_combiner, owner="test")
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    rec = Recorder(pipe, "pixart")
    generate(pipe, "pixart", 64, steps=2)
    rec.close()
    handle.remove()
    for index, returned in enumerate(outputs):
        raw = rec.raw(index)
        assert torch.equal(returned[:, 4:], raw[:, 4:])
        assert torch.equal(returned[:1], raw[:1])  # the uncond half passes through as well
        assert not torch.equal(returned[1:, :4], raw[1:, :4])


@pytest.mark.parametrize("family", CFG_FAMILIES)
def test_inactive_steps_and_removal_are_bit_identical(family):
    pipe = build(family)
    plain = generate(pipe, family, 64, steps=3, **cfg_kwargs(family))
    hires.apply(pipe)
    hook = ensure_guidance_hook(get_attachment(pipe))
    assert ensure_guidance_hook(get_attachment(pipe)) is hook  # installed once
    hook.set_combiner(lambda u, c, w, state: None, owner="test")
    hook.add_offset("test.off", lambda *a: None)
    assert torch.equal(generate(pipe, family, 64, steps=3, **cfg_kwargs(family)), plain)
    hires.remove(pipe)
    registry = getattr(pipe.unet if hasattr(pipe, "unet") else pipe.transformer, "_diffusers_hook", None)
    assert registry is None or GUIDANCE_HOOK not in registry.hooks
    assert torch.equal(generate(pipe, family, 64, steps=3, **cfg_kwargs(family)), plain)


@pytest.mark.parametrize(
    "family, overrides, match",
    [
        ("sd15", {"guidance_scale": 1.0}, r"guidance_scale=1\.0.*pass guidance_scale > 1"),
        ("flux", {}, r"true_cfg_scale=1\.0.*negative_prompt"),
        ("flux", {"true_cfg_scale": 3.0}, r"negative prompt given: False.*negative_prompt"),
        ("flux2_klein", {"guidance_scale": 1.0}, r"guidance_scale=1\.0.*pass guidance_scale > 1"),
        ("chroma", {"guidance_scale": 1.0}, r"guidance_scale=1\.0.*pass guidance_scale > 1"),
        ("qwenimage", {}, r"true_cfg_scale=1\.0.*negative_prompt"),
        ("qwenimage", {"true_cfg_scale": 3.0}, r"negative prompt given: False.*negative_prompt"),
        ("qwenimage21", {}, r"true_cfg_scale=1\.0.*negative_prompt"),
    ],
)
def test_a_combiner_without_cfg_raises_naming_the_parameter(family, overrides, match):
    pipe = build(family)
    hires.apply(pipe)
    ensure_guidance_hook(get_attachment(pipe)).set_combiner(odd_combiner, owner="TestConfig")
    with pytest.raises(ValueError, match=match):
        generate(pipe, family, 64, steps=2, **overrides)
    assert get_attachment(pipe).state is None


def test_offsets_without_cfg_pass_through():
    pipe = build("sd15")
    plain = generate(pipe, "sd15", 64, steps=2, guidance_scale=1.0)
    hires.apply(pipe)
    ensure_guidance_hook(get_attachment(pipe)).add_offset("test.big", lambda *a: torch.ones(1))
    assert torch.equal(generate(pipe, "sd15", 64, steps=2, guidance_scale=1.0), plain)


def test_two_combiners_conflict():
    pipe = build("sd15")
    hires.apply(pipe)
    hook = ensure_guidance_hook(get_attachment(pipe))
    hook.set_combiner(odd_combiner, owner="AConfig")
    with pytest.raises(ValueError, match="AConfig"):
        hook.set_combiner(odd_combiner, owner="BConfig")
