"""Every config field is checked against its type before anything runs; the base-size override."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch

import hires
from hires import presets
from hires.techniques import BUILT_IN
from hires.techniques.structure_guidance import guidance as progressive
from tiny_models import build, generate

BAD = [
    (hires.StructureGuidanceConfig, "enabled", "no"),
    (hires.StructureGuidanceConfig, "enabled", 1),
    (hires.StructureGuidanceConfig, "sharpen_sigma", 5),
    (hires.StructureGuidanceConfig, "sharpen_sigma", (0.1, "2")),
    (hires.StructureGuidanceConfig, "sharpen_alpha", math.nan),
    (hires.StructureGuidanceConfig, "sharpen_alpha", True),
    (hires.StructureGuidanceConfig, "wavelet_level", 1.0),
    (hires.StructureGuidanceConfig, "space", 3),
    (hires.BottleneckConfig, "scales", 0.5),
    (hires.BottleneckConfig, "scales", (1.0, "half", 1.0)),
    (hires.RedilationConfig, "progressive", "yes"),
    (hires.RedilationConfig, "dispersion_eta", None),
    (hires.EntropyScalingConfig, "layers", None),
    (hires.WindowAttentionConfig, "shift", "false"),
    (hires.WindowAttentionConfig, "window", 4.5),
    (hires.APGConfig, "eta", "0"),
    (hires.APGConfig, "start", None),
    (hires.PositionConfig, "shift", "3"),
    (hires.VAETilingConfig, "tile_size", 64.0),
    (hires.MemoryConfig, "sequential_cfg", "auto"),
    (hires.MemoryConfig, "max_memory", 2.5),
]


@pytest.mark.parametrize("cls,name,value", BAD, ids=[f"{c.__name__}.{n}={v!r}" for c, n, v in BAD])
def test_a_value_of_the_wrong_type_is_an_error_naming_field_and_value(cls, name, value):
    with pytest.raises(TypeError, match=rf"{cls.__name__}\.{name}=.*{re.escape(repr(value)[:3])}.*must be"):
        cls(**{name: value})


def test_from_dict_rejects_string_booleans_and_takes_json_lists_for_tuples():
    with pytest.raises(TypeError, match=r"StructureGuidanceConfig.enabled=the string 'no'.*JSON boolean"):
        hires.HiresConfig.from_dict({"structure_guidance": {"enabled": "no"}})
    config = hires.HiresConfig.from_dict(json.loads(json.dumps(
        {"structure_guidance": {"enabled": True, "sharpen_sigma": [0.2, 1.0], "stages": [[96, 96], 160]},
         "bottleneck": {"scales": [1.0, 0.5, 1.0]}})))
    assert config.structure_guidance.sharpen_sigma == (0.2, 1.0)
    assert config.structure_guidance.stages == ((96, 96), 160)
    assert config.bottleneck.scales == (1.0, 0.5, 1.0)
    hash(config.structure_guidance)  # frozen and hashable again: no list inside


def test_defaults_and_every_preset_still_construct_and_round_trip():
    for cls in (record.config_type for record in BUILT_IN):
        default = cls()
        assert cls(**{f.name: getattr(default, f.name) for f in dataclasses.fields(cls)}) == default
    for config in presets.AUTOMATIC.values():
        values = json.loads(json.dumps(config.to_dict()))
        assert hires.HiresConfig.from_dict(values) == config


@pytest.mark.parametrize("value", [0, -64, 64.0, "64", (64,), (64, 64, 64), True])
def test_base_size_must_be_positive_pixels(value):
    with pytest.raises(TypeError, match=r"HiresConfig.base_size="):
        hires.HiresConfig(base_size=value)


def test_base_size_override_moves_where_the_preset_acts():
    pipe = build("sd15")  # base 64 px
    plain = generate(pipe, "sd15", 128, output_type="pt")
    hires.apply(pipe, presets.AUTOMATIC["sd15"].replace(base_size=128))  # 128 is now the base: a plain call
    assert progressive.last_run(pipe) is None  # no stages ran
    assert torch.equal(generate(pipe, "sd15", 128, output_type="pt"), plain)
    assert hires.runtime.get_attachment(pipe).info.base_height == 128
    hires.apply(pipe, presets.AUTOMATIC["sd15"].replace(base_size=(48, 64)))
    assert hires.runtime.get_attachment(pipe).info.base_height == 48
    with pytest.raises(ValueError, match=r"base_size=62: 62 is not a multiple of the VAE factor 8"):
        hires.apply(pipe, hires.HiresConfig(base_size=62))


def test_a_model_folder_records_its_base_size(tmp_path):
    from diffusers import FluxPipeline

    pipe = build("flux")
    pipe.save_pretrained(tmp_path)
    assert hires.model_info(FluxPipeline.from_pretrained(tmp_path)).base_height == 1024  # FluxPipeline's default
    (tmp_path / "hires.json").write_text(json.dumps({"base_size": [64, 64]}))
    loaded = FluxPipeline.from_pretrained(tmp_path)
    assert (hires.model_info(loaded).base_height, hires.model_info(loaded).base_width) == (64, 64)
    assert hires.model_info(loaded).base_height == hires.model_info(pipe).base_height
    (tmp_path / "hires.json").write_text(json.dumps({"size": 64}))
    with pytest.raises(ValueError, match=r"hires.json: expected"):
        hires.model_info(FluxPipeline.from_pretrained(tmp_path))


def test_the_shipped_flux_testbed_reads_its_training_size():
    from diffusers import FluxPipeline

    from hires.cli import ASSETS

    info = hires.model_info(FluxPipeline.from_pretrained(ASSETS / "testbed_flux"))
    assert (info.base_height, info.base_width) == (64, 64)


# -- every number finite and in its range, choices listed, config files answered in their own words ------
def _float_fields():
    for record in BUILT_IN:
        for field in dataclasses.fields(record.config_type):
            annotation = field.type if isinstance(field.type, str) else ""
            if "float" in annotation:
                yield record.config_type, field


def test_every_float_field_declares_its_range_and_refuses_inf_and_nan():
    from hires.validation import BOUNDS

    fields = list(_float_fields())
    assert len(fields) > 25  # the rule reads every technique's configs
    for cls, field in fields:
        bounds = field.metadata.get(BOUNDS)
        assert bounds is not None, f"{cls.__name__}.{field.name} declares no range (hires.validation.option)"
        pair = field.type.startswith("tuple[float, float]")
        for bad in (math.inf, -math.inf, math.nan):
            if bad == math.inf and bounds.high == math.inf and not bounds.high_open:
                continue  # APGConfig.norm_threshold: math.inf turns clipping off
            value = (bad, bad) if pair else ((bad,) * 3 if field.type.startswith("tuple") else bad)
            with pytest.raises((ValueError, TypeError), match=rf"{cls.__name__}\.{field.name}=.*(must be|not valid)"):
                cls(**{field.name: value})


def test_a_number_out_of_range_from_a_config_file_names_the_key_the_value_and_the_range():
    values = json.loads('{"structure_guidance": {"sharpen_alpha": 1e309}}')  # JSON reads 1e309 as inf
    with pytest.raises(ValueError, match=r"StructureGuidanceConfig\.sharpen_alpha=inf must be a finite number >= 0"):
        hires.HiresConfig.from_dict(values)
    with pytest.raises(ValueError, match=r"FlowAlignmentConfig\.cutoff=1\.5 must be in \(0, 1\]"):
        hires.HiresConfig.from_dict({"flow_alignment": {"cutoff": 1.5}})
    with pytest.raises(ValueError, match=r"StructureGuidanceConfig\.guidance_scale=inf: each value must be a finite"):
        hires.StructureGuidanceConfig(guidance_scale=math.inf)
    with pytest.raises(ValueError, match=r"RedilationConfig\.dilations\['mid_block'\]=inf must be a finite number"):
        hires.RedilationConfig(dilations={"mid_block": math.inf})
    with pytest.raises(ValueError, match=r"MemoryConfig\.max_memory='infGiB'"):
        hires.MemoryConfig(max_memory="infGiB")


def test_a_choice_error_lists_the_choices_whatever_the_value():
    with pytest.raises(TypeError, match=r"StructureGuidanceConfig\.space=3 is not valid.*'latent', 'pixel'"):
        hires.HiresConfig.from_dict({"structure_guidance": {"space": 3}})
    with pytest.raises(ValueError, match=r"StructureGuidanceConfig\.space='lattice' is not valid; choose one of "
                                         r"'latent', 'pixel'"):
        hires.StructureGuidanceConfig(space="lattice")


@pytest.mark.parametrize("value,words", [(True, "true"), (None, "null"), ([1, 2], r"\[1, 2\]"), ("on", '"on"')])
def test_a_technique_given_no_object_is_answered_in_json_words(value, words):
    with pytest.raises(TypeError, match=rf'HiresConfig\.structure_guidance={words} is not valid: expected an object '
                                        r'of options such as \{"enabled": true\}'):
        hires.HiresConfig.from_dict({"structure_guidance": value})
