"""hires on Modular Diffusers pipelines (hires.modular): apply / remove exactness, every applicable technique
above the base size, agreement with the classic pipelines, HiresStagesStep inserted by hand and loaded from a
custom-block folder, and what is refused. Tiny models, 64 px base, 2 steps."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import hires
import surface_support
import tiny_models as tm
import tiny_modular as tmod
from hires.presets import automatic_config
from hires.sampling.stages import ENGINE_ATTRIBUTE

BASE, SIZE, STEPS = 64, 128, 2
# Every family's modular pipeline runs every technique that applies to it.
TECHNIQUE_FAMILIES = tmod.FAMILIES
STAGED = ("structure_guidance_latent", "structure_guidance_pixel", "structure_guidance_respaced", "bottleneck",
          "flow_alignment", "skip_residual", "memory_staged")

_PIPES: dict = {}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the modular pipelines warn about every input they do not take
        yield


def pipeline(family: str):
    """One tiny modular pipeline per family for the whole module (hires is removed after each test)."""
    if family not in _PIPES:
        _PIPES[family] = tmod.build(family)
    return _PIPES[family]


@pytest.fixture
def modular(request):
    family = request.param
    pipe = pipeline(family)
    yield family, pipe
    hires.remove(pipe)


def run(pipe, family, size=BASE, **kwargs):
    return tmod.generate(pipe, family, size=size, steps=STEPS, **kwargs)


def stage_sizes(pipe) -> list[tuple[int, int]]:
    engine = pipe.__dict__.get(ENGINE_ATTRIBUTE)
    assert engine is not None and engine.last_run is not None, "no stage ran"
    return [(stage.height, stage.width) for stage in engine.last_run]


def snapshot(pipe):
    """Instance attribute names of the pipeline, of every module and other component, and of every block of its
    graph: what "no trace" after hires.remove is checked against."""
    parts = {"pipe": sorted(pipe.__dict__)}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for sub_name, module in component.named_modules():
                parts[f"{name}.{sub_name}"] = sorted(module.__dict__)
        elif component is not None and hasattr(component, "__dict__"):
            parts[name] = sorted(component.__dict__)
    for index, block in enumerate(hires.modular.blocks.graph_blocks(pipe._blocks)):
        parts[f"block {index} {type(block).__name__}"] = sorted(block.__dict__)
    return parts


def preset(pipe) -> hires.HiresConfig:
    return dataclasses.replace(automatic_config(hires.model_info(pipe)), base_size=BASE)


@pytest.mark.parametrize("modular", tmod.FAMILIES, indirect=True)
def test_the_preset_is_exact_at_the_base_size_and_after_remove_and_stages_above_it(modular):
    family, pipe = modular
    plain = run(pipe, family)
    before = snapshot(pipe)
    hires.apply(pipe, preset(pipe))
    assert torch.equal(run(pipe, family), plain)
    assert hires.last_call(pipe).height == BASE
    image = run(pipe, family, size=SIZE)
    assert image.shape[-2:] == (SIZE, SIZE) and bool(torch.isfinite(image).all())
    assert stage_sizes(pipe) == [(BASE, BASE), (SIZE, SIZE)]
    last = hires.last_call(pipe)
    assert (last.height, last.width, last.completed) == (SIZE, SIZE, True)
    graph_before = list(pipe._blocks.sub_blocks)
    hires.remove(pipe)
    assert list(pipe._blocks.sub_blocks) == graph_before
    assert type(pipe._blocks.sub_blocks["denoise"]).__name__ != "HiresStagesStep"
    assert snapshot(pipe) == before
    assert torch.equal(run(pipe, family), plain)


def _record(family: str):
    name = "flux3" if family.startswith("flux3") else family
    return next(f for f in hires.families.FAMILIES if f.name == name)


def modular_techniques(family: str) -> list[str]:
    """The techniques that apply to the family's modular pipeline: those of its classic pipeline
    (tests/surface_support.py), APG only where the pipeline has a CFG guider; Flux 3's own list."""
    record = _record(family)
    if record.name == "flux3":
        names = ["structure_guidance_latent", "structure_guidance_pixel", "structure_guidance_respaced", "bottleneck",
                 "flow_alignment", "attention_backend", "positions", "dype", "skip_residual", "dilated_sampling",
                 "dilated_sampling_local", "vae_tiling", "memory", "memory_staged", "apg"]
    else:
        names = [n for n in surface_support.techniques_for(record.name) if n != surface_support.PRESET]
    if family not in tmod.GUIDERS:
        names = [n for n in names if n != "apg"]
    if record.modular_attention_masked:
        names = [n for n in names if n not in ("scale_fusion", "dilated_sampling", "dilated_sampling_local")]
    return names


def technique_config(family: str, technique: str) -> hires.HiresConfig:
    options = surface_support.technique_options(_record(family).name, technique)
    if _record(family).name == "flux3" and technique == "memory":
        options["memory"].pop("feed_forward_chunks", None)  # Flux 3's blocks have no diffusers chunking
    return hires.HiresConfig.from_dict({**options, "base_size": BASE})


TECHNIQUE_CASES = [(family, technique) for family in TECHNIQUE_FAMILIES for technique in modular_techniques(family)]


ALL_TECHNIQUES = ("structure_guidance_latent", "structure_guidance_pixel", "structure_guidance_respaced", "bottleneck",
                  "flow_alignment", "redilation", "rau_net", "entropy_scaling", "window_attention", "scale_fusion",
                  "attention_backend", "apg", "positions", "dype", "skip_residual", "dilated_sampling",
                  "dilated_sampling_local", "vae_tiling", "memory", "memory_staged")


@pytest.mark.parametrize("family", TECHNIQUE_FAMILIES)
def test_the_techniques_run_below_are_those_hires_accepts_for_the_modular_pipeline(family):
    info = hires.model_info(pipeline(family))
    accepted = []
    for technique in ALL_TECHNIQUES:
        try:
            technique_config(family, technique).validate_for(info)
        except ValueError:
            continue
        accepted.append(technique)
    listed = modular_techniques(family)
    assert set(listed) <= set(accepted)
    # DyPE (PositionConfig.timestep_dependent) is for plain RoPE ids only, which its installer checks
    assert set(accepted) - set(listed) <= {"dype"}


@pytest.mark.parametrize("family,technique", TECHNIQUE_CASES)
def test_every_applicable_technique_runs_above_the_base_size(family, technique):
    pipe = pipeline(family)
    plain = run(pipe, family)
    steps = 3 if technique == "bottleneck" else STEPS  # one step per stage at least
    try:
        hires.apply(pipe, technique_config(family, technique))
        image = tmod.generate(pipe, family, size=SIZE, steps=steps)
        assert image.shape[-2:] == (SIZE, SIZE) and bool(torch.isfinite(image).all())
        last = hires.last_call(pipe)
        assert (last.height, last.width, last.completed) == (SIZE, SIZE, True)
        if technique in STAGED:
            sizes = stage_sizes(pipe)
            assert len(sizes) > 1 and sizes[-1] == (SIZE, SIZE)
    finally:
        hires.remove(pipe)
    assert torch.equal(run(pipe, family), plain)


def test_attention_rewrites_are_refused_on_flux3_with_the_reason():
    pipe = pipeline("flux3")
    with pytest.raises(ValueError, match="WindowAttentionConfig.*flux3.*Flux3AttnProcessor"):
        hires.apply(pipe, hires.HiresConfig(window_attention=hires.WindowAttentionConfig(enabled=True),
                                            base_size=BASE))
    assert not hires.is_applied(pipe)


# Classic call arguments that give the modular pipeline's plain image (tests/tiny_modular.py's guiders): the
# families where both forms agree bit for bit. SDXL and Z-Image batch CFG in their classic form (a float
# rounding apart), so they are compared without CFG.
CLASSIC_AGREES = {
    "flux": ({"guidance_scale": 3.5}, None, {}),
    "flux2": ({"guidance_scale": 4.0}, None, {}),
    "flux2_klein": ({"guidance_scale": 4.0}, dict(guidance_scale=4.0), {}),
    "qwenimage": ({"true_cfg_scale": 4.0, "negative_prompt": " "}, dict(guidance_scale=4.0), {"negative_prompt": " "}),
    "sdxl": ({"guidance_scale": 1.0}, dict(guidance_scale=1.0), {}),
    "zimage": ({"guidance_scale": 0.0}, dict(guidance_scale=0.0, enabled=False), {}),
}


@pytest.mark.parametrize("family", CLASSIC_AGREES)
def test_hires_gives_the_same_image_through_the_classic_and_the_modular_pipeline(family):
    from diffusers import ClassifierFreeGuidance

    classic_kwargs, guider, modular_kwargs = CLASSIC_AGREES[family]
    classic = tm.build(family)
    pipe = tmod.build(family, classic)
    if guider is not None:
        pipe.update_components(guider=ClassifierFreeGuidance(**guider))
    call = dict(prompt="a red circle", num_inference_steps=STEPS, output_type="pt")
    if family != "sdxl":
        call["max_sequence_length"] = tm.TEXT_LEN

    def classic_image(size):
        return classic(**call, **classic_kwargs, height=size, width=size,
                       generator=torch.Generator("cpu").manual_seed(0)).images

    def modular_image(size):
        return pipe(**call, **modular_kwargs, height=size, width=size, generator=torch.Generator("cpu").manual_seed(0),
                    output="images")

    assert torch.equal(classic_image(SIZE), modular_image(SIZE))  # the plain images agree
    config = hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True, space="latent"),
                               base_size=BASE)
    hires.apply(classic, config)
    expected = classic_image(SIZE)
    hires.remove(classic)  # the two pipelines share their modules: one carries hires' hooks at a time
    hires.apply(pipe, config)
    try:
        image = modular_image(SIZE)
        if family == "flux2_klein":
            # Klein's classic stages return the VAE's own latent (output_type="latent"), which hires turns back into
            # the denoiser's latent between stages: a float rounding the modular stages, handed the loop's
            # latents, do not have.
            torch.testing.assert_close(image, expected, rtol=0, atol=1e-5)
        else:
            assert torch.equal(image, expected)
        assert stage_sizes(pipe) == [(BASE, BASE), (SIZE, SIZE)]
    finally:
        hires.remove(pipe)


BY_HAND = ("sdxl", "flux3")


def _structure_config():
    return hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True, space="latent"),
                             base_size=BASE)


def _applied_stages_image(family: str):
    """The family's shared pipeline, the stages config, and the image `hires.apply` gives with it at SIZE
    (hires removed again)."""
    applied, config = pipeline(family), _structure_config()
    hires.apply(applied, config)
    expected = run(applied, family, size=SIZE)
    hires.remove(applied)
    return applied, config, expected


@pytest.mark.parametrize("family", BY_HAND)
def test_the_stages_block_inserted_by_hand_equals_apply(family):
    from hires.modular import HiresStagesStep

    applied = pipeline(family)
    config = _structure_config()
    plain = run(applied, family, size=SIZE)
    hires.apply(applied, config)
    expected = run(applied, family, size=SIZE)
    hires.remove(applied)

    graph = tmod.blocks(family)
    graph.sub_blocks["denoise"] = HiresStagesStep(graph.sub_blocks["denoise"], config)
    by_hand = tmod.init(graph, family, tmod.shared_parts(applied))  # the same modules
    assert not hires.is_applied(by_hand)
    assert torch.equal(run(by_hand, family, size=SIZE), expected)
    assert hires.is_applied(by_hand) and stage_sizes(by_hand) == [(BASE, BASE), (SIZE, SIZE)]
    hires.remove(by_hand)
    # the block stays in the graph the user built and runs the wrapped block as it is
    assert isinstance(by_hand._blocks.sub_blocks["denoise"], HiresStagesStep)
    assert torch.equal(run(by_hand, family, size=SIZE), plain)
    assert not hires.is_applied(by_hand)


def test_the_stages_block_loads_from_a_custom_block_folder(tmp_path):
    from diffusers import ModularPipelineBlocks

    from hires.modular import HiresStagesStep, save_block_folder

    family = "sdxl"
    applied, config, expected = _applied_stages_image(family)

    folder = save_block_folder(tmp_path / "hires_stages", config)
    assert sorted(p.name for p in folder.iterdir())[-1] == "modular_config.json"
    graph = tmod.blocks(family)
    block = ModularPipelineBlocks.from_pretrained(str(folder), trust_remote_code=True,
                                                  inner=graph.sub_blocks["denoise"])
    assert isinstance(block, HiresStagesStep) and block.hires_config == config
    graph.sub_blocks["denoise"] = block
    loaded = tmod.init(graph, family, tmod.shared_parts(applied))
    try:
        assert torch.equal(run(loaded, family, size=SIZE), expected)
    finally:
        hires.remove(loaded)
    with pytest.raises(ValueError, match="trust_remote_code"):
        ModularPipelineBlocks.from_pretrained(str(folder), trust_remote_code=False, inner=graph.sub_blocks["denoise"])


def test_apg_needs_a_plain_cfg_guider():
    from diffusers import AdaptiveProjectedGuidance, ClassifierFreeGuidance

    pipe = tmod.build("sdxl", tm.build("sdxl"))
    pipe.update_components(guider=AdaptiveProjectedGuidance(guidance_scale=5.0))
    with pytest.raises(ValueError, match="APGConfig.*ClassifierFreeGuidance.*AdaptiveProjectedGuidance"):
        hires.apply(pipe, hires.HiresConfig(apg=hires.APGConfig(enabled=True), base_size=BASE))
    # a step window runs the cond pass alone on some steps: hires could not pair the passes
    pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=5.0, start=0.2))
    with pytest.raises(ValueError, match=r"APGConfig.*ClassifierFreeGuidance\(guidance_rescale=0.0, start=0.2"):
        hires.apply(pipe, hires.HiresConfig(apg=hires.APGConfig(enabled=True), base_size=BASE))
    pipe.update_components(guider=AdaptiveProjectedGuidance(guidance_scale=5.0))
    hires.apply(pipe, preset(pipe))  # techniques that leave CFG alone run beside any guider
    assert run(pipe, "sdxl", size=SIZE).shape[-2:] == (SIZE, SIZE)
    hires.remove(pipe)


def test_a_modular_pipeline_hires_does_not_know_is_refused_by_name():
    from diffusers import ModularPipeline, SequentialPipelineBlocks

    pipe = ModularPipeline(SequentialPipelineBlocks())
    with pytest.raises(TypeError, match="ModularPipeline is not supported.*Modular Diffusers: .*Flux3ModularPipeline"):
        hires.apply(pipe)
    hires.remove(pipe)  # a modular pipeline is a pipeline: remove is a no-op on one never applied


def test_staged_techniques_refuse_a_modular_image_to_image_call():
    family = "sdxl"
    pipe = pipeline(family)
    hires.apply(pipe, _structure_config())
    try:
        with pytest.raises(ValueError, match="image=.*structure_guidance"):
            run(pipe, family, size=SIZE, image=torch.rand(1, 3, SIZE, SIZE), strength=0.5)
    finally:
        hires.remove(pipe)


def test_flux3_reads_its_half_step_position_ids_and_its_default_base():
    pipe = pipeline("flux3")
    info = hires.model_info(pipe)
    assert (info.name, info.base_height, info.latent_factor, info.patch_size) == ("flux3", 1024, 8, 2)
    assert hires.model_info(pipeline("flux3_distilled")).family.runs_cfg is False  # no guider
    assert info.family.cfg_separate  # CFG through its guider
    seen = []
    hires.apply(pipe, hires.HiresConfig(base_size=BASE))

    def probe(module, args, kwargs):
        seen.append(kwargs["img_ids"][:, 1].max().item())

    handle = pipe.transformer.register_forward_pre_hook(probe, with_kwargs=True)
    try:
        run(pipe, "flux3", size=SIZE)
        last = hires.last_call(pipe)
    finally:
        handle.remove()
        hires.remove(pipe)
    assert seen[0] == 0.5 * (SIZE // 16 - 1)  # half a unit per token row ...
    assert (last.height, last.width) == (SIZE, SIZE)  # ... read back as the 128 px grid it is


def test_hires_apg_on_the_raw_output_is_diffusers_adaptive_projected_guidance_in_its_original_formulation():
    """The formula the README compares: hires' APG with w on the raw output and an absolute threshold r equals
    diffusers' AdaptiveProjectedGuidance(guidance_scale=w - 1, use_original_formulation=True) with rescale r."""
    from diffusers import AdaptiveProjectedGuidance, ClassifierFreeGuidance

    family, w, r, eta, beta = "sdxl", 5.0, 2.0, 0.0, -0.5
    pipe = tmod.build(family, tm.build(family))
    pipe.update_components(guider=ClassifierFreeGuidance(guidance_scale=w))
    hires.apply(pipe, hires.HiresConfig(apg=hires.APGConfig(enabled=True, eta=eta, norm_threshold=r, momentum=beta,
                                                            space="output"), base_size=BASE))
    ours = tmod.generate(pipe, family, steps=3)
    hires.remove(pipe)
    plain_cfg = tmod.generate(pipe, family, steps=3)
    pipe.update_components(guider=AdaptiveProjectedGuidance(
        guidance_scale=w - 1, adaptive_projected_guidance_momentum=beta, adaptive_projected_guidance_rescale=r,
        eta=eta, use_original_formulation=True))
    theirs = tmod.generate(pipe, family, steps=3)
    assert (ours - plain_cfg).abs().max() > 1e-3  # APG changed the image ...
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)  # ... exactly as the guider does


def test_scale_fusion_is_refused_on_modular_qwen_image_for_its_text_mask():
    pipe = pipeline("qwenimage")
    with pytest.raises(ValueError, match="ScaleFusionConfig.*encoder_hidden_states_mask"):
        hires.apply(pipe, hires.HiresConfig(scale_fusion=hires.ScaleFusionConfig(enabled=True), base_size=BASE))


def test_a_per_stage_guidance_scale_is_the_guiders_during_that_stage():
    family = "sdxl"
    pipe = pipeline(family)
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(pipe.guider.guidance_scale))
    config = hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True, space="latent",
                                                                                guidance_scale=3.0), base_size=BASE)
    hires.apply(pipe, config)
    try:
        run(pipe, family, size=SIZE)
    finally:
        handle.remove()
        hires.remove(pipe)
    base_passes = 2 * STEPS  # cond and uncond at every step of the base stage
    assert seen[:base_passes] == [5.0] * base_passes and set(seen[base_passes:]) == {3.0}
    assert pipe.guider.guidance_scale == 5.0 and "guidance_scale" in pipe.guider.__dict__


def test_the_stages_block_survives_a_workflow_selection():
    """get_workflow() flattens every block with sub_blocks; the stages block keeps its wrapped block to itself."""
    from hires.modular import HiresStagesStep

    family = "sdxl"
    applied, config, expected = _applied_stages_image(family)
    graph = tmod.blocks(family)
    graph.sub_blocks["denoise"] = HiresStagesStep(graph.sub_blocks["denoise"], config)
    workflow = graph.get_workflow("text2image")
    assert isinstance(workflow.sub_blocks["denoise"], HiresStagesStep)
    selected = tmod.init(workflow, family, tmod.shared_parts(applied))
    try:
        assert torch.equal(run(selected, family, size=SIZE), expected)
    finally:
        hires.remove(selected)
