"""A technique from outside hires takes the same path as a built-in one: a toy defined here, registered
with hires.registry.register, round-trips through to_dict / from_dict, is listed by `hires techniques`,
is switched on by `--enable NAME` and by `--config`, runs, and is removed exactly."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers.hooks import ModelHook
from PIL import Image

import hires
from hires import registry
from hires.cli import main
from hires.validation import option, typed
from tiny_models import build, generate


@typed
@dataclasses.dataclass(frozen=True)
class DimmerConfig:
    """Scales the denoiser's prediction by `gain` (a stand-in for a real technique)."""

    enabled: bool = False
    gain: float = option(0.5, low=0, low_open=True)


class _DimmerHook(ModelHook):
    def __init__(self, attachment, gain: float):
        super().__init__()
        self.attachment, self.gain = attachment, gain

    def post_forward(self, module, output):
        if self.attachment.state is None:
            return output
        self.attachment.state.log["log.dimmer.gain"] = self.gain
        return (output[0] * self.gain, *output[1:]) if isinstance(output, tuple) else output * self.gain


def _install_dimmer(attachment, config: DimmerConfig) -> None:
    attachment.add_hook(attachment.denoiser, _DimmerHook(attachment, config.gain), "hires.dimmer")


DIMMER = registry.Technique("dimmer", DimmerConfig, _install_dimmer, order=65)


@pytest.fixture
def dimmer():
    registry.register(DIMMER)
    yield DIMMER
    registry.unregister(DIMMER.name)


def test_it_round_trips_through_to_dict_and_from_dict_under_its_name(dimmer):
    config = hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True),
                               extensions=(DimmerConfig(enabled=True, gain=0.25),))
    values = json.loads(json.dumps(config.to_dict()))
    assert values["dimmer"] == {"enabled": True, "gain": 0.25}
    assert hires.HiresConfig.from_dict(values) == config
    assert config.enabled_techniques() == ["structure_guidance", "dimmer"]  # by name, in install order
    assert config.technique("dimmer") == DimmerConfig(enabled=True, gain=0.25)
    assert hires.HiresConfig().technique("dimmer") == DimmerConfig()  # left out: its default
    assert config.replace(dimmer=DimmerConfig()).technique("dimmer") == DimmerConfig()
    with pytest.raises(ValueError, match=r"DimmerConfig\.gain=0 must be a finite number > 0"):
        hires.HiresConfig.from_dict({"dimmer": {"enabled": True, "gain": 0}})


def test_without_registration_it_is_an_unknown_option():
    with pytest.raises(TypeError, match=r"unknown option HiresConfig\.dimmer"):
        hires.HiresConfig.from_dict({"dimmer": {"enabled": True}})


def test_it_runs_and_is_removed_exactly(dimmer):
    pipe = build("sd15")
    plain = generate(pipe, "sd15", 64)
    hires.apply(pipe, hires.HiresConfig.from_dict({"dimmer": {"enabled": True, "gain": 0.5}}))
    dimmed = generate(pipe, "sd15", 64)
    assert not torch.equal(dimmed, plain)
    assert hires.last_call(pipe).notes["log.dimmer.gain"] == 0.5
    hires.remove(pipe)
    assert torch.equal(generate(pipe, "sd15", 64), plain)


def test_hires_techniques_lists_it_with_its_options(dimmer, capsys):
    assert main(["techniques"]) == 0
    out = capsys.readouterr().out
    assert "dimmer (DimmerConfig): Scales the denoiser's prediction by `gain`" in out
    assert "  dimmer.gain: float = 0.5" in out


def _render(tmp_path, name: str, *options: str) -> np.ndarray:
    out = tmp_path / f"{name}.png"
    code = main(["generate", "--prompt", "a red circle", "--size", "64x64", "--steps", "2", "--preset", "none",
                 "--out", str(out), "--quiet", *options])
    assert code == 0
    return np.asarray(Image.open(out))


def test_the_command_line_enables_it_by_name_and_by_config_file(dimmer, tmp_path):
    plain = _render(tmp_path, "plain")
    enabled = _render(tmp_path, "enabled", "--enable", "dimmer")
    assert not np.array_equal(enabled, plain)
    config = tmp_path / "hires.json"
    config.write_text(json.dumps({"dimmer": {"enabled": True, "gain": 0.5}}))
    assert np.array_equal(_render(tmp_path, "configured", "--config", str(config)), enabled)
    assert np.array_equal(_render(tmp_path, "disabled", "--config", str(config), "--disable", "dimmer"), plain)
    record = json.loads(Image.open(tmp_path / "configured.png").text["hires"])
    assert record["hires"] == {"dimmer": {"enabled": True, "gain": 0.5}}
