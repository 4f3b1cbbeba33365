"""A new family of an existing layout is one `Family` record plus its tiny model: this file adds one from outside
hires (a pipeline class of its own on Flux's layout) and nothing else names it."""

import pickle

import pytest
import torch
from diffusers import FluxPipeline

import hires
from hires import families
from hires.sampling.stages import StageRequest
from tiny_models import build, generate

BASE, SIZE = 64, 128  # the tiny Flux's base side, and 2x it


class MyFluxPipeline(FluxPipeline):
    """A pipeline class of its own (as a fine-tune might ship) on Flux's latent layout."""


RECORD = families.Family(
    name="my_flux",
    pipeline_classes=("MyFluxPipeline",),
    denoiser_attr="transformer",
    denoiser_class="FluxTransformer2DModel",
    architecture="dit",
    base_size_source=("pipeline", "default_sample_size"),
    prediction_source="flow",
    layout=families.PACKED_IDS,
    text_tokens=512,
    timestep_input_scale=1.0 / 1000.0,
    position_encoding="rope",
    guidance_layout="separate",
    guidance_scale_name="true_cfg_scale",
    cfg_switch="do_true_cfg",
    automatic_preset="flux",
)


@pytest.fixture
def my_flux(monkeypatch):
    """The tiny model: the tiny Flux's components in MyFluxPipeline, with the record registered."""
    import hires.pipelines  # noqa: F401  its table of shipped ready classes is built before the record is added

    monkeypatch.setattr(families, "FAMILIES", families.FAMILIES + (RECORD,))
    tiny = build("flux")
    pipe = MyFluxPipeline(**tiny.components)
    pipe.default_sample_size = tiny.default_sample_size  # the tiny model's 64 px base (an instance attribute)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_new_family_is_recognised_by_its_own_record(my_flux):
    info = hires.model_info(my_flux)
    assert info.family is RECORD
    assert (info.base_height, info.base_width, info.size_multiple, info.prediction_type) == (BASE, BASE, 16, "flow")
    assert hires.model_info(build("flux")).name == "flux"  # Flux's own pipeline keeps its family


def test_off_is_plain_diffusers_the_automatic_preset_runs_at_2x_and_remove_is_exact(my_flux):
    from hires.presets import automatic_config

    base, plain = generate(my_flux, "flux", BASE), generate(my_flux, "flux", SIZE)
    hires.apply(my_flux, hires.HiresConfig())
    assert torch.equal(generate(my_flux, "flux", BASE), base)
    assert torch.equal(generate(my_flux, "flux", SIZE), plain)
    hires.remove(my_flux)

    hires.apply(my_flux)
    preset = hires.runtime.get_attachment(my_flux).config
    assert preset == automatic_config(hires.model_info(build("flux")))  # Flux's evidence, Flux's facts
    assert preset.structure_guidance.enabled and preset.window_attention.enabled and preset.memory.enabled
    assert torch.equal(generate(my_flux, "flux", BASE), base)  # the preset leaves the base size alone
    scaled = generate(my_flux, "flux", SIZE)
    assert scaled.shape == plain.shape and torch.isfinite(scaled).all() and not torch.equal(scaled, plain)
    stages = hires.runtime.stage_plan(hires.model_info(my_flux), preset, StageRequest(SIZE, SIZE, 3))
    assert [(stage.height, stage.width) for stage in stages] == [(BASE, BASE), (SIZE, SIZE)]
    assert (hires.last_call(my_flux).height, hires.last_call(my_flux).completed) == (SIZE, True)
    hires.remove(my_flux)
    assert torch.equal(generate(my_flux, "flux", SIZE), plain)
    assert torch.equal(generate(my_flux, "flux", BASE), base)


def test_the_new_family_has_its_ready_class(my_flux):
    ready = hires.HiresMyFluxPipeline
    assert "HiresMyFluxPipeline" in dir(hires) and ready is hires.pipelines.ready_class(MyFluxPipeline)
    assert (ready.__module__, ready.__qualname__) == ("hires.pipelines", "HiresMyFluxPipeline")
    assert ready.__mro__[1:3] == (hires.pipelines.HiresPipelineMixin, MyFluxPipeline)
    assert pickle.loads(pickle.dumps(ready)) is ready
    pipe = ready.from_pipe(my_flux)
    pipe.default_sample_size = my_flux.default_sample_size
    pipe.set_progress_bar_config(disable=True)
    base = generate(my_flux, "flux", BASE)
    assert torch.equal(generate(pipe, "flux", BASE), base)  # the automatic preset at the base size
    assert hires.model_info(pipe).family is RECORD
    off = generate(pipe, "flux", SIZE, hires_config=hires.HiresConfig())
    assert torch.equal(off, generate(my_flux, "flux", SIZE))
