"""--help, --version, `hires techniques`, --quiet, the single progress display, --device, --base-size."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import pytest
from PIL import Image

import hires
from hires import cli
from hires.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLUX = os.path.join(ROOT, "hires", "assets", "testbed_flux")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    env.pop("RANK", None)
    return env


def test_help_is_fast_and_imports_no_torch():
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hires", "--help"], env=_env(), capture_output=True, text=True,
                            check=False, timeout=60)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0 and "generate" in result.stdout and "techniques" in result.stdout
    assert elapsed < 2, elapsed
    probe = ("import sys\nfrom hires.cli import main\nfor argv in (['--help'], ['generate', '--help'], "
             "['batch', '--help'], ['--version']):\n    try:\n     "
             "   main(argv)\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], env=_env(), capture_output=True, text=True, check=False,
                            timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-2000:]


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 20)", "(default: 0)", "(default: auto)", "(default: the embedded testbed model",
                  "(default: cuda if available, else cpu)", "(default: the model's base size)"):
        assert shown in text, shown


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hires {hires.__version__}"


def test_techniques_lists_every_technique_its_families_and_options(capsys):
    assert main(["techniques"]) == 0
    out = capsys.readouterr().out
    config = hires.HiresConfig()
    for name in cli.technique_names():
        sub = config.technique(name)
        assert f"{name} ({type(sub).__name__}):" in out
        for field in dataclasses.fields(sub):
            assert f"  {name}.{field.name}: " in out
    families = dict(re.findall(r"^(\w+) \(\w+\):.*\n  families: (.*)$", out, flags=re.MULTILINE))
    assert families["redilation"] == "sd15, sd21, sdxl"  # UNet convolutions only
    # DiT positions only
    assert families["positions"] == "pixart, sd3, flux, flux2, flux2_klein, chroma, qwenimage, zimage, flux3"
    # Z-Image's padded single-stream attention is refused; Qwen-Image's VAE is never tiled
    assert families["entropy_scaling"] == "sd15, sd21, sdxl, pixart, sd3, flux, flux2, flux2_klein, chroma, qwenimage"
    assert "qwenimage" not in families["vae_tiling"] and "zimage" in families["vae_tiling"]
    assert "flux2," not in families["apg"] + "," and "flux2_klein" in families["apg"]  # Flux.2 [dev] runs no CFG


def test_quiet_prints_nothing_at_all(tmp_path):
    command = [sys.executable, "-m", "hires", "generate", "--prompt", "a red circle", "--size", "128x128",
               "--steps", "2", "--out", str(tmp_path / "o.png"), "--quiet"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0
    assert (result.stdout, result.stderr) == ("", "")
    assert (tmp_path / "o.png").is_file()


def test_one_progress_display_runs_through_every_stage(tmp_path, capsys):
    # 128x128 on the 64 px testbed: structure guidance runs 64 (8 steps) then 128 (the UNet preset's renoise 0.7
    # of 8 steps: 6).
    assert main(["generate", "--prompt", "a red circle", "--size", "128x128", "--steps", "8",
                 "--out", str(tmp_path / "o.png")]) == 0
    err = capsys.readouterr().err
    frames = [f for f in re.split(r"[\r\n]", err) if f.strip() and "Loading" not in f]
    counters = [re.search(r"(\d+)/(\d+) \[", f) for f in frames]
    counters = [(int(m[1]), int(m[2])) for m in counters if m]
    assert counters, err
    assert {total for _, total in counters} == {14}, counters  # one display, one total: 8 + 6 steps
    assert counters[-1] == (14, 14)
    assert "stage 2/2" in frames[-1] and "stage 1/2" in err
    assert "it/s" not in "".join(frames)  # the pipeline's own bars are off


def test_device_cpu_renders_there(tmp_path, capsys):
    out = tmp_path / "o.png"
    assert main(["generate", "--prompt", "x", "--size", "64x64", "--steps", "1", "--device", "cpu",
                 "--out", str(out), "--quiet"]) == 0
    assert json.loads(Image.open(out).text["hires"])["device"] == "cpu"


def test_resolve_device_names_what_works(monkeypatch):
    import torch

    assert cli.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.resolve_device(None) == "cuda"
    assert cli.resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(cli.CliError, match=r"--device 'cuda:2': no such cuda device index; available here: "
                                           r"cpu, cuda, cuda:0, cuda:1"):
        cli.resolve_device("cuda:2")


def test_base_size_without_the_config_field_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "base_size_supported", lambda: False)
    assert main(["generate", "--prompt", "x", "--model", FLUX, "--size", "128x128", "--base-size", "64",
                 "--out", str(tmp_path / "o.png"), "--quiet"]) == 2
    assert "--base-size 64: this version of hires has no HiresConfig.base_size" in capsys.readouterr().err


@pytest.mark.skipif(not cli.base_size_supported(),
                    reason="HiresConfig has no base_size field yet (added by the config half of issue #20)")
def test_base_size_makes_the_flux_testbed_run_above_its_training_size(tmp_path, capsys):
    out = tmp_path / "o.png"
    assert main(["generate", "--prompt", "a red circle", "--model", FLUX, "--size", "128x128", "--base-size", "64",
                 "--steps", "4", "--out", str(out)]) == 0
    assert Image.open(out).size == (128, 128)
    assert "stage 2/2" in capsys.readouterr().err  # structure guidance ran from the 64 px base
    assert json.loads(Image.open(out).text["hires"])["request"]["config"]["base_size"] in (64, [64, 64])
    assert main(["generate", "--prompt", "x", "--model", FLUX, "--size", "128x128", "--base-size", "60",
                 "--out", str(out), "--quiet"]) == 2
    assert "--base-size 60: height=60 is not a multiple of 8" in capsys.readouterr().err
