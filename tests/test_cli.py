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
        (["--size", "big"], "--size 'big' must look like WIDTHxHEIGHT"),
        (["--size", "100x128"], "--size 100x128: width=100 is not a multiple of 8"),
        (["--size", "128x128", "--model", "no-such-org/no-such-model"], "could not be fetched"),
        (["--size", "128x128", "--steps", "0"], "--steps 0 must be a positive"),
    ],
)
def test_generate_errors_name_the_option_and_the_remedy(tmp_path, capsys, args, message):
    code = main(["generate", "--prompt", "x", "--out", str(tmp_path / "o.png"), "--quiet", *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
