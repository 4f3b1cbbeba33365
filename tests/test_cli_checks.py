"""Every CLI value is checked before any model is loaded, with the option, the value and a remedy."""

import json
import os
import time

import pytest

from hires import cli
from hires.cli import main

from cli_support import generate




@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "true"], "--steps='true' must be a whole number of denoising steps >= 1"),
        (["--steps", "2.5"], "--steps='2.5' must be a whole number"),
        (["--steps", "-3"], "--steps=-3 must be a whole number of denoising steps >= 1, e.g. 20"),
        (["--seed", "-1"], "--seed=-1 must be a whole number in [0, 2**63)"),
        (["--seed", str(2**63)], f"--seed={2**63} must be a whole number in [0, 2**63)"),
        (["--guidance", "nan"], "--guidance=nan must be a finite number >= 0"),
        (["--guidance", "inf"], "--guidance=inf must be a finite number >= 0"),
        (["--guidance", "-1"], "--guidance=-1.0 must be a finite number >= 0"),
        (["--scale", "0"], "--scale=0.0 must be a finite number > 0"),
        (["--size", "0x64"], "--size='0x64': width and height must be positive"),
        (["--size", "64x64", "--scale", "2"], "--size 64x64 and --scale 2 conflict"),
        (["--size", "64x64", "--device", "foo"], "--device 'foo' is not a torch device; available here: cpu"),
        (["--size", "64x64", "--device", "meta"],
         "--device 'meta' is not available on this machine; available here: cpu"),
    ],
)
def test_bad_values_are_refused_before_the_model_is_read(tmp_path, capsys, no_model, args, message):
    assert generate(tmp_path, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_an_unavailable_cuda_names_what_works(tmp_path, capsys, no_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert generate(tmp_path, "--size", "64x64", "--device", "cuda") == 2
    assert "--device 'cuda' is not available on this machine; available here: cpu" in capsys.readouterr().err


def test_an_absurd_size_is_refused_at_once_with_the_numbers(tmp_path, capsys, no_model):
    if (cli.host_memory_bytes() or 0) > 139 * 2**30:
        pytest.skip("this machine's RAM holds a decoded 100000x100000 image; the memory planner refuses it instead")
    start = time.perf_counter()
    assert generate(tmp_path, "--size", "100000x100000") == 2
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert elapsed < 5, elapsed
    assert "--size 100000x100000: the decoded image alone needs 139.7 GiB of host memory" in err
    assert "use at most about" in err


def test_size_errors_come_from_the_configs_before_the_weights(tmp_path, capsys, no_weights):
    assert generate(tmp_path, "--size", "100x128") == 2
    assert "--size 100x128: width=100 is not a multiple of 8" in capsys.readouterr().err
    assert generate(tmp_path, "--scale", "10000") == 2  # refused where it is parsed: at most 256x the base side
    assert "--scale=10000.0 must be a finite number > 0 and at most 256" in capsys.readouterr().err


def test_unknown_and_abbreviated_options_are_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate(tmp_path, "--size", "64x64", "--stepz", "3")
    assert exit_info.value.code == 2 and "unrecognized arguments: --stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate(tmp_path, "--size", "64x64", "--ste", "3")  # not silently --steps
    assert "unrecognized arguments: --ste" in capsys.readouterr().err


@pytest.mark.parametrize(
    "values, message",
    [
        ({"vae_tiling": {"enabled": "no"}}, 'HiresConfig.vae_tiling.enabled="no" must be a JSON boolean'),
        ({"redilation": {"progressive": 1}}, "HiresConfig.redilation.progressive=1 must be a JSON boolean"),
        ({"window_attention": {"window": True}}, "HiresConfig.window_attention.window=true must be a number, not"),
        ({"memory": {"max_memory": "lots"}}, "MemoryConfig.max_memory='lots'"),
        ({"entropy_scaling": {"layer": "all"}}, "unknown option HiresConfig.entropy_scaling.layer"),
    ],
)
def test_config_file_values_are_type_checked_before_the_model_is_read(tmp_path, capsys, no_model, values, message):
    config = tmp_path / "c.json"
    config.write_text(json.dumps(values))
    assert generate(tmp_path, "--size", "64x64", "--config", str(config)) == 2
    err = capsys.readouterr().err
    assert f"--config {str(config)!r}" in err and message in err


def test_config_file_with_nan_is_refused(tmp_path, capsys, no_model):
    config = tmp_path / "c.json"
    config.write_text('{"apg": {"enabled": true, "eta": NaN}}')
    assert generate(tmp_path, "--size", "64x64", "--config", str(config)) == 2
    assert "NaN is not a number JSON allows" in capsys.readouterr().err


def test_output_file_checks_come_first(tmp_path, capsys, no_model):
    folder = tmp_path / "taken.png"
    folder.mkdir()
    assert main(["generate", "--prompt", "x", "--size", "64x64", "--out", str(folder), "--quiet"]) == 2
    assert f"--out {str(folder)!r} is a folder; give a file name" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["generate", "--prompt", "x", "--size", "64x64",
                 "--out", str(blocker / "a" / "o.png"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cannot be created" in err and "is a file, not a folder" in err
    assert not (blocker.parent / "a").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_folder_is_refused(tmp_path, capsys, no_model):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main(["generate", "--prompt", "x", "--size", "64x64", "--out", str(locked / "o.png"), "--quiet"]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_a_missing_output_folder_is_created_only_when_writing(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "o.png"
    assert main(["generate", "--prompt", "x", "--size", "64x64", "--steps", "1", "--device", "cpu",
                 "--out", str(out), "--quiet"]) == 0
    assert out.is_file()
    assert main(["generate", "--prompt", "x", "--size", "64x60", "--out", str(tmp_path / "later" / "o.png"),
                 "--quiet"]) == 2
    assert not (tmp_path / "later").exists()  # an error leaves no empty folder behind


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "steps": true}\n',
         "p.jsonl:2: steps=True must be a whole number"),
        ("p.jsonl", '{"prompt": "a", "seed": 9223372036854775808}\n', "p.jsonl:1: seed=9223372036854775808 must be"),
        ("p.jsonl", '{"prompt": "a", "guidance": NaN}\n', "p.jsonl:1: guidance=NaN is not a number JSON allows"),
        ("p.jsonl", '{"prompt": "a", "guidance": "5"}\n', "p.jsonl:1: guidance='5' must be a finite number >= 0"),
        ("p.jsonl", '{"prompt": "a", "size": [64, 64]}\n', "p.jsonl:1: size=[64, 64] must look like WIDTHxHEIGHT"),
        ("p.jsonl", '{"prompt": "a", "negative": 3}\n', "p.jsonl:1: negative=3 must be a string"),
        ("p.csv", "prompt,guidance\na,nan\n", "p.csv:2: guidance=nan must be a finite number >= 0"),
        ("p.csv", "prompt,steps\na,0\n", "p.csv:2: steps=0 must be a whole number"),
    ],
)
def test_prompt_file_values_are_checked_with_file_line_and_field(tmp_path, capsys, no_model, name, text, message):
    prompts = tmp_path / name
    prompts.write_text(text)
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_bad_size_on_a_late_line_stops_the_batch_before_the_first_render(tmp_path, capsys, no_weights):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c", "size": "100000x64"}\n'
                       '{"prompt": "d", "size": "96x70"}\n')
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--quiet", "--size", "64x64"]) == 2
    assert "p.jsonl:4: size 96x70: height=70 is not a multiple of 8" in capsys.readouterr().err
    prompts.write_text('{"prompt": "a"}\n{"prompt": "c", "size": "640000x64000"}\n')
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--quiet", "--size", "64x64"]) == 2
    assert "p.jsonl:2: size 640000x64000: the decoded image alone needs" in capsys.readouterr().err
    two = tmp_path / "p.txt"
    two.write_text("a\nb\n")
    assert main(["batch", str(two), "--out", str(tmp_path / "out"), "--quiet", "--seed", str(2**63 - 1)]) == 2
    assert f"p.txt:2: seed (--seed {2**63 - 1} + item index 1)={2**63} must be" in capsys.readouterr().err
    assert not list(tmp_path.glob("out/*.png"))


def test_batch_device_is_checked(tmp_path, capsys, no_model):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--quiet", "--device", "cuda:7"]) == 2
    assert "--device 'cuda:7'" in capsys.readouterr().err
