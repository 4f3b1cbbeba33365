"""Ready pipeline classes and the community-pipeline files."""

from pathlib import Path

import pytest
import torch

import hires
from tiny_models import build, generate

ROOT = Path(__file__).resolve().parents[1]
READY = {
    "sd15": ("HiresStableDiffusionPipeline", "hires_sd.py"),
    "sdxl": ("HiresStableDiffusionXLPipeline", "hires_sdxl.py"),
    "pixart": ("HiresPixArtSigmaPipeline", "hires_pixart.py"),
    "sd3": ("HiresStableDiffusion3Pipeline", "hires_sd3.py"),
    "flux": ("HiresFluxPipeline", "hires_flux.py"),
}


@pytest.mark.parametrize("family", sorted(READY))
def test_ready_pipeline_from_pipe_matches_plain_and_takes_a_hires_config(family):
    plain = build(family)
    expected = generate(plain, family, 128)
    ready = getattr(hires, READY[family][0]).from_pipe(plain)
    ready.set_progress_bar_config(disable=True)
    assert hires.model_info(ready).name == family
    assert torch.equal(generate(ready, family, 128), expected)
    assert hires.is_applied(ready)
    config = hires.HiresConfig(entropy_scaling=hires.EntropyScalingConfig(enabled=True))
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
    expected = generate(plain, family, 64)
    loaded = DiffusionPipeline.from_pretrained(
        tmp_path, custom_pipeline=str(ROOT / "pipelines" / READY[family][1]), trust_remote_code=True
    )
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == READY[family][0]
    assert isinstance(loaded, hires.pipelines.HiresPipelineMixin)
    assert torch.equal(generate(loaded, family, 64), expected)
