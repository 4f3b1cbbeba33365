"""Ready pipeline classes and the community-pipeline files."""

from pathlib import Path

import pytest
import torch

import hires
from hires.families import FAMILIES, ready_class_name
from hires.presets import automatic_config
from surface_support import FIXED_BASE
from surface_support import READY as READY_CLASSES
from tiny_models import build, generate

ROOT = Path(__file__).resolve().parents[1]
# family -> (its ready class, its community-pipeline file), from the records: one family per ready class
# (sd21 shares sd15's) and the file under pipelines/ that names the class.
READY = {family: (cls, file) for family, (cls, file) in READY_CLASSES.items() if family != "sd21"}


def _community_file(class_name: str) -> str:
    """The text every community-pipeline file holds but its first line, for the ready class `class_name`."""
    return ("\n"
            '    DiffusionPipeline.from_pretrained(path, custom_pipeline="pipelines/{file}", '
            'trust_remote_code=True)\n'
            "\n"
            "The logic lives in the installed `hires` package; this file only names the class to load.\n"
            '"""\n'
            "\n"
            f"from hires.pipelines import {class_name}\n"
            "\n"
            f'__all__ = ["{class_name}"]\n')


def test_every_family_record_has_its_ready_classes_and_community_files():
    classic = {ready_class_name(c) for f in FAMILIES for c in f.ready_base_classes if c in f.pipeline_classes}
    modular = {ready_class_name(c) for f in FAMILIES for c in f.ready_base_classes if c not in f.pipeline_classes}
    assert {c.__name__ for c in hires.pipelines.READY_PIPELINES} == classic
    assert {c.__name__ for c in hires.pipelines.READY_MODULAR_PIPELINES} == modular
    assert "HiresFlux3DistilledModularPipeline" in modular and "HiresStableDiffusionPipeline" in classic
    for name in classic | modular:
        ready = getattr(hires, name)
        assert ready is getattr(hires.pipelines, name) and name in dir(hires) and name in hires.__all__
        assert (ready.__module__, ready.__qualname__) == ("hires.pipelines", name)
        assert ready.__bases__[-1].__name__ == name.removeprefix("Hires") and ready.__doc__.endswith("with hires.")
    files = {path.name: path.read_text(encoding="utf-8") for path in (ROOT / "pipelines").glob("*.py")}
    named = {name: [f for f, text in files.items() if f"import {name}\n" in text] for name in classic}
    assert all(len(found) == 1 for found in named.values()), named  # one file per ready class
    assert len(files) == len(classic)  # and no file for a class that is not ready
    for name, (file,) in named.items():
        first, rest = files[file].split("\n", 1)
        assert first.startswith('"""hires for ') and first.endswith(" as a diffusers community pipeline.")
        assert rest == _community_file(name).format(file=file)


def test_a_ready_class_pickles_by_name_and_makes_no_second_class():
    import pickle

    from diffusers import FluxPipeline

    assert pickle.loads(pickle.dumps(hires.HiresFluxPipeline)) is hires.HiresFluxPipeline
    assert hires.pipelines.ready_class(FluxPipeline) is hires.pipelines.ready_class("FluxPipeline") is (
        hires.HiresFluxPipeline)
    with pytest.raises(AttributeError, match="HiresNotAPipeline"):
        hires.pipelines.HiresNotAPipeline  # noqa: B018


@pytest.mark.parametrize("family", sorted(READY))
def test_ready_pipeline_from_pipe_matches_plain_and_takes_a_hires_config(family):
    plain = build(family)
    expected = generate(plain, family, 128)
    base = generate(plain, family, 64)
    ready = getattr(hires, READY[family][0]).from_pipe(plain)
    ready.set_progress_bar_config(disable=True)
    if hasattr(plain, "default_sample_size"):  # an instance attribute from_pipe does not carry (tiny Flux: 64 px base)
        ready.default_sample_size = plain.default_sample_size
    assert hires.model_info(ready).name == family
    assert torch.equal(generate(ready, family, 64), base)  # the automatic preset leaves the base size alone
    assert hires.is_applied(ready)
    assert hires.runtime.get_attachment(ready).config == automatic_config(hires.model_info(ready))
    assert torch.equal(generate(ready, family, 128, hires_config=hires.HiresConfig()), expected)
    config = hires.HiresConfig(entropy_scaling=hires.EntropyScalingConfig(enabled=True))
    if hires.model_info(ready).family.attention_unsupported:  # Z-Image, ERNIE-Image: entropy scaling is refused
        config = hires.HiresConfig(bottleneck=hires.BottleneckConfig(enabled=True))
    generate(ready, family, 128, hires_config=config)
    assert hires.runtime.get_attachment(ready).config == config
    with pytest.raises(ValueError, match="height=0 must be positive"):
        generate(ready, family, (0, 64))
    with pytest.raises(TypeError):
        generate(ready, family, 64, not_an_argument=1)


@pytest.mark.parametrize("family", sorted(READY))
def test_community_pipeline_file_loads_a_saved_tiny_pipeline(family, tmp_path):
    from diffusers import DiffusionPipeline

    build(family).save_pretrained(tmp_path)
    # Reloading tiny Flux is not bit-exact to the in-memory original (~2e-6), so compare two loads.
    plain = DiffusionPipeline.from_pretrained(tmp_path)
    plain.set_progress_bar_config(disable=True)
    loaded = DiffusionPipeline.from_pretrained(
        tmp_path, custom_pipeline=str(ROOT / "pipelines" / READY[family][1]), trust_remote_code=True
    )
    loaded.set_progress_bar_config(disable=True)
    if family in FIXED_BASE:  # these pipelines hard-code a 1024 px base; the tiny model's is 64 px
        loaded.default_sample_size = plain.default_sample_size = 64 // plain.vae_scale_factor
    expected = generate(plain, family, 64)  # HiDreamImagePipeline rescales every request to its base area
    assert type(loaded).__name__ == READY[family][0]
    assert isinstance(loaded, hires.pipelines.HiresPipelineMixin)
    assert torch.equal(generate(loaded, family, 64), expected)  # base size: the automatic preset is inert
