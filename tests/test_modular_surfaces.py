"""Every surface on a saved Modular Diffusers pipeline (what `ModularPipeline.save_pretrained(folder)` writes): at 2x
the base side, same seed, the image of `hires.apply` on the pipeline `ModularPipeline.from_pretrained(folder)` +
`load_components()` loads equals, bit for bit, that of the ready class (`hires.Hires*ModularPipeline`), of
`hires generate --model FOLDER` and of `hires batch`; `--dry-run` plans the same stages from the configs alone, and a
damaged folder is one line naming the file. The `custom_pipeline=` surface of a modular pipeline is its custom-block
folder: tests/test_modular.py::test_the_stages_block_loads_from_a_custom_block_folder.

Flux 3 exists in diffusers only as a modular pipeline, so these are its only surfaces besides `hires.apply`.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import hires
import tiny_modular as tmod
from hires import cli
from hires.cli import main
from hires.modular import drop_unloaded_steps, loop_blocks
from hires.presets import AUTOMATIC
from hires.sampling.stages import ENGINE_ATTRIBUTE
from surface_support import options_of, technique_options

FAMILIES = ("sdxl", "flux3", "flux3_distilled")
READY = {"sdxl": "HiresStableDiffusionXLModularPipeline", "flux3": "HiresFlux3ModularPipeline",
         "flux3_distilled": "HiresFlux3DistilledModularPipeline"}
BASE = 64  # the tiny models' base side; Flux 3 reads none from its configs (1024 px), so every config names it
SIZE = 2 * BASE
STEPS = 3
SEED = 7
PROMPT = "a red circle"
PRESET = "preset"
# Each family's automatic preset (structure guidance, with window attention on SDXL), and more of Flux 3's techniques
CASES = [*((family, PRESET) for family in FAMILIES),
         *(("flux3", technique) for technique in ("bottleneck", "flow_alignment", "positions")),
         ("flux3_distilled", "bottleneck")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("modular-folders")
    paths = {}
    for family in FAMILIES:
        paths[family] = root / family
        tmod.build_for_folder(family).save_pretrained(str(paths[family]))
    return paths


def preset_options(family: str, technique: str = PRESET) -> dict:
    """The family's automatic preset (or one technique) with the tiny base, as the JSON of a --config file."""
    name = "flux3" if family.startswith("flux3") else family
    options = options_of(AUTOMATIC[name]) if technique == PRESET else technique_options(name, technique)
    options["base_size"] = BASE
    return options


def _quiet(pipe):
    for loop in loop_blocks(pipe._blocks):
        loop.set_progress_bar_config(disable=True)
    return pipe


def loaded(folder, cls=None):
    """The pipeline of a saved folder as a diffusers user loads it (the class its index names, or `cls`), without
    the steps whose models the folder does not hold (Flux 3's prompt upsampler)."""
    from diffusers import ModularPipeline

    pipe = (cls or ModularPipeline).from_pretrained(str(folder))
    pipe.load_components(torch_dtype=torch.float32)
    drop_unloaded_steps(pipe)
    return _quiet(pipe)


def render(pipe, **kwargs) -> np.ndarray:
    """The PIL image of one call, as the command line makes it."""
    images = pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  generator=torch.Generator("cpu").manual_seed(SEED), output="images", **kwargs)
    return np.asarray(images[0])


def _options(folder, config) -> list[str]:
    return ["--model", str(folder), "--size", f"{SIZE}x{SIZE}", "--steps", str(STEPS), "--seed", str(SEED),
            "--config", str(config), "--dtype", "float32", "--device", "cpu", "--quiet"]


def _argv(folder, config, out, *extra) -> list[str]:
    return ["generate", "--prompt", PROMPT, *_options(folder, config), "--out", str(out), *extra]


@pytest.mark.parametrize("family, technique", [pytest.param(*case, id="-".join(case)) for case in CASES])
def test_every_surface_gives_the_image_of_apply_above_the_base_size(folders, family, technique, tmp_path):
    options = preset_options(family, technique)
    config_file = tmp_path / "hires.json"
    config_file.write_text(json.dumps(options))
    config = hires.HiresConfig.from_dict(options)

    pipe = loaded(folders[family])
    assert type(pipe).__name__ == tmod.AUTO_BLOCKS[family].replace("AutoBlocks", "ModularPipeline")
    assert "prompt_upsampler" not in pipe._blocks.sub_blocks
    hires.apply(pipe, config)
    expected = render(pipe)
    assert expected.shape == (SIZE, SIZE, 3)
    if technique in (PRESET, "flow_alignment"):
        stages = [(stage.height, stage.width) for stage in pipe.__dict__[ENGINE_ATTRIBUTE].last_run]
        assert stages == [(BASE, BASE), (SIZE, SIZE)], "structure guidance ran no stage above the base"
    assert hires.last_call(pipe).height == SIZE
    hires.remove(pipe)
    assert not np.array_equal(render(pipe), expected), "hires changed nothing above the base size"

    ready_cls = getattr(hires, READY[family])
    ready = loaded(folders[family], ready_cls)
    assert type(ready) is ready_cls and not hires.is_applied(ready)  # attaches on its first call
    assert np.array_equal(render(ready, hires_config=config), expected), "the ready class differs from apply"

    out = tmp_path / "generate.png"
    assert main(_argv(folders[family], config_file, out)) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected), "hires generate differs from apply"
    record = json.loads(Image.open(out).text["hires"])
    assert record["family"] == hires.model_info(pipe).name and record["request"]["weights"]

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "seed": SEED, "name": "one"}) + "\n")
    assert main(["batch", str(prompts), "--out", str(tmp_path / "renders"),
                 *_options(folders[family], config_file)]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "renders" / "one.png").convert("RGB")), expected)


def test_a_hires_json_beside_the_modular_index_gives_every_surface_the_base(folders, tmp_path):
    folder = tmp_path / "flux3"
    shutil.copytree(folders["flux3_distilled"], folder)
    (folder / "hires.json").write_text(json.dumps({"base_size": [BASE, BASE]}))
    pipe = loaded(folder)
    hires.apply(pipe)  # the automatic preset, at the recorded base
    assert hires.model_info(pipe).base_height == BASE
    expected = render(pipe)
    assert [(s.height, s.width) for s in pipe.__dict__[ENGINE_ATTRIBUTE].last_run] == [(BASE, BASE), (SIZE, SIZE)]
    assert np.array_equal(render(loaded(folder, hires.HiresFlux3DistilledModularPipeline)), expected)
    out = tmp_path / "o.png"
    assert main(["generate", "--prompt", PROMPT, "--model", str(folder), "--size", f"{SIZE}x{SIZE}", "--steps",
                 str(STEPS), "--seed", str(SEED), "--dtype", "float32", "--device", "cpu", "--out", str(out),
                 "--quiet"]) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected)


def test_guidance_sets_the_guider_scale_as_a_user_would(folders, tmp_path):
    from diffusers import ClassifierFreeGuidance

    options = preset_options("sdxl")
    config_file = tmp_path / "hires.json"
    config_file.write_text(json.dumps(options))
    pipe = loaded(folders["sdxl"])
    pipe.update_components(guider=ClassifierFreeGuidance.from_config({**pipe.guider.config, "guidance_scale": 2.5}))
    hires.apply(pipe, hires.HiresConfig.from_dict(options))
    expected = render(pipe)
    out = tmp_path / "o.png"
    assert main(_argv(folders["sdxl"], config_file, out, "--guidance", "2.5")) == 0
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), expected)
    assert main(_argv(folders["flux3_distilled"], config_file, out, "--guidance", "2.5")) == 2

    default = loaded(folders["sdxl"])
    hires.apply(default, hires.HiresConfig.from_dict(options))
    # a batch item without guidance gets the folder's guider back, after one with it
    items = [{"prompt": PROMPT, "seed": SEED, "guidance": 2.5, "name": "given"}, {"prompt": PROMPT, "seed": SEED,
                                                                                  "name": "folder"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(item) + "\n" for item in items))
    assert main(["batch", str(prompts), "--out", str(tmp_path / "renders"),
                 *_options(folders["sdxl"], config_file)]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "renders" / "given.png").convert("RGB")), expected)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "renders" / "folder.png").convert("RGB")),
                          render(default))


def test_dry_run_plans_the_stages_from_the_configs(folders, tmp_path, capsys, monkeypatch):
    config_file = tmp_path / "hires.json"
    config_file.write_text(json.dumps(preset_options("flux3")))

    def no_weights(*args, **kwargs):
        raise AssertionError("--dry-run loaded weights")

    monkeypatch.setattr(cli, "load_modular_pipeline", no_weights)
    assert main(_argv(folders["flux3"], config_file, tmp_path / "o.png", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert "(Flux3ModularPipeline, family flux3, base 64x64" in out
    assert f"stage 0: {BASE}x{BASE}, {STEPS} steps" in out and f"stage 1: {SIZE}x{SIZE}," in out
    assert "verdict: a run would load the weights and render" in out
    assert not (tmp_path / "o.png").exists()


def test_the_weights_identity_follows_the_component_files(folders, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(folders["flux3_distilled"], folder)
    index = json.loads((folder / cli.MODULAR_INDEX).read_text())
    before = cli.weights_identity(folder)
    assert before == cli.weights_identity(folder)
    weights = next((folder / index["transformer"][2]["subfolder"]).glob("*.safetensors"))
    os.utime(weights, (1, 1))  # replaced in place: another mtime
    assert cli.weights_identity(folder) != before


def _broken(folders, tmp_path, damage) -> str:
    folder = tmp_path / "broken"
    shutil.copytree(folders["flux3_distilled"], folder)
    damage(folder)
    return str(folder)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "modular_model_index.json").write_text("{"), r"modular_model_index\.json cannot be read"),
    (lambda f: shutil.rmtree(f / "vae"),
     r"modular_model_index\.json lists vae \(AutoencoderKLFlux2\) from .*\(vae/\), whose files are not in this "
     r"folder"),
    (lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00"),
     r"diffusion_pytorch_model\.safetensors"),
    (lambda f: (f / "modular_model_index.json").write_text(json.dumps(
        {**json.loads((f / "modular_model_index.json").read_text()), "_class_name": "NoSuchModularPipeline"})),
     r"modular_model_index\.json names the pipeline, but diffusers .* has no class 'NoSuchModularPipeline'"),
    (lambda f: (f / "modular_model_index.json").write_text(json.dumps(
        {**json.loads((f / "modular_model_index.json").read_text()), "_class_name": "FluxPipeline"})),
     r"names FluxPipeline, which is not a Modular Diffusers pipeline"),
], ids=["index-not-json", "component-folder-missing", "weights-truncated", "unknown-class", "classic-class"])
def test_a_damaged_folder_is_one_line_naming_the_file(folders, tmp_path, capsys, damage, message):
    folder = _broken(folders, tmp_path, damage)
    out = tmp_path / "o.png"
    for extra in ((), ("--dry-run",)):
        code = main(["generate", "--model", folder, "--prompt", PROMPT, "--size", f"{SIZE}x{SIZE}",
                     "--out", str(out), "--quiet", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


def test_a_folder_without_any_index_names_both(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--model", str(tmp_path / "empty"), "--prompt", PROMPT, "--out",
                 str(tmp_path / "o.png"), "--quiet"]) == 2
    assert "no model_index.json, nor the modular_model_index.json" in capsys.readouterr().err


def test_image_upscaling_is_refused_on_a_modular_folder(folders, tmp_path, capsys):
    picture = tmp_path / "in.png"
    Image.new("RGB", (BASE, BASE)).save(picture)
    assert main(["generate", "--model", str(folders["flux3_distilled"]), "--prompt", PROMPT, "--image",
                 str(picture), "--size", f"{SIZE}x{SIZE}", "--out", str(tmp_path / "o.png"), "--quiet"]) == 2
    assert f"--image {str(picture)!r}: Flux3DistilledModularPipeline is a Modular Diffusers pipeline" in \
        capsys.readouterr().err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "image": "in.png"}) + "\n")
    assert main(["batch", str(prompts), "--model", str(folders["flux3_distilled"]), "--size", f"{SIZE}x{SIZE}",
                 "--out", str(tmp_path / "renders"), "--quiet"]) == 2
    assert f"{prompts}:1: image {str(picture)!r}: Flux3DistilledModularPipeline is a" in capsys.readouterr().err


@pytest.mark.parametrize("family", tmod.FAMILIES)
def test_each_family_s_ready_class_equals_apply_on_the_same_modules(family):
    import dataclasses

    from hires.presets import automatic_config

    pipe = tmod.build(family)
    config = dataclasses.replace(automatic_config(hires.model_info(pipe)), base_size=BASE)
    hires.apply(pipe, config)
    expected = tmod.generate(pipe, family, size=SIZE, steps=STEPS)
    hires.remove(pipe)  # the ready pipeline shares its modules
    ready_cls = getattr(hires, f"Hires{type(pipe).__name__}")
    ready = tmod.init(tmod.blocks(family), family, tmod.shared_parts(pipe), cls=ready_cls)
    assert torch.equal(tmod.generate(ready, family, size=SIZE, steps=STEPS, hires_config=config), expected)
    assert hires.last_call(ready).height == SIZE
    with pytest.raises(ValueError, match="height"):
        tmod.generate(ready, family, size=SIZE + 1, steps=STEPS)


@pytest.mark.parametrize("name", sorted(n for n in hires._READY_PIPELINES if n.endswith("ModularPipeline")))
def test_each_ready_modular_class_is_its_diffusers_class_with_hires(name):
    import diffusers

    from hires.pipelines import HiresModularPipelineMixin

    cls = getattr(hires, name)
    assert cls.__mro__[1:3] == (HiresModularPipelineMixin, getattr(diffusers, name.removeprefix("Hires")))


def test_every_supported_modular_class_has_its_ready_class():
    from hires.families import SUPPORTED_MODULAR_PIPELINES

    import diffusers

    ready = {n.removeprefix("Hires") for n in hires._READY_PIPELINES if n.endswith("ModularPipeline")}
    assert set(SUPPORTED_MODULAR_PIPELINES) <= ready
    supported = tuple(getattr(diffusers, n) for n in SUPPORTED_MODULAR_PIPELINES)
    assert all(issubclass(getattr(diffusers, n), supported) for n in ready)  # Flux 3 distilled: a Flux 3 subclass


def test_a_batch_rerun_renders_nothing_until_the_weights_change(folders, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(folders["flux3_distilled"], folder)
    config_file = tmp_path / "hires.json"
    config_file.write_text(json.dumps(preset_options("flux3_distilled")))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "name": "one"}) + "\n")
    argv = ["batch", str(prompts), "--out", str(tmp_path / "renders"),
            *[a for a in _options(folder, config_file) if a != "--quiet"]]
    assert main(argv) == 0 and "(rendered 1 here)" in capsys.readouterr().out
    assert main(argv) == 0 and "(rendered 0 here)" in capsys.readouterr().out
    os.utime(next((folder / "vae").glob("*.safetensors")), (1, 1))
    assert main(argv) == 0 and "(rendered 1 here)" in capsys.readouterr().out
