"""Techniques together: what one installs must survive the others, and remove() must undo all of it."""

import pytest
import torch

import hires
from tiny_models import build, generate


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_structure_guidance_keeps_the_position_shift_policy_across_calls(family):
    pipe = build(family)
    plain = generate(pipe, family, 128, steps=6)
    hires.apply(pipe,
                hires.HiresConfig(positions=hires.PositionConfig(enabled=True, timestep_shift="static", shift=2.0),
                                        structure_guidance=hires.StructureGuidanceConfig(enabled=True)))
    first = generate(pipe, family, 128, steps=6)
    assert "set_timesteps" in pipe.scheduler.__dict__, "the shift policy's wrapper must outlive a progressive call"
    second = generate(pipe, family, 128, steps=6)
    assert torch.equal(first, second)
    hires.remove(pipe)
    assert "set_timesteps" not in pipe.scheduler.__dict__
    assert torch.equal(generate(pipe, family, 128, steps=6), plain)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_automatic_preset_with_every_other_switch_then_remove(family):
    """The automatic preset plus the other techniques that apply to the family, run and removed."""
    from hires.presets import automatic_config
    from hires.runtime import get_attachment

    pipe = build(family)
    plain = generate(pipe, family, 128, steps=6)
    info = hires.model_info(pipe)
    extra = dict(window_attention=hires.WindowAttentionConfig(enabled=True),
                 vae_tiling=hires.VAETilingConfig(enabled=True, mode="always", tile_size=8))
    if family == "sd15":
        extra.update(redilation=hires.RedilationConfig(enabled=True), apg=hires.APGConfig(enabled=True))
    config = automatic_config(info).replace(**extra)
    hires.apply(pipe, config)
    out = generate(pipe, family, 128, steps=6)
    assert out.shape == plain.shape and not torch.equal(out, plain)
    assert get_attachment(pipe).state is None
    hires.remove(pipe)
    assert torch.equal(generate(pipe, family, 128, steps=6), plain)
