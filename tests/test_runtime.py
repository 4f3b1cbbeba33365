"""apply / remove on every family: bit-identity, idempotence, no trace, offload, interrupted calls."""

import pytest
import torch

import hires
from hires.runtime import HOOK_PREFIX, get_attachment
from tiny_models import CFG_ARGUMENTS, SEPARATE_CFG, build, generate, step_callback
from surface_support import denoised_size

SIZE = 128  # 2x the tiny models' base side


def _hires_hook_names(pipe):
    names = []
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for module in component.modules():
                registry = getattr(module, "_diffusers_hook", None)
                if registry is not None:
                    names += [n for n in registry.hooks if n.startswith(HOOK_PREFIX)]
    return names


def _snapshot(pipe):
    """Instance attributes of the pipeline and of every module: what 'no trace' is checked against."""
    modules = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for sub_name, module in component.named_modules():
                modules[f"{name}.{sub_name}"] = sorted(module.__dict__)
    return sorted(pipe.__dict__), modules


def test_default_config_and_removal_are_bit_identical_to_plain(family):
    pipe = build(family)
    plain = generate(pipe, family, SIZE)
    before = _snapshot(pipe)

    hires.apply(pipe, hires.HiresConfig())
    assert hires.is_applied(pipe)
    applied = generate(pipe, family, SIZE)
    hires.remove(pipe)
    assert not hires.is_applied(pipe)
    removed = generate(pipe, family, SIZE)

    assert torch.equal(plain, applied)
    assert torch.equal(plain, removed)
    assert _snapshot(pipe) == before
    assert _hires_hook_names(pipe) == []


def test_applying_twice_equals_applying_once(family):
    pipe = build(family)
    hires.apply(pipe, hires.HiresConfig())
    once = generate(pipe, family, SIZE)
    hooks_once = _hires_hook_names(pipe)
    hires.apply(pipe, hires.HiresConfig())
    assert _hires_hook_names(pipe) == hooks_once
    assert torch.equal(generate(pipe, family, SIZE), once)
    hires.remove(pipe)
    assert _hires_hook_names(pipe) == []


def test_remove_on_a_pipeline_never_applied_is_a_no_op():
    pipe = build("sd15")
    before = _snapshot(pipe)
    assert hires.remove(pipe) is pipe
    assert _snapshot(pipe) == before


def test_call_state_is_built_from_the_call_and_dropped_after_it(family):
    pipe = build(family)
    hires.apply(pipe, hires.HiresConfig())
    generate(pipe, family, (128, 64), steps=4)
    attachment = get_attachment(pipe)
    assert attachment.state is None
    record = hires.last_call(pipe)
    assert (record.height, record.width) == denoised_size(family, 128, 64)
    assert record.completed
    # one denoiser call per step: classifier-free guidance is batched, Flux and Flux.2 [dev] are
    # guidance-distilled; true-CFG families (Klein, Chroma) call it twice per step
    calls = 2 if family in SEPARATE_CFG and family not in CFG_ARGUMENTS else 1
    assert record.steps_seen == tuple(step for step in range(4) for _ in range(calls))


def test_state_seen_by_hooks_during_the_call(family):
    pipe = build(family)
    hires.apply(pipe, hires.HiresConfig())
    seen = []

    def record(p, step):
        state = get_attachment(p).state
        seen.append((state.step_index, state.height, state.width, state.area_scale, state.num_steps))

    generate(pipe, family, (64, 128), steps=3, **step_callback(family, record))
    height, width = denoised_size(family, 64, 128)
    assert seen == [(i, height, width, height * width / 64**2, 3) for i in range(3)]


def test_a_call_that_raises_leaves_no_state(family):
    pipe = build(family)
    hires.apply(pipe, hires.HiresConfig())

    def explode(p, step):
        if step == 1:
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        generate(pipe, family, SIZE, steps=4, **step_callback(family, explode))
    attachment = get_attachment(pipe)
    assert attachment.state is None and not attachment._in_call
    assert hires.last_call(pipe).completed is False

    after = generate(pipe, family, SIZE)
    fresh = build(family)
    hires.apply(fresh, hires.HiresConfig())
    assert torch.equal(after, generate(fresh, family, SIZE))


def test_denoiser_called_outside_a_pipeline_call_is_untouched():
    pipe = build("sd15")
    hires.apply(pipe, hires.HiresConfig())
    sample = torch.randn(1, 4, 16, 16)
    text = torch.randn(1, 16, 32)
    out = pipe.unet(sample, 10, encoder_hidden_states=text).sample
    hires.remove(pipe)
    assert torch.equal(out, pipe.unet(sample, 10, encoder_hidden_states=text).sample)
    assert get_attachment(pipe) is None


@pytest.mark.parametrize("order", ["offload_then_apply", "apply_then_offload"])
def test_model_cpu_offload_before_or_after_apply(order):
    # accelerate refuses offload without an accelerator unless the device is named; "cpu" exercises
    # the same hooks (module.forward wrapped by accelerate around ours, or ours around accelerate's).
    family = "sd15"
    plain = generate(build(family), family, SIZE)
    pipe = build(family)
    if order == "offload_then_apply":
        pipe.enable_model_cpu_offload(device="cpu")
        hires.apply(pipe, hires.HiresConfig())
    else:
        hires.apply(pipe, hires.HiresConfig())
        pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(generate(pipe, family, SIZE), plain)
    assert hires.last_call(pipe).steps_seen == (0, 1, 2)
    hires.remove(pipe)
    assert _hires_hook_names(pipe) == []
    assert hasattr(pipe.unet, "_hf_hook"), "accelerate's offload hook must survive hires.remove"
    assert torch.equal(generate(pipe, family, SIZE), plain)


def test_sequential_cpu_offload_with_apply():
    family = "sd15"
    plain = generate(build(family), family, SIZE)
    reference = build(family)
    reference.enable_sequential_cpu_offload(device="cpu")
    try:
        generate(reference, family, SIZE)
    except (RuntimeError, TypeError, ValueError) as err:
        # accelerate 1.x cannot re-materialise transformers' text-encoder tensors on "cpu":
        # plain diffusers fails the same way, before hires is involved at all.
        pytest.skip(f"sequential offload on CPU fails in plain diffusers here: {type(err).__name__}: {str(err)[:80]}")
    pipe = build(family)
    hires.apply(pipe, hires.HiresConfig())
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert torch.equal(generate(pipe, family, SIZE), plain)
    hires.remove(pipe)
    assert torch.equal(generate(pipe, family, SIZE), plain)


@pytest.mark.parametrize(
    "family, overrides, expected",
    [
        ("sd15", {"guidance_scale": 5.0}, 5.0),
        ("sd15", {"guidance_scale": 1.0}, None),
        ("pixart", {}, 4.5),
        ("sd3", {}, 5.0),
        ("flux", {}, None),  # guidance-distilled: guidance_scale feeds the embedding, no CFG
        ("flux", {"true_cfg_scale": 2.5, "negative_prompt": "a blue square"}, 2.5),
        ("flux2", {}, None),  # guidance-distilled, no CFG at all
        ("flux2_klein", {}, 4.0),  # true CFG against the empty prompt
        ("flux2_klein", {"guidance_scale": 1.0}, None),
        ("chroma", {}, 5.0),  # true CFG with the (empty) negative prompt
        ("chroma", {"guidance_scale": 1.0}, None),
        ("qwenimage", {}, None),  # true CFG only, and no negative prompt
        ("qwenimage", {"true_cfg_scale": 2.5, "negative_prompt": "a blue square"}, 2.5),
        # Z-Image combines cond + s (cond - uncond), CFG for any s > 0: w = s + 1
        ("zimage", {}, 4.0),
        ("zimage", {"guidance_scale": 0.5}, 1.5),
        ("zimage", {"guidance_scale": 0.0}, None),  # Turbo
        ("qwenimage21", {}, None),  # true CFG only
        ("qwenimage21", {"true_cfg_scale": 2.5, "negative_prompt": "a blue square"}, 2.5),
    ],
)
def test_call_state_knows_the_guidance_scale_the_pipeline_combines_with(family, overrides, expected):
    pipe = build(family)
    hires.apply(pipe, hires.HiresConfig())
    seen = []
    generate(pipe, family, 64, steps=2, **overrides,
             **step_callback(family, lambda p, step: seen.append(get_attachment(p).state.guidance_scale)))
    assert seen == [expected, expected]


def test_derived_generators_follow_the_call_seed_without_consuming_it():
    pipe = build("sd15")
    hires.apply(pipe, hires.HiresConfig())
    draws = {}

    def record(seed):
        def callback(p, step):
            if step == 0:
                draws[seed] = torch.rand(4, generator=get_attachment(p).state.generator("windows"))
        return callback

    a = generate(pipe, "sd15", 64, seed=1, **step_callback("sd15", record(1)))
    generate(pipe, "sd15", 64, seed=2, **step_callback("sd15", record(2)))
    again = generate(pipe, "sd15", 64, seed=1, **step_callback("sd15", record("1b")))
    assert torch.equal(draws[1], draws["1b"]) and not torch.equal(draws[1], draws[2])
    assert torch.equal(a, again)
    hires.remove(pipe)
    assert torch.equal(generate(pipe, "sd15", 64, seed=1), a)


def test_apply_without_a_config_uses_the_automatic_preset_which_leaves_the_base_size_alone(family):
    from hires.presets import automatic_config

    pipe = build(family)
    plain = generate(pipe, family, 64)
    hires.apply(pipe)
    attachment = get_attachment(pipe)
    assert attachment.config == automatic_config(attachment.info)
    assert attachment.config.enabled_techniques()
    assert torch.equal(generate(pipe, family, 64), plain)
    explicit = hires.HiresConfig()
    hires.apply(pipe, explicit)
    assert get_attachment(pipe).config is explicit
