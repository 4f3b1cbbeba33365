"""Issue #15, every surface runs every technique: at 2x the base side, same seed, a technique gives the
same image through (a) `hires.apply` on the plain diffusers pipeline, (b) the ready pipeline class,
(c) the community-pipeline file and (d) `hires generate`; and it really runs above the base size.
Also: `from_pipe` siblings sharing one denoiser, and the ready pipelines' bit-identity with plain
diffusers under `HiresConfig()`. The Modular Diffusers pipelines' surfaces (Flux 3's only ones among them):
tests/test_modular_surfaces.py, and their custom-block folder in tests/test_modular.py.

Each family's tiny pipeline is saved once per session and every surface loads it from there (a
reloaded tiny Flux differs from the in-memory one by ~2e-6). Tests share only those read-only
folders and caches of results, so any subset runs alone and in any order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

import hires
import tiny_models
from hires.presets import AUTOMATIC
from hires.runtime import get_attachment
from hires.techniques.bottleneck import slices as bottleneck
from hires.techniques.structure_guidance import guidance as progressive
from hires.techniques.memory import tiled_vae
from surface_support import (
    BASE, NO_ATTENTION_REWRITE, PIPELINE_BASE, PRESET, PROMPT,
    READY, REPO, SEED, SIZE, STEPS, TRUE_CFG, call_arguments, denoised_size, plain_at,
    has_base_size_option, options_of, technique_options, techniques_for,
)

FAMILIES = tiny_models.FAMILY_NAMES
HAS_BASE_SIZE = has_base_size_option()
STAGED = ("structure_guidance_latent", "structure_guidance_pixel", "structure_guidance_respaced", "bottleneck")

def _cases(surface: str, constructions=(None,)) -> list:
    params = []
    for construction in constructions:
        for family in FAMILIES:
            for technique in techniques_for(family):
                values = (family, technique) if construction is None else (construction, family, technique)
                name = f"{family}-{technique}" if construction is None else f"{construction}-{family}-{technique}"
                params.append(pytest.param(*values, id=name))
    return params


# -- the saved pipelines and the one call every surface makes -----------------------------------------
class _Saved:
    """Each family's tiny pipeline saved once per session (on first use)."""

    def __init__(self, root: Path):
        self.root = root
        self.paths: dict[str, Path] = {}

    def __getitem__(self, family: str) -> Path:
        if family not in self.paths:
            path = self.root / family
            tiny_models.build(family).save_pretrained(path)
            self.paths[family] = path
        return self.paths[family]


@pytest.fixture(scope="session")
def saved(tmp_path_factory) -> _Saved:
    return _Saved(tmp_path_factory.mktemp("surfaces"))


def _prepare(pipe, family: str):
    pipe.set_progress_bar_config(disable=True)
    if family in PIPELINE_BASE:
        # FluxPipeline hard-codes default_sample_size 128 (1024 px); the tiny model's base is 64 px.
        pipe.default_sample_size = BASE // pipe.vae_scale_factor
    return pipe


def _config(family: str, technique: str) -> hires.HiresConfig | None:
    if technique == PRESET:
        return None
    return hires.HiresConfig.from_dict(technique_options(family, technique))


def _with_base_size(config: hires.HiresConfig | None, family: str) -> hires.HiresConfig:
    """`config` (None: the automatic preset) with the tiny model's base size, for surfaces that load
    Flux from disk and so read its hard-coded 1024 px base (needs HiresConfig.base_size)."""
    config = AUTOMATIC[family] if config is None else config
    return dataclasses.replace(config, base_size=BASE)


@dataclasses.dataclass
class Result:
    image: torch.Tensor  # output_type="pt"
    record: hires.CallRecord | None
    structure_stages: tuple | None
    bottleneck_stages: tuple | None
    tiled_decodes: int


def _stages(module, pipe):
    try:
        return module.last_run(pipe)
    except ValueError:  # the technique is not applied
        return None


def _generate(pipe, family: str, technique: str, **extra) -> Result:
    """The call of every surface: what `hires generate --size 128x128 --steps 3 --seed 7 --guidance G`
    passes, with output_type="pt" (the CLI's PNG is the same tensor through the pipeline's own PIL step)."""
    counted = []
    original = tiled_vae.tiled_decode

    def counting(*args, **kwargs):
        counted.append(1)
        return original(*args, **kwargs)

    tiled_vae.tiled_decode = counting  # the tiled VAE hook looks the function up at call time
    try:
        image = pipe(prompt=PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                     generator=torch.Generator("cpu").manual_seed(SEED), output_type="pt",
                     **call_arguments(family, technique), **extra).images
    finally:
        tiled_vae.tiled_decode = original
    applied = hires.is_applied(pipe)
    return Result(image, hires.last_call(pipe) if applied else None,
                  _stages(progressive, pipe) if applied else None, _stages(bottleneck, pipe) if applied else None,
                  len(counted))


_REFERENCE: dict = {}  # (family, technique, plain, as_asked) -> Result of surface (a), or of plain diffusers


def _plain_pipe(saved, family):
    """A plain diffusers pipeline of its own, loaded from the family's saved folder."""
    from diffusers import DiffusionPipeline

    return _prepare(DiffusionPipeline.from_pretrained(saved[family]), family)


def _reference(saved, family: str, technique: str, plain: bool = False, as_asked: bool = False) -> Result:
    """Surface (a): hires.apply on the plain diffusers pipeline, then the call; with `plain`, the same
    call (the technique's call arguments) without hires, and with `as_asked` too, plain diffusers set to
    denoise the size asked for where its pipeline would rescale it (`plain_at`)."""
    key = (family, technique, plain, as_asked)
    if key not in _REFERENCE:
        pipe = _plain_pipe(saved, family)
        if plain and as_asked:
            plain_at(pipe, family, SIZE, SIZE)
        elif not plain:
            config = _config(family, technique)
            hires.apply(pipe) if config is None else hires.apply(pipe, config)
        _REFERENCE[key] = _generate(pipe, family, technique)
    return _REFERENCE[key]


# -- what "the technique ran above the base size" means, per technique ----------------------------------
def _assert_ran(result: Result, plain: Result, family: str, technique: str) -> None:
    assert result.record is not None, "hires.last_call(pipe) is None: hires saw no call"
    assert (result.record.height, result.record.width) == (SIZE, SIZE)
    assert result.record.completed
    notes = result.record.notes
    if technique.startswith("structure_guidance") or technique == PRESET:
        stages = result.structure_stages
        assert stages is not None, "progressive.last_run(pipe) is None: no structure guidance ran"
        assert len(stages) > 1
        assert (stages[0].height, stages[0].width) == (BASE, BASE) and (stages[-1].height,
                                                                        stages[-1].width) == (SIZE, SIZE)
        assert all(stage.guided_steps for stage in stages[1:]), stages  # the low-band swap happened
    if technique == "bottleneck":
        stages = result.bottleneck_stages
        assert stages is not None, "bottleneck.last_run(pipe) is None: no bottleneck stages ran"
        assert [(s.height, s.width) for s in stages] == [(SIZE, SIZE), (BASE, BASE), (SIZE, SIZE)]
    if technique == "redilation":
        assert notes.get("log.redilation.plan") and notes.get("log.redilation.dilated_convs_per_step")
    if technique == "entropy_scaling":
        factors = notes["log.entropy_factors"]
        values = factors.values() if isinstance(factors, dict) else factors
        assert any(float(v) > 1 for v in values), factors
    if technique == "window_attention":
        assert notes.get("log.windows"), notes
    if technique == "apg":
        assert notes.get("log.apg.steps"), notes
    if technique == "positions":
        expected = {"pixart": None, "sd3": "log.positions.timestep_shift"}.get(family, "log.positions.rope")
        assert expected is None or notes.get(expected), notes  # PixArt's interpolation scale logs nothing
    if technique == "dype":
        assert notes.get("log.positions.dype"), notes
    if technique == "flow_alignment":
        assert notes.get("log.flow_alignment.steps"), notes
    if technique == "memory":
        assert notes.get("log.memory_plan"), notes
    if technique == "memory_staged":  # every stage took its choices from the whole call's plan
        assert "stage 2 steps" in notes.get("log.memory_call_plan", ""), notes
        assert "stage 2 start: encode" in notes["log.memory_call_plan"], notes
        assert result.structure_stages is not None and len(result.structure_stages) > 1
    if technique == "vae_tiling":
        assert result.tiled_decodes >= 1, "the tiled VAE decode never ran"
    if technique == "skip_residual":
        assert any(w > 0.01 for w in notes.get("log.skip_residual.weights", ())), notes
    if technique.startswith("dilated_sampling"):
        assert notes.get("log.dilated_sampling", {}).get("strides") == (2, 2), notes
    if technique == "dilated_sampling_local":
        assert len(notes["log.dilated_sampling"].get("windows", ())) == STEPS, notes

    exact_by_design = ("vae_tiling", "memory", "attention_backend")
    if technique in exact_by_design:  # equal to the untiled / unchunked / default computation up to rounding
        assert torch.allclose(result.image, plain.image, atol=1e-5), float((result.image - plain.image).abs().max())
    else:
        assert not torch.equal(result.image, plain.image), f"{technique} left the 2x image as plain diffusers made it"


def _assert_same_image(result: Result, reference: Result) -> None:
    same_shape = result.image.shape == reference.image.shape
    difference = float((result.image - reference.image).abs().max()) if same_shape else None
    assert torch.equal(result.image,
                       reference.image), f"differs from hires.apply's image (max abs difference {difference})"


# -- the technique table --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_technique_table_is_what_validate_for_accepts(family):
    """Every HiresConfig sub-config is covered, and a family gets exactly the techniques it accepts."""
    info = hires.model_info(_prepare(tiny_models.build(family), family))
    fields = {f.name for f in dataclasses.fields(hires.HiresConfig)} - {"base_size", "extensions"}
    covered = {next(iter(technique_options(family, t))) for f in FAMILIES for t in techniques_for(f) if t != PRESET}
    assert covered == fields
    for name in fields:
        options = technique_options(family, "structure_guidance_pixel" if name == "structure_guidance" else name)
        try:
            hires.HiresConfig.from_dict(options).validate_for(info)
            accepted = True
        except ValueError:
            accepted = False
        listed = any(next(iter(technique_options(family, t))) == name for t in techniques_for(family))
        assert accepted == listed, (name, accepted, listed)


# -- (a) hires.apply on the plain pipeline ---------------------------------------------------------------
@pytest.mark.parametrize("family, technique", _cases("apply"))
def test_apply_runs_the_technique_above_the_base_size(saved, family, technique):
    _assert_ran(_reference(saved, family, technique),
                _reference(saved, family, technique, plain=True, as_asked=True), family, technique)


def test_apg_on_flux_without_true_cfg_is_a_clear_error(saved):
    """Why Flux's APG rows pass true_cfg_scale and a negative prompt (--true-cfg and --negative on the CLI)."""
    pipe = hires.apply(_plain_pipe(saved, "flux"), _config("flux", "apg"))
    with pytest.raises(ValueError, match="APGConfig needs classifier-free guidance.*true_cfg_scale"):
        pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="pt")


# -- (b) the ready pipeline classes ----------------------------------------------------------------------
def _hires_config_argument(config) -> dict:
    return {} if config is None else {"hires_config": config}


def _ready(saved, family: str, construction: str):
    """A ready pipeline of its own (no component shared with another test's pipeline)."""
    from diffusers import DiffusionPipeline

    cls = getattr(hires, READY[family][0])
    if construction == "from_pretrained":
        return _prepare(cls.from_pretrained(saved[family]), family)
    return _prepare(cls.from_pipe(DiffusionPipeline.from_pretrained(saved[family])), family)


@pytest.mark.parametrize("construction, family, technique", _cases("ready", ("from_pretrained", "from_pipe")))
def test_ready_pipeline_equals_apply(saved, construction, family, technique):
    reference = _reference(saved, family, technique)
    ready = _ready(saved, family, construction)
    config = _config(family, technique)
    result = _generate(ready, family, technique, **_hires_config_argument(config))
    assert get_attachment(ready).config == (AUTOMATIC[family] if config is None else config)
    _assert_ran(result, _reference(saved, family, technique, plain=True, as_asked=True), family, technique)
    _assert_same_image(result, reference)


# -- (c) the community-pipeline files --------------------------------------------------------------------
@pytest.mark.parametrize("family, technique", _cases("community"))
def test_community_pipeline_file_equals_apply(saved, family, technique):
    from diffusers import DiffusionPipeline

    reference = _reference(saved, family, technique)
    pipe = DiffusionPipeline.from_pretrained(saved[family], custom_pipeline=str(REPO / "pipelines" / READY[family][1]),
                                             trust_remote_code=True)
    assert type(pipe).__name__ == READY[family][0]
    assert isinstance(pipe, hires.pipelines.HiresPipelineMixin)
    config = _config(family, technique)
    pipe.set_progress_bar_config(disable=True)
    if family in PIPELINE_BASE and HAS_BASE_SIZE:
        config = _with_base_size(config, family)  # the loaded Flux reads a 1024 px base; the config corrects it
    else:
        # Without HiresConfig.base_size, set the tiny model's base on the instance, as a user would.
        _prepare(pipe, family)
    result = _generate(pipe, family, technique, **_hires_config_argument(config))
    assert get_attachment(pipe).config == (AUTOMATIC[family] if config is None else config)
    _assert_ran(result, _reference(saved, family, technique, plain=True, as_asked=True), family, technique)
    _assert_same_image(result, reference)


# -- (d) hires generate -----------------------------------------------------------------------------------
def _cli_skip(family: str, technique: str) -> str | None:
    if family in PIPELINE_BASE and not HAS_BASE_SIZE:
        return ("a Flux pipeline loaded from disk reads FluxPipeline's hard-coded 1024 px base, and HiresConfig has "
                "no base_size option yet to give the tiny model's 64 px")
    return None


_CLI: dict = {}  # family -> (output folder, {case id: {"rc", "error"}}), or the driver's failure text


def _cli_results(saved, family: str, tmp_root: Path):
    """Run every CLI case of a family in one fresh interpreter (tests/surface_support.py's driver)."""
    if family in _CLI:
        if isinstance(_CLI[family], str):
            pytest.fail(_CLI[family])
        return _CLI[family]
    folder = tmp_root / f"cli-{family}"
    folder.mkdir()
    guidance = call_arguments(family, PRESET).get("guidance_scale")
    jobs = []
    for technique in techniques_for(family):
        if _cli_skip(family, technique):
            continue
        argv = ["generate", "--model", str(saved[family]), "--prompt", PROMPT, "--size", f"{SIZE}x{SIZE}",
                "--seed", str(SEED), "--steps", str(STEPS),
                "--out", str(folder / f"{technique}.png"), "--quiet"]
        if guidance is not None:
            argv += ["--guidance", str(guidance)]
        if technique == PRESET and not (family in PIPELINE_BASE and HAS_BASE_SIZE):
            argv += ["--preset", "auto"]
        else:
            if technique == PRESET:  # Flux with HAS_BASE_SIZE: the preset written out
                options = options_of(AUTOMATIC[family])
            else:
                options = technique_options(family, technique)
            if family in PIPELINE_BASE:  # HAS_BASE_SIZE: the config names the tiny model's base
                options["base_size"] = BASE
            path = folder / f"{technique}.json"
            path.write_text(json.dumps(options))
            argv += ["--config", str(path)]
        if family in TRUE_CFG and technique == "apg":
            argv += ["--true-cfg", "4", "--negative", "blue square"]
        jobs.append({"id": technique, "argv": argv})
    spec = folder / "jobs.json"
    results = folder / "results.json"
    spec.write_text(json.dumps({"jobs": jobs, "results": str(results)}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(REPO / "tests" / "surface_support.py"), str(spec)], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=600)
    outcome = json.loads(results.read_text()) if results.exists() else {}
    if done.returncode != 0 or len(outcome) != len(jobs):
        _CLI[family] = f"the CLI driver of {family} stopped (status {done.returncode}): {done.stderr[-3000:]}"
        pytest.fail(_CLI[family])
    _CLI[family] = (folder, outcome)
    return _CLI[family]


@pytest.fixture(scope="session")
def cli_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("surfaces-cli")


def _as_png_array(image: torch.Tensor) -> np.ndarray:
    """The pipeline's own path from its tensor to the PIL image the CLI saves."""
    from diffusers.image_processor import VaeImageProcessor

    return np.asarray(VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(image))[0])


@pytest.mark.parametrize("family, technique", _cases("cli"))
def test_cli_generate_equals_apply(saved, cli_root, family, technique):
    from PIL import Image

    reason = _cli_skip(family, technique)
    if reason:
        pytest.skip(reason)
    folder, outcome = _cli_results(saved, family, cli_root)
    status = outcome[technique]
    assert status["rc"] == 0, f"hires generate failed: {status['error']}"
    expected = _as_png_array(_reference(saved, family, technique).image)
    channels = tiny_models.IMAGE_CHANNELS.get(family, 3)  # Qwen-Image 2.1's VAE decodes RGBA, which the PNG keeps
    written = np.asarray(Image.open(folder / f"{technique}.png").convert("RGBA" if channels == 4 else "RGB"))
    assert written.shape == expected.shape == (SIZE, SIZE, channels)
    difference = int(np.abs(written.astype(int) - expected.astype(int)).max())
    assert np.array_equal(written, expected), f"the PNG differs from hires.apply's image (max difference {difference})"
    if technique != PRESET:
        record = json.loads(Image.open(folder / f"{technique}.png").text["hires"])
        assert next(iter(technique_options(family, technique))) in record["hires"]


# -- 3. the ready pipelines with every technique off -----------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_ready_pipeline_with_everything_off_equals_plain_diffusers(saved, family):
    ready = _prepare(getattr(hires, READY[family][0]).from_pretrained(saved[family]), family)
    result = _generate(ready, family, PRESET, hires_config=hires.HiresConfig())
    assert hires.is_applied(ready) and result.record is not None
    # as plain diffusers denoises it (HiDreamImagePipeline: at its base area)
    assert (result.record.height, result.record.width) == denoised_size(family, SIZE, SIZE)
    _assert_same_image(result, _reference(saved, family, PRESET, plain=True))


# -- 2. from_pipe siblings sharing a denoiser ------------------------------------------------------------
SIBLING_CONFIGS = {
    PRESET: None,  # structure guidance: the guidance hook and the pipeline-method shadows
    "entropy_scaling": hires.HiresConfig(entropy_scaling=hires.EntropyScalingConfig(enabled=True)),  # processors
}
_LONE: dict = {}  # (family, config name) -> image of one in-memory pipeline; config name None: plain


def _lone(family: str, name: str | None) -> torch.Tensor:
    if (family, name) not in _LONE:
        pipe = _prepare(tiny_models.build(family), family)
        if name is not None:
            config = SIBLING_CONFIGS[name]
            hires.apply(pipe) if config is None else hires.apply(pipe, config)
        _LONE[(family, name)] = _generate(pipe, family, PRESET).image
    return _LONE[(family, name)]


def _denoiser_name(family: str) -> str:
    return "unet" if family in ("sd15", "sd21", "sdxl") else "transformer"


@pytest.mark.parametrize("removed_first", ["first", "second"])
@pytest.mark.parametrize("name", list(SIBLING_CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_from_pipe_siblings_sharing_a_denoiser(family, name, removed_first):
    """Either both siblings run hires and each is plain diffusers again after removal (either order),
    or hires refuses the second with its own clear error and leaves both pipelines working."""
    if name == "entropy_scaling" and family in NO_ATTENTION_REWRITE:
        pytest.skip(f"EntropyScalingConfig does not apply to {family} (refused by validation)")
    config = SIBLING_CONFIGS[name]
    first = _prepare(tiny_models.build(family), family)
    second = _prepare(type(first).from_pipe(first), family)
    denoiser = _denoiser_name(family)
    assert getattr(second, denoiser) is getattr(first, denoiser)
    apply = (lambda pipe: hires.apply(pipe)) if config is None else (lambda pipe: hires.apply(pipe, config))
    expected, plain = _lone(family, name), _lone(family, None)

    apply(first)
    try:
        apply(second)
    except Exception as error:  # noqa: BLE001 - which error it is, is the test
        message = str(error)
        assert "already exists" not in message, f"a raw diffusers error reached the user: {error!r}"
        origin = traceback.extract_tb(error.__traceback__)[-1].filename
        assert Path(origin).resolve().is_relative_to(REPO / "hires"), f"raised outside hires ({origin}): {error!r}"
        assert isinstance(error, (ValueError, RuntimeError)), repr(error)
        assert denoiser in message or type(getattr(first, denoiser)).__name__ in message, message
        assert "remove" in message or "copy" in message, f"the error does not say what to do: {message}"
        # Refused cleanly: the first keeps working, the second is untouched.
        assert not hires.is_applied(second)
        assert torch.equal(_generate(first, family, PRESET).image, expected)
        assert torch.equal(_generate(second, family, PRESET).image, plain)
        hires.remove(first)
        assert torch.equal(_generate(first, family, PRESET).image, plain)
        return

    for pipe in (first, second):
        assert torch.equal(_generate(pipe, family, PRESET).image, expected), "a sibling does not generate with hires"
    gone, kept = (first, second) if removed_first == "first" else (second, first)
    hires.remove(gone)
    assert torch.equal(_generate(gone, family, PRESET).image, plain), "removed, but not plain diffusers again"
    assert torch.equal(_generate(kept, family, PRESET).image, expected), "removing one sibling broke the other"
    hires.remove(kept)
    for pipe in (first, second):
        assert torch.equal(_generate(pipe, family, PRESET).image, plain), "not plain diffusers after removing both"
