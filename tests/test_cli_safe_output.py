"""Never save a wrong image, the command line's half: every value bounded where it is read, strict and friendly file
readers, the output proven before the work, and no wrong image ever saved as done."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from hires import batch, cli
from hires.cli import main

from cli_support import generate




# -- numbers bounded where they are parsed ---------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--guidance", "1e308"], "--guidance=1e+308 must be a finite number >= 0 and at most 100"),
        (["--guidance", "101"], "--guidance=101.0 must be a finite number >= 0 and at most 100"),
        (["--true-cfg", "1e308"], "--true-cfg=1e+308 must be a finite number >= 0 and at most 100"),
        (["--scale", "1e300"], "--scale=1e+300 must be a finite number > 0 and at most 256"),
        (["--steps", "1000000"], "--steps=1000000 is more denoising steps than any scheduler has timesteps"),
        (["--size", "99999999999999999999999x64"], "a side has more than 1048576 pixels"),
        (["--size", "2000000x64"], "a side has more than 1048576 pixels"),
    ],
)
def test_numbers_that_would_overflow_are_refused_before_the_model_is_read(tmp_path, capsys, no_model, args, message):
    assert generate(tmp_path, *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_steps_above_the_schedulers_training_timesteps_are_refused_from_its_config(tmp_path, capsys, no_weights):
    assert generate(tmp_path, "--size", "64x64", "--steps", "1001") == 2
    assert ("--steps=1001: this model's scheduler (DDIMScheduler) was trained with 1000 timesteps, so at most 1000 "
            "steps can run") in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "steps": 5000}\n')
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--quiet", "--size", "64x64"]) == 2
    assert "p.jsonl:2: steps=5000: this model's scheduler" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_scale_too_small_for_one_pixel_block_is_refused_with_the_smallest(tmp_path, capsys, no_weights):
    assert generate(tmp_path, "--scale", "1e-6") == 2
    assert ("--scale 1e-06 of the 64x64 base gives 0x0 pixels; the smallest size is 8x8 pixels (--scale 0.125)"
            in capsys.readouterr().err)


# -- strict, friendly readers ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, data, message",
    [
        ("p.csv", b'prompt,seed\n"unterminated,1\n', "p.csv:2: unexpected end of data (a quote opened here is never "
                                                     "closed"),
        ("p.csv", b'prompt,seed\nok,1\n"a" b,2\n', "p.csv:3: ',' expected after '\"'"),
        ("p.csv", b"prompt,seed,seed\na,1,2\n", "p.csv:1: the header row names 'seed' more than once"),
        ("p.jsonl", b'{"prompt": "a", "prompt": "b"}\n', "p.jsonl:1: key 'prompt' is given more than once"),
        ("p.jsonl", b'{"prompt": "a", "guidance": 1e309}\n', "p.jsonl:1: guidance=1e309 is beyond the largest float"),
        ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "a blue square", "guidance": 1e308}\n',
         "p.jsonl:2: guidance=1e+308 must be a finite number >= 0 and at most 100"),
        ("p.jsonl", b'{"prompt": "a", "seed": -Infinity}\n', "p.jsonl:1: seed=-Infinity is not a number JSON allows"),
        ("p.txt", "caf\u00e9 au lait\n".encode("latin-1"), "is not UTF-8: byte 0xe9 at line 1, column 4 is not valid "
                                                           "UTF-8 (Latin-1"),
        ("p.csv", "prompt\na red circle\n".encode("utf-16"), "is UTF-16-encoded (it starts with a UTF-16 byte-order "
                                                             "mark); save it as UTF-8"),
        ("p.jsonl", '{"prompt": "a"}\n'.encode("utf-16-le"), "holds NUL bytes, as UTF-16 text without a byte-order "
                                                             "mark does; save it as UTF-8"),
    ],
)
def test_prompt_files_are_read_strictly_with_the_line_and_the_remedy(tmp_path, capsys, no_model, name, data, message):
    prompts = tmp_path / name
    prompts.write_bytes(data)
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "save it as UTF-8" in err or b"\x00" not in data
    assert not (tmp_path / "out").exists()


def test_byte_order_marks_of_utf8_files_are_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    csv_file = tmp_path / "excel.csv"  # what Excel's "CSV UTF-8" writes
    csv_file.write_bytes(bom + b"prompt,seed\r\na red circle,3\r\n\"red, round\",4\r\n")
    items = batch.read_prompt_file(csv_file)
    assert [(i.prompt, i.overrides, i.line) for i in items] == [("a red circle", {"seed": 3}, 2),
                                                                ("red, round", {"seed": 4}, 3)]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_bytes(bom + b'{"prompt": "a blue square", "seed": 1}\n')
    assert batch.read_prompt_file(jsonl)[0].overrides == {"seed": 1}
    multi = tmp_path / "multi.csv"  # a quoted cell over two lines: the next row's line is still right
    multi.write_text('prompt,seed\n"two\nlines",1\nthird,2\n')
    assert [(i.prompt, i.line) for i in batch.read_prompt_file(multi)] == [("two\nlines", 2), ("third", 4)]


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"structure_guidance": {"enabled": true, "sharpen_alpha": 1e309}}',
         "HiresConfig.structure_guidance.sharpen_alpha=1e309 is beyond the largest float"),
        ('{"apg": {"enabled": true, "eta": Infinity}}', "HiresConfig.apg.eta=Infinity is not a number JSON allows"),
        ('{"apg": {"enabled": true}, "apg": {"enabled": false}}', "HiresConfig: key 'apg' is given more than once"),
        ('{"apg": {"enabled": true, "enabled": false}}', "HiresConfig.apg: key 'enabled' is given more than once"),
        ('{"structure_guidance": true}', 'HiresConfig.structure_guidance=true must be a JSON object of '
                                         'structure_guidance options, e.g. "structure_guidance": {"enabled": true}'),
        ('{"structure_guidance": {"space": 3}}',
         "HiresConfig.structure_guidance.space=3 must be a JSON string, one of 'latent', 'pixel'"),
    ],
)
def test_config_files_are_read_strictly_with_the_key_path(tmp_path, capsys, no_model, text, message):
    config = tmp_path / "c.json"
    config.write_text(text)
    assert generate(tmp_path, "--size", "64x64", "--config", str(config)) == 2
    err = capsys.readouterr().err
    assert f"--config {str(config)!r}: " in err and message in err, err


def test_a_config_file_with_a_utf8_bom_is_read_and_a_latin1_one_is_answered(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_bytes(b'\xef\xbb\xbf{"apg": {"enabled": true}}')
    assert cli.read_config_file(str(config)) == {"apg": {"enabled": True}}
    config.write_bytes('{"apg": {"enabled": true}} // d\u00e9j\u00e0'.encode("latin-1"))
    with pytest.raises(cli.CliError, match=r"--config .* is not UTF-8: byte 0xe9 at line 1.*save it as UTF-8"):
        cli.read_config_file(str(config))


def test_the_strict_json_reader_gives_plain_values():
    from hires.io import loads_strict

    value = loads_strict('{"a": [1, 2.5, {"b": null}], "c": "d"}')
    assert value == {"a": [1, 2.5, {"b": None}], "c": "d"} and type(value) is dict and type(value["a"][2]) is dict
    with pytest.raises(ValueError, match=r"^x\.a\[1\]\.b=NaN is not a number JSON allows"):
        loads_strict('{"a": [0, {"b": NaN}]}', "x")
    with pytest.raises(json.JSONDecodeError):
        loads_strict('{"a": ')


# -- the model folder: its weights' identity in every key, damaged files named ----------------------
def copy_model(tmp_path, name="model"):
    import shutil

    target = tmp_path / name
    shutil.copytree(cli.DEFAULT_MODEL, target)
    return target


def overwrite_tensor_in_place(path, name, change):
    """Rewrite one float32 tensor's bytes inside a safetensors file: same header, same size, new values."""
    import json as json_

    import torch

    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        entry = json_.loads(handle.read(length))[name]
        start, end = entry["data_offsets"]
        assert entry["dtype"] == "F32"
        handle.seek(8 + length + start)
        values = torch.frombuffer(bytearray(handle.read(end - start)), dtype=torch.float32)
        handle.seek(8 + length + start)
        handle.write(change(values).numpy().tobytes())


def test_weights_replaced_in_place_are_rendered_again(tmp_path, capsys):
    model = copy_model(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    command = ["batch", str(prompts), "--out", str(out), "--model", str(model), "--steps", "2", "--size", "64x64"]
    assert main(command) == 0
    first = {p.name: p.read_bytes() for p in out.glob("*.png")}
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    header = weights.read_bytes()[:4096]
    overwrite_tensor_in_place(weights, "conv_out.weight", lambda t: t * 0.5)
    assert weights.read_bytes()[:4096] == header
    assert weights.stat().st_size == size  # same names, shapes and size: only the content and mtime differ
    capsys.readouterr()
    assert main(command) == 0
    assert "(rendered 2 here)" in capsys.readouterr().out
    assert all((out / name).read_bytes() != data for name, data in first.items())
    assert main(command) == 0  # unchanged again: nothing rendered
    assert "(rendered 0 here)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: (m / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b""),
         "unet/diffusion_pytorch_model.safetensors' is empty (0 bytes): an interrupted download or save"),
        (lambda m: __import__("shutil").rmtree(m / "unet"),
         "model_index.json lists unet (UNet2DConditionModel) but the folder"),
        (lambda m: (m / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(
            (m / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()[:50000]),
         "vae/diffusion_pytorch_model.safetensors' is truncated: 50000 bytes of the"),
        (lambda m: (m / "unet" / "diffusion_pytorch_model.safetensors").rename(m / "unet" / "weights.txt"),
         "unet' holds no weights file"),
        (lambda m: (m / "unet" / "config.json").unlink(),
         "unet/ (UNet2DConditionModel) cannot be read from its files"),
    ],
)
def test_a_damaged_model_folder_is_one_line_naming_the_file(tmp_path, capsys, no_weights, damage, message):
    model = copy_model(tmp_path)
    damage(model)
    assert generate(tmp_path, "--model", str(model), "--size", "64x64") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "re-download or re-save" in err, err


# -- no wrong image saved as done: NaN and infinity through generate, batch and the Python API -------
@pytest.fixture(scope="module")
def saved_flux(tmp_path_factory):
    """A tiny Flux built in code and saved once (with its 64 px base in hires.json)."""
    import tiny_models

    folder = tmp_path_factory.mktemp("tiny-flux") / "flux"
    tiny_models.flux_pipeline().save_pretrained(folder)
    (folder / "hires.json").write_text(json.dumps({"base_size": [64, 64]}))
    return folder


@pytest.fixture
def model_folder(tmp_path, request):
    """model_folder(family): a copy of the embedded sd15 testbed or of the tiny Flux, with its denoiser's
    name and the name of its output bias."""
    import shutil

    def make(family):
        if family == "sd15":
            return copy_model(tmp_path, "sd15"), "unet", "conv_out.bias"
        target = tmp_path / "flux"
        shutil.copytree(request.getfixturevalue("saved_flux"), target)
        return target, "transformer", "proj_out.bias"

    return make


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("family", ["sd15", "flux"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_renders_are_never_saved_on_any_surface(tmp_path, capsys, model_folder, family, value):
    import diffusers

    import hires

    model, component, tensor = model_folder(family)
    weights = model / component / "diffusion_pytorch_model.safetensors"

    def poison(values):
        values[0] = value
        return values

    overwrite_tensor_in_place(weights, tensor, poison)
    fast = ["--model", str(model), "--steps", "2", "--quiet"]

    # the Python API: the pipeline raises instead of returning a NaN image
    pipe = hires.apply(diffusers.DiffusionPipeline.from_pretrained(str(model)))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(hires.guards.NonFiniteOutputError, match=rf"weights of {component} hold NaN or infinity"):
        pipe("a red circle", height=128, width=128, num_inference_steps=2)
    capsys.readouterr()  # the loading bars of from_pretrained

    # hires generate: exit status 1, one line naming the weights, no PNG and nothing half-written
    out = tmp_path / "gen" / "image.png"
    assert main(["generate", "--prompt", "a red circle", "--size", "128x128", "--out", str(out), *fast]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no PNG was written" in err, err
    assert f"weights of {component} hold NaN or infinity ({component}.{tensor}): the files of --model" in err
    assert not out.exists() and hidden(out.parent) == []

    # hires batch: every item failed in the manifest, no PNG, exit status 1; a rerun tries again
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square", "size": "128x64"}\n')
    folder = tmp_path / "batch"
    for _ in range(2):
        assert main(["batch", str(prompts), "--out", str(folder), "--size", "64x64", *fast]) == 1
        err = capsys.readouterr().err
        assert "2 of 2 items failed (no PNG written" in err and "p.jsonl:2: the render of 128x64" in err, err
        manifest = json.loads((folder / "manifest.json").read_text())
        assert [e["status"] for e in manifest["items"]] == ["failed", "failed"] and manifest["done"] == 0
        assert all(f"{component}.{tensor}" in e["error"]["error"] for e in manifest["items"])
        assert list(folder.glob("*.png")) == []


def poison_non_square_calls(monkeypatch, family, value):
    """The denoiser class's forward returns `value` everywhere in calls of a non-square size (one item)."""
    import functools

    import diffusers

    cls = diffusers.UNet2DConditionModel if family == "sd15" else diffusers.FluxTransformer2DModel
    original = cls.forward

    @functools.wraps(original)  # hires binds the denoiser's arguments by its signature
    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        hidden_states = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if family == "sd15":
            square = hidden_states.shape[-1] == hidden_states.shape[-2]
        else:  # packed tokens of a square grid
            square = math.isqrt(hidden_states.shape[1]) ** 2 == hidden_states.shape[1]
        if square:
            return output
        sample = output[0] if isinstance(output, tuple) else output.sample
        poisoned = torch.full_like(sample, value)
        return (poisoned, *output[1:]) if isinstance(output, tuple) else type(output)(sample=poisoned)

    monkeypatch.setattr(cls, "forward", forward)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_a_non_finite_item_fails_alone_and_a_rerun_retries_it(tmp_path, capsys, monkeypatch, model_folder, family):
    model, _, _ = model_folder(family)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square", "size": "128x64"}\n'
                       '{"prompt": "a green triangle"}\n')
    out = tmp_path / "out"
    command = ["batch", str(prompts), "--out", str(out), "--model", str(model), "--size", "64x64", "--steps", "2",
               "--quiet"]
    with monkeypatch.context() as patch:
        poison_non_square_calls(patch, family, float("inf"))
        assert main(command) == 1
    err = capsys.readouterr().err
    assert "p.jsonl:2: the render of 128x64 (seed 1) ended with non-finite latents" in err, err
    assert "1 of 3 items failed (no PNG written" in err and "the same command retries them" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["status"] for e in manifest["items"]] == ["done", "failed", "done"]
    assert (manifest["done"], manifest["failed"]) == (2, 1)
    assert not (out / "00001-a-blue-square.png").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert len(kept) == 2

    assert main(command) == 0  # the cause is gone: only the failed item is rendered
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["status"] for e in manifest["items"]] == ["done"] * 3 and manifest["failed"] == 0
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    assert hidden(out) == []  # the failure note is gone with the failure


# -- the output proven before the work; a render whose write fails is kept ---------------------------
@pytest.mark.skipif(not (os.path.isdir("/proc") and os.access("/proc", os.W_OK)),
                    reason="needs a procfs that os.access calls writable")
def test_a_folder_that_takes_no_files_is_refused_before_the_weights(tmp_path, capsys, no_weights):
    assert main(["generate", "--prompt", "x", "--size", "64x64", "--out", "/proc/hires-probe.png", "--quiet"]) == 2
    assert "its folder '/proc': a file cannot be created there" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["batch", str(prompts), "--out", "/proc/hires-renders", "--size", "64x64", "--quiet"]) == 2
    assert "the folder '/proc/hires-renders' cannot be created" in capsys.readouterr().err


def test_a_name_too_long_for_the_file_system_is_refused_before_the_weights(tmp_path, capsys, no_weights):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "name": "n" * 300}) + "\n")
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--size", "64x64", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert ("(304 bytes) and the temporary file written beside it (318 bytes) exceed this file system's limit of "
            f"{limit}") in err \
        and f"use a file name of at most {limit - 14} bytes" in err
    # a name that fits alone but not with its temporary file's 14 more bytes
    fits_alone = "m" * (limit - 4 - 5)
    prompts.write_text(json.dumps({"prompt": "a", "name": fits_alone}) + "\n")
    assert main(["batch", str(prompts), "--out", str(out), "--size", "64x64", "--quiet"]) == 2
    assert "exceed this file system's limit" in capsys.readouterr().err
    assert not out.exists()  # the folder made for the proof is removed again
    assert generate(tmp_path, "--size", "64x64", "--out", str(tmp_path / (fits_alone + ".png"))) == 2


def test_too_little_free_space_is_refused_with_the_numbers(tmp_path, capsys, no_weights, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    assert generate(tmp_path, "--size", "128x128") == 2
    err = capsys.readouterr().err
    assert "the PNG needs up to 304.2 KiB and the file system has 1000 B free" in err, err  # 128 rows of 385 B + text
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--size", "64x64", "--quiet"]) == 2
    assert "the 2 PNGs to render need up to" in capsys.readouterr().err


def fail_final_renames(monkeypatch, folder):
    """os.replace into `folder` fails as on a full disk; elsewhere (the temporary folder) it works."""
    import errno

    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).parent == folder:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_a_render_whose_write_fails_is_kept_and_said_where(tmp_path, capsys, monkeypatch):
    import tempfile

    from PIL import Image

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "o.png"
    fail_final_renames(monkeypatch, tmp_path)
    assert generate(tmp_path, "--size", "64x64", "--steps", "2") == 1
    err = capsys.readouterr().err.strip()
    kept = tmp_path / "tmp" / "hires-recovered" / "o.png"
    assert err == f"hires generate: error: {out} could not be written (No space left on device); the render is kept " \
                  f"at {kept}"
    assert not out.exists() and json.loads(Image.open(kept).text["hires"])["steps"] == 2
    assert hidden(tmp_path) == []  # no temporary file left behind

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    folder = tmp_path / "out"
    folder.mkdir()
    fail_final_renames(monkeypatch, folder)
    assert main(["batch", str(prompts), "--out", str(folder), "--size", "64x64", "--steps", "2", "--quiet"]) == 1
    err = capsys.readouterr().err
    recovered = tmp_path / "tmp" / "hires-recovered" / "00000-a-red-circle.png"
    assert f"p.txt:1: {folder / '00000-a-red-circle.png'} could not be written (No space left on device); " \
           f"the render is kept at {recovered}; the batch stopped there" in err
    assert (tmp_path / "tmp" / "hires-recovered" / "00000-a-red-circle.png").is_file()
    assert list(folder.glob("*.png")) == []


# -- one parameter set per folder at a time; leftovers cleaned --------------------------------------
def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


# A batch that waits, inside its first render, until the test creates the gate file.
GATED_BATCH = """
import pathlib, sys, time
from hires import cli
render = cli.Renderer.render
def gated(self, *args, **kwargs):
    while not pathlib.Path(sys.argv[1]).exists():
        time.sleep(0.05)
    return render(self, *args, **kwargs)
cli.Renderer.render = gated
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_second_batch_with_other_parameters_is_refused_while_the_first_runs(tmp_path, capsys):
    import subprocess
    import sys
    import time

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(3)))
    out = tmp_path / "out"
    gate = tmp_path / "go"
    command = ["batch", str(prompts), "--out", str(out), "--size", "64x64", "--quiet"]
    first = subprocess.Popen([sys.executable, "-c", GATED_BATCH, str(gate), *command, "--steps", "2"], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob(".*.claim")) and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1][-2000:]
        assert main([*command, "--steps", "3"]) == 2
        err = capsys.readouterr().err
        assert f"--out {str(out)!r} is being rendered by another batch with other parameters (pid {first.pid}" in err
        assert '--steps "2" there, "3" here' in err and "give this one another --out" in err
        assert main([*command[:-1], "--steps", "2"]) == 0  # the same parameters share the folder: the others here
        assert "rendered 2 here, 1 being rendered by another process" in capsys.readouterr().out
    finally:
        gate.touch()
        _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    records = [batch.read_png_record(p, verify=True) for p in out.glob("*.png")]
    assert len(records) == 3 and {r["steps"] for r in records} == {2}
    assert hidden(out) == []
    assert main([*command, "--steps", "3"]) == 0  # once no batch runs, other parameters may take the folder


def test_a_killed_batchs_lease_does_not_block_the_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{batch.LEASE_PREFIX}999999.dead{batch.LEASE_SUFFIX}").write_text(
        json.dumps({"fingerprint": "other", "pid": 999999}))  # nobody holds its lock
    lease = batch.lease_folder(out, "mine", {})
    assert [p.name for p in out.iterdir()] == [lease.path.name]
    with pytest.raises(batch.FolderBusy, match=r"pid \d+ on .*another --out"):
        batch.lease_folder(out, "theirs", {"options": {"--steps": "3"}})
    second = batch.lease_folder(out, "mine", {})
    second.release()
    lease.release()
    assert list(out.iterdir()) == []


def test_stale_claims_and_temporaries_beside_a_done_item_are_cleaned(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "out"
    command = ["batch", str(prompts), "--out", str(out), "--size", "64x64", "--steps", "2", "--quiet"]
    assert main(command) == 0
    stale = [out / ".00000-a-red-circle.png.claim", out / ".00000-a-red-circle.png.x1y2z3ab.tmp",
             out / ".00000-a-red-circle.png.failed"]
    stale[0].write_text(json.dumps({"pid": 999999, "host": "gone", "since": 0}))  # a killed run's, lock free
    stale[1].write_bytes(b"\x89PNG half")
    stale[2].write_text(json.dumps({"key": "old", "error": "x"}))
    png = (out / "00000-a-red-circle.png").stat().st_mtime_ns
    assert main(command) == 0
    assert hidden(out) == [] and (out / "00000-a-red-circle.png").stat().st_mtime_ns == png


# -- the memory planner's verdict before the weights load --------------------------------------------
def test_the_planners_refusal_comes_before_the_weights_with_command_line_remedies(tmp_path, capsys, monkeypatch):
    config = tmp_path / "m.json"
    config.write_text('{"memory": {"enabled": true, "max_memory": "96MiB"}}')  # a budget: the same on every machine
    loads = []
    real = cli.load_pipeline
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: loads.append(1) or real(*a, **k))
    assert generate(tmp_path, "--size", "1024x1024", "--config", str(config), "--steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and loads == [], err
    assert "--size 1024x1024: does not fit in memory: 1024x1024 sd15 float32 batch 1 needs" in err
    assert "budget 96.0 MiB" in err and "try --size 512x512 fits; or --dtype bfloat16" in err
    assert "enable_model_cpu_offload" not in err and "torch." not in err  # command-line remedies, not Python ones
    # what the verdict calls fitting, the runtime's own planner renders
    assert generate(tmp_path, "--size", "512x512", "--config", str(config), "--steps", "1") == 0
    assert loads == [1]

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "size": "1024x1024"}\n')
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--config", str(config), "--size", "64x64", "--quiet"]) == 2
    assert "p.jsonl:2: size 1024x1024: does not fit in memory" in capsys.readouterr().err
    assert loads == [1] and not out.exists()


# -- more bad inputs (found trying them as a new user and as an adversary) ------------------------
def _edit_index(model, **changes):
    index = json.loads((model / "model_index.json").read_text())
    index.update(changes)
    (model / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: _edit_index(m, _class_name="NoSuchPipeline"), "has no class 'NoSuchPipeline'; update diffusers"),
        (lambda m: _edit_index(m, unet=["diffusers", "NoSuchModel"]), "has no class 'NoSuchModel'"),
        (lambda m: _edit_index(m, unet=["no_such_library", "X"]), "from the library 'no_such_library', which is not "
                                                                   "installed"),
        (lambda m: __import__("shutil").copy(m / "vae" / "config.json", m / "unet" / "config.json"),
         "unet/config.json describes a AutoencoderKL, but model_index.json names unet a UNet2DConditionModel"),
        (lambda m: __import__("shutil").copy(m / "vae" / "diffusion_pytorch_model.safetensors",
                                             m / "unet" / "diffusion_pytorch_model.safetensors"),
         "unet/diffusion_pytorch_model.safetensors holds none of the tensors"),
        (lambda m: (m / "scheduler" / "scheduler_config.json").write_text(
            '{"_class_name": "DDIMScheduler", "num_train_timesteps": 0}'),
         "num_train_timesteps=0, so no step can run"),
    ],
)
def test_a_model_folder_that_names_or_holds_the_wrong_thing_is_one_line(tmp_path, capsys, no_weights, damage, message):
    model = copy_model(tmp_path)
    damage(model)
    assert generate(tmp_path, "--model", str(model), "--size", "64x64") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_a_weights_file_whose_shapes_do_not_fit_its_config_is_named(tmp_path, capsys, no_weights):
    from safetensors.torch import load_file, save_file

    model = copy_model(tmp_path)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.bias"] = torch.zeros(tensors["conv_in.bias"].shape[0] + 1)
    save_file(tensors, weights)
    assert generate(tmp_path, "--model", str(model), "--size", "64x64") == 2
    assert "does not fit unet/config.json: conv_in.bias is [" in capsys.readouterr().err


def test_input_images_too_small_or_too_large_to_read_are_refused(tmp_path, capsys):
    import struct
    import zlib

    from PIL import Image

    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    assert generate(tmp_path, "--image", str(tmp_path / "dot.png"), "--size", "128x128") == 2
    assert "is 1x1 pixels; an upscale starts from at least 8x8" in capsys.readouterr().err

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = tmp_path / "bomb.png"  # a header declaring 30000x30000 pixels over a few bytes of data
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))
    assert generate(tmp_path, "--image", str(bomb), "--size", "128x128") == 2
    assert "as a decompression bomb does; scale it down first" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.jsonl", '{"prompt": "a", "name": ".."}\n', "name='..' must not start with '.'"),
        ("p.jsonl", '{"prompt": "a", "name": "Cat"}\n{"prompt": "b", "name": "cat"}\n',
         "output names repeat (Cat, cat)"),
        ("p.csv", "prompt;seed\na;1\n", "the file looks separated by another character than ',': save it as "
                                        "comma-separated"),
        ("p.csv", "prompt,sede\na,1\n", "p.csv:1: unknown column 'sede'"),
        ("p.txt", "a\n", None),  # replaced below by a link to a device that never ends
    ],
)
def test_prompt_files_an_adversary_might_write(tmp_path, capsys, no_model, name, text, message):
    prompts = tmp_path / name
    if message is None:
        prompts.symlink_to("/dev/zero")
        message = "is not a regular file; give a file"
    else:
        prompts.write_text(text)
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_a_batch_never_replaces_a_file_it_did_not_write(tmp_path, capsys, no_weights):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "00000-a.png").write_bytes(b"someone's photo")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    assert main(["batch", str(prompts), "--out", str(out), "--size", "64x64", "--quiet"]) == 2
    assert "00000-a.png' exists and is not a hires render" in capsys.readouterr().err
    assert (out / "00000-a.png").read_bytes() == b"someone's photo"
