import json
from pathlib import Path

import pytest
from PIL import Image

from hires.cli import DEFAULT_MODEL, main


def test_generate_writes_a_png_with_its_parameters(tmp_path, capsys):
    out = tmp_path / "sub" / "image.png"
    code = main(["generate", "--prompt", "a red circle", "--size", "128x64", "--steps", "2", "--seed", "3",
                 "--out", str(out), "--quiet"])
    assert code == 0
    image = Image.open(out)
    assert image.size == (128, 64)
    assert "Seed: 3" in image.text["parameters"] and "Size: 128x64" in image.text["parameters"]
    assert [p.name for p in out.parent.iterdir()] == ["image.png"]  # no temporary file left


def test_default_model_is_embedded_in_the_package():
    assert (Path(DEFAULT_MODEL) / "model_index.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "big"], "--size='big' must look like WIDTHxHEIGHT"),
        (["--size", "100x128"], "--size 100x128: width=100 is not a multiple of 8"),
        (["--size", "128x128", "--model", "no-such-org/no-such-model"], "could not be fetched"),
        (["--size", "128x128", "--steps", "0"], "--steps=0 must be a whole number of denoising steps >= 1"),
    ],
)
def test_generate_errors_name_the_option_and_the_remedy(tmp_path, capsys, args, message):
    code = main(["generate", "--prompt", "x", "--out", str(tmp_path / "o.png"), "--quiet", *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_dry_run_prints_stages_and_memory_without_weights(tmp_path, capsys, monkeypatch):
    import diffusers

    def no_weights(*args, **kwargs):
        raise AssertionError("--dry-run must not load weights")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_weights)
    code = main(["generate", "--prompt", "x", "--size", "256x256", "--out", str(tmp_path / "o.png"),
                 "--enable", "structure_guidance", "--dry-run", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "family sd15, base 64x64" in out
    # the preset doubles per stage and re-runs 0.7 of the UNet's schedule
    assert "stage 0: 64x64, 20 steps" in out and "stage 2: 256x256, 14 steps" in out
    assert "memory 256x256 float32 batch 1" in out
    assert not (tmp_path / "o.png").exists()

    config = tmp_path / "c.json"
    config.write_text('{"memory": {"max_memory": "1MiB"}}')
    code = main(["generate", "--prompt", "x", "--size", "512x512", "--out", str(tmp_path / "o.png"),
                 "--config", str(config), "--dry-run"])
    assert code == 2
    assert "DOES NOT FIT: 512x512 sd15 float32 batch 1 needs" in capsys.readouterr().out


def test_generate_upscales_an_input_image(tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(source)
    out = tmp_path / "up.png"
    code = main(["generate", "--prompt", "a red circle", "--image", str(source), "--size", "128x128",
                 "--steps", "4", "--out", str(out), "--quiet"])
    assert code == 0
    assert Image.open(out).size == (128, 128)
    record = json.loads(Image.open(out).text["hires"])
    assert "structure_guidance" in record["hires"]
    (tmp_path / "bad.png").write_text("not an image")
    code = main(["generate", "--prompt", "x", "--image", str(tmp_path / "bad.png"), "--size", "128x128",
                 "--out", str(out), "--quiet"])
    assert code == 2 and "--image" in capsys.readouterr().err
