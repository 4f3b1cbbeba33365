"""Ready pipeline classes and the community-pipeline files."""

from pathlib import Path

import pytest
import torch

import hires
from hires.presets import automatic_config
from surface_support import FIXED_BASE
from tiny_models import build, generate

ROOT = Path(__file__).resolve().parents[1]
READY = {
    "sd15": ("HiresStableDiffusionPipeline", "hires_sd.py"),
    "sdxl": ("HiresStableDiffusionXLPipeline", "hires_sdxl.py"),
    "pixart": ("HiresPixArtSigmaPipeline", "hires_pixart.py"),
    "sd3": ("HiresStableDiffusion3Pipeline", "hires_sd3.py"),
    "flux": ("HiresFluxPipeline", "hires_flux.py"),
    "flux2": ("HiresFlux2Pipeline", "hires_flux2.py"),
    "flux2_klein": ("HiresFlux2KleinPipeline", "hires_flux2_klein.py"),
    "chroma": ("HiresChromaPipeline", "hires_chroma.py"),
    "qwenimage": ("HiresQwenImagePipeline", "hires_qwenimage.py"),
    "zimage": ("HiresZImagePipeline", "hires_zimage.py"),
    "ernie_image": ("HiresErnieImagePipeline", "hires_ernie_image.py"),
    "krea2": ("HiresKrea2Pipeline", "hires_krea2.py"),
    "hidream": ("HiresHiDreamImagePipeline", "hires_hidream.py"),
    "qwenimage21": ("HiresQwenImage21Pipeline", "hires_qwenimage21.py"),
}


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
