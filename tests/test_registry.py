"""A technique from outside hires takes the same path as a built-in one: a toy defined here, registered with
hires.registry.register, installs in its order, round-trips through to_dict / from_dict under its name, is
listed by `hires techniques`, is switched on by `--enable NAME` and by `--config`, runs, and is removed
exactly; and every built-in technique is one record of the catalogue."""

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
from hires.runtime import HOOK_PREFIX, get_attachment
from hires.techniques import BUILT_IN, all_techniques
from tiny_models import build, generate


@typed
@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Multiplies the denoiser's output by `gain` (a stand-in for a real technique)."""

    enabled: bool = False
    gain: float = option(1.5, low=0, low_open=True)


@dataclasses.dataclass
class _ToyCall:
    steps: int = 0


class _ToyHook(ModelHook):
    def __init__(self, attachment, gain: float):
        super().__init__()
        self.attachment, self.gain = attachment, gain

    def post_forward(self, module, output):
        state = self.attachment.state
        if state is not None:
            state.slot(_ToyCall).steps += 1
            state.log["log.toy.steps"] = state.slot(_ToyCall).steps
        return (output[0] * self.gain, *output[1:])


def _install_toy(attachment, config: ToyConfig) -> None:
    attachment.add_hook(attachment.denoiser, _ToyHook(attachment, config.gain), HOOK_PREFIX + "toy")


TOY = registry.Technique("toy", ToyConfig, _install_toy, order=65)


@pytest.fixture
def toy():
    registry.register(TOY)
    yield TOY
    registry.unregister(TOY.name)


def test_a_registered_technique_installs_in_its_order_and_is_removed_exactly(toy):
    pipe = build("sd15")
    plain = generate(pipe, "sd15", 64)
    names = [r.name for r in all_techniques()]
    assert names.index("attention_backend") < names.index("toy") < names.index("apg")  # order 60 < 65 < 70
    hires.apply(pipe, hires.HiresConfig(extensions=(ToyConfig(enabled=True, gain=0.5),)))
    assert get_attachment(pipe).enabled_with("stages") == []
    assert [r.name for r, _ in get_attachment(pipe).techniques] == ["toy"]
    toyed = generate(pipe, "sd15", 64)
    assert not torch.equal(toyed, plain)
    assert hires.last_call(pipe).notes["log.toy.steps"] == 3  # one per denoiser call, in a per-call slot
    generate(pipe, "sd15", 64)
    assert hires.last_call(pipe).notes["log.toy.steps"] == 3  # the slot is new for every call
    hires.remove(pipe)
    assert torch.equal(generate(pipe, "sd15", 64), plain)
    # off: installs nothing
    hires.apply(pipe, hires.HiresConfig(extensions=(ToyConfig(enabled=False),)))
    assert get_attachment(pipe).techniques == []
    assert torch.equal(generate(pipe, "sd15", 64), plain)


def test_a_toy_composes_with_built_in_techniques(toy):
    pipe = build("sd15")
    config = hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True),
                               extensions=(ToyConfig(enabled=True),))
    hires.apply(pipe, config)
    assert [r.name for r, _ in get_attachment(pipe).techniques] == ["structure_guidance", "toy"]
    generate(pipe, "sd15", 128)
    from hires.techniques.structure_guidance import guidance as progressive

    assert [r.height for r in progressive.last_run(pipe)] == [64, 128]


def test_registration_errors_are_clear(toy):
    with pytest.raises(TypeError, match="not the config of a registered technique"):
        hires.HiresConfig(extensions=(hires.APGConfig(),))
    with pytest.raises(ValueError, match="two ToyConfig entries"):
        hires.HiresConfig(extensions=(ToyConfig(), ToyConfig(gain=2.0)))
    with pytest.raises(ValueError, match="registered already"):
        registry.register(registry.Technique("toy", ToyConfig, _install_toy, order=1))
    with pytest.raises(ValueError, match="unknown capabilities"):
        registry.Technique("bad", ToyConfig, _install_toy, order=1, capabilities=frozenset({"telepathy"}))
    with pytest.raises(TypeError, match="'enabled' field"):
        registry.Technique("bad", dict, _install_toy, order=1)


def test_every_built_in_technique_has_one_record_and_a_config_field():
    names = [r.name for r in BUILT_IN]
    assert len(set(names)) == len(names)
    assert len({r.order for r in BUILT_IN}) == len(BUILT_IN)  # no two installers compete for one place
    fields = [f.name for f in dataclasses.fields(hires.HiresConfig) if f.name not in ("extensions", "base_size")]
    assert fields == names  # HiresConfig's fields are the catalogue's lines, in its order
    for record in BUILT_IN:
        assert isinstance(getattr(hires.HiresConfig(), record.name), record.config_type)
        assert getattr(hires, record.config_type.__name__) is record.config_type  # hires.APGConfig, ...
    assert [r.order for r in BUILT_IN] == sorted(r.order for r in BUILT_IN)  # the catalogue reads in install order


def test_it_round_trips_through_to_dict_and_from_dict_under_its_name(toy):
    config = hires.HiresConfig(structure_guidance=hires.StructureGuidanceConfig(enabled=True),
                               extensions=(ToyConfig(enabled=True, gain=0.25),))
    values = json.loads(json.dumps(config.to_dict()))
    assert values["toy"] == {"enabled": True, "gain": 0.25}
    assert hires.HiresConfig.from_dict(values) == config
    assert config.enabled_techniques() == ["structure_guidance", "toy"]  # by name, in install order
    assert config.technique("toy") == ToyConfig(enabled=True, gain=0.25)
    assert hires.HiresConfig().technique("toy") == ToyConfig()  # left out: its default
    assert config.replace(toy=ToyConfig()).technique("toy") == ToyConfig()
    with pytest.raises(ValueError, match=r"ToyConfig\.gain=0 must be a finite number > 0"):
        hires.HiresConfig.from_dict({"toy": {"enabled": True, "gain": 0}})


def test_without_registration_it_is_an_unknown_option():
    with pytest.raises(TypeError, match=r"unknown option HiresConfig\.toy"):
        hires.HiresConfig.from_dict({"toy": {"enabled": True}})


def test_hires_techniques_lists_it_with_its_options(toy, capsys):
    assert main(["techniques"]) == 0
    out = capsys.readouterr().out
    assert "toy (ToyConfig): Multiplies the denoiser's output by `gain`" in out
    assert "  toy.gain: float = 1.5" in out


def _render(tmp_path, name: str, *options: str) -> np.ndarray:
    out = tmp_path / f"{name}.png"
    code = main(["generate", "--prompt", "a red circle", "--size", "64x64", "--steps", "2", "--preset", "none",
                 "--out", str(out), "--quiet", *options])
    assert code == 0
    return np.asarray(Image.open(out))


def test_the_command_line_enables_it_by_name_and_by_config_file(toy, tmp_path):
    plain = _render(tmp_path, "plain")
    enabled = _render(tmp_path, "enabled", "--enable", "toy")
    assert not np.array_equal(enabled, plain)
    config = tmp_path / "hires.json"
    config.write_text(json.dumps({"toy": {"enabled": True, "gain": 1.5}}))  # what --enable gives
    assert np.array_equal(_render(tmp_path, "configured", "--config", str(config)), enabled)
    assert np.array_equal(_render(tmp_path, "disabled", "--config", str(config), "--disable", "toy"), plain)
    record = json.loads(Image.open(tmp_path / "configured.png").text["hires"])
    assert record["hires"] == {"toy": {"enabled": True, "gain": 1.5}}
