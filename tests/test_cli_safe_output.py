"""Issue 30, the command line's half: every value bounded where it is read, strict and friendly file
readers, the output proven before the work, and no wrong image ever saved as done."""

import json

import pytest

from hires import batch, cli
from hires.cli import main


@pytest.fixture
def no_weights(monkeypatch):
    """Loading weights fails the test: every error below must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(cli, "load_pipeline", refuse)


@pytest.fixture
def no_model(no_weights, monkeypatch):
    """Neither weights nor the model's configs may be read."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was read before the error")

    monkeypatch.setattr(cli, "load_pipeline_skeleton", refuse)


def generate(tmp_path, *args):
    return main(["generate", "--prompt", "x", "--out", str(tmp_path / "o.png"), "--quiet", *args])


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
        (lambda m: (m / "unet" / "config.json").unlink(), "unet/ (UNet2DConditionModel) cannot be read from its files"),
    ],
)
def test_a_damaged_model_folder_is_one_line_naming_the_file(tmp_path, capsys, no_weights, damage, message):
    model = copy_model(tmp_path)
    damage(model)
    assert generate(tmp_path, "--model", str(model), "--size", "64x64") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "re-download or re-save" in err, err
