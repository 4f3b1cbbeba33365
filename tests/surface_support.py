"""Support of tests/test_surfaces.py: the technique table, the one call every surface makes, and the
command-line driver that runs many `hires generate` commands in one fresh interpreter.

Run as a script (`python tests/surface_support.py JOBS.json`) it is that driver: for each job it
runs the `hires` package's own `__main__` (what `python -m hires generate ...` runs) with the job's
argv, and writes each job's exit status and error text to the file the job list names. One process
per family pays the imports once instead of once per technique.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

from hires.families import FAMILIES, ready_class_name

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle"
BASE = 64  # the tiny models' base side (tiny_models.BASE_LATENT x VAE factor 8)
SIZE = 2 * BASE  # every request: 2x the base side
# Structure guidance: the base stage runs all steps, the 128 px stage round(0.3 * 3) = 1 re-noised step,
# 1 of them guided. Bottleneck: three stages of one step each (it needs at least one step per stage).
STEPS = 3
SEED = 7

# The facts these tables hold are the family records' (hires.families, no torch); every family with a classic
# pipeline class has a tiny model (tiny_models.BUILDERS).
RECORDS = tuple(f for f in FAMILIES if f.pipeline_classes)


def _names(fact) -> tuple[str, ...]:
    return tuple(f.name for f in RECORDS if fact(f))


def _community_file(class_name: str) -> str:
    """The file under pipelines/ that loads the ready class `class_name` (test_pipelines checks its content)."""
    found = [p.name for p in sorted((REPO / "pipelines").glob("*.py"))
             if f"from hires.pipelines import {class_name}\n" in p.read_text(encoding="utf-8")]
    return found[0] if found else f"<no file under pipelines/ imports {class_name}>"


# family -> (ready pipeline class, community-pipeline file under pipelines/)
READY = {f.name: (ready_class_name(f.ready_base_classes[0]),
                  _community_file(ready_class_name(f.ready_base_classes[0]))) for f in RECORDS}
UNETS = _names(lambda f: f.is_unet)
# The DiTs whose positions PositionConfig rescales (ERNIE-Image's, Krea-2's and HiDream-I1's RoPE it does not know;
# Qwen-Image 2.1's text keys are cached after RoPE).
DITS = _names(lambda f: not f.is_unet and f.positions_unsupported is None)
# Pipelines that hard-code their base (default_sample_size 128: 1024 px) where the tiny models' is 64 px:
# a copy loaded from disk needs the tiny model's 64 px base set on it (or given as HiresConfig.base_size).
PIPELINE_BASE = _names(lambda f: f.base_size_source[0] == "pipeline")
FIXED_BASE = PIPELINE_BASE  # fam-flux2's name for the same set
# Families whose pipeline never runs classifier-free guidance (APG does not apply).
NO_CFG = _names(lambda f: not f.runs_cfg)
# Families that run CFG only as true CFG: APG needs true_cfg_scale and a negative prompt.
TRUE_CFG = _names(lambda f: f.guidance_scale_name == "true_cfg_scale")
# Families whose VAE hires cannot tile (VAETilingConfig and MemoryConfig refuse them).
UNTILEABLE_VAE = _names(lambda f: f.vae.untileable is not None)
# Families whose attention hires cannot rewrite (EntropyScalingConfig and WindowAttentionConfig refuse them).
NO_ATTENTION_REWRITE = _names(lambda f: f.attention_unsupported is not None)
# Families whose pipeline passes an attention mask (ScaleFusionConfig and DilatedSamplingConfig refuse them).
MASKED_ATTENTION = _names(lambda f: f.attention_masked is not None)
# Families whose blocks have no diffusers feed-forward chunking (MemoryConfig refuses feed_forward_chunks=2 there).
NO_FEED_FORWARD_CHUNKS = ("flux", "flux2", "flux2_klein", "chroma", "zimage", "ernie_image", "hidream")
# Families whose pipeline rescales every request to its base area (HiDreamImagePipeline): plain diffusers
# denoises a size above it only with its default_sample_size set to that size (`plain_at`).
RESCALES_TO_BASE_AREA = _names(lambda f: f.resizes_to_base_area)
PRESET = "preset"  # hires.apply(pipe) without a config / no hires_config / --preset auto

# Options per family that make PositionConfig change the computation at 2x (its defaults do not for
# PixArt-Sigma and SD3 at 2x: PixArt's sin-cos positions stay the model's own, and SD3's 8x8 token
# grid is inside its 12x12 table). The RoPE families take its defaults (Flux: YaRN RoPE and the clamped
# timestep shift).
_POSITIONS = {
    "pixart": {"enabled": True, "interpolation_scale": 2.0},
    "sd3": {"enabled": True, "timestep_shift": "static", "shift": 6.0},
}


def technique_options(family: str, technique: str) -> dict:
    """The HiresConfig of a technique as the JSON mapping a `--config` file holds."""
    if technique == "structure_guidance_latent":
        return {"structure_guidance": {"enabled": True, "space": "latent"}}
    if technique == "structure_guidance_pixel":
        return {"structure_guidance": {"enabled": True, "space": "pixel"}}
    if technique == "structure_guidance_respaced":  # renoise's 3 steps respaced to 2 (the few-step floor)
        return {"structure_guidance": {"enabled": True, "space": "latent", "renoise": 1.0, "step_fraction": 0.3}}
    if technique == "positions":
        return {"positions": dict(_POSITIONS.get(family, {"enabled": True}))}
    if technique == "flow_alignment":  # HiFlow's guidance acts in structure guidance's upscaled stages
        return {"flow_alignment": {"enabled": True}, "structure_guidance": {"enabled": True, "space": "latent"}}
    if technique == "dype":  # PositionConfig's timestep-dependent RoPE extrapolation
        return {"positions": {"enabled": True, "timestep_dependent": True}}
    if technique == "vae_tiling":  # 16x16 latent in tiles of 8: four tiles (mode "auto" would not tile at 128 px)
        return {"vae_tiling": {"enabled": True, "mode": "always", "tile_size": 8}}
    if technique == "memory":
        # A fixed budget: the planner does not measure this machine. Flux's and Z-Image's blocks have no
        # diffusers feed-forward chunking (MemoryConfig refuses feed_forward_chunks=2 there).
        options = {"enabled": True, "max_memory": "64GiB"}
        if family not in NO_FEED_FORWARD_CHUNKS:
            options["feed_forward_chunks"] = 2
        return {"memory": options}
    if technique == "memory_staged":  # the automatic preset's kind of call, planned whole before its base stage
        return {"memory": {"enabled": True, "max_memory": "64GiB"},
                "structure_guidance": {"enabled": True, "space": "latent",
                                       "upscale_space": "pixel", "ladder": "doubling"}}
    if technique == "attention_backend":
        return {"attention_backend": {"enabled": True, "backend": "native"}}
    if technique == "rau_net" and family == "sdxl":
        # The tiny SDXL UNet has two levels: its deepest block has no downsampler for SDXL's own
        # (down_blocks.1.downsamplers.0), so the strided one is the first level's.
        return {"rau_net": {"enabled": True, "downsampler": "down_blocks.0.downsamplers.0"}}
    if technique == "dilated_sampling_local":  # the local windows (MultiDiffusion) beside the sub-lattices
        return {"dilated_sampling": {"enabled": True, "local_windows": True}}
    if technique == "skip_residual":  # all 3 steps re-run at 128 px, so two steps get blended
        return {"skip_residual": {"enabled": True},
                "structure_guidance": {"enabled": True, "space": "latent", "renoise": 1.0}}
    return {technique: {"enabled": True}}


def techniques_for(family: str) -> list[str]:
    """Every technique that applies to `family` (test_surfaces checks this against validate_for)."""
    names = ["structure_guidance_latent", "structure_guidance_pixel", "structure_guidance_respaced", "bottleneck"]
    if _family_record(family).prediction_source == "flow":
        names.append("flow_alignment")
    if family in UNETS:
        names += ["redilation", "rau_net"]
    if family not in NO_ATTENTION_REWRITE:
        names += ["entropy_scaling", "window_attention"]
        if family not in MASKED_ATTENTION:
            names.append("scale_fusion")
    names.append("attention_backend")
    if family not in NO_CFG:
        names.append("apg")
    if family in DITS:
        names.append("positions")
    if family in DITS and _family_record(family).position_encoding == "rope":
        names.append("dype")
    names.append("skip_residual")
    record = _family_record(family)
    if record.layout.sub_grids_refused is None and family not in MASKED_ATTENTION:
        names += ["dilated_sampling", "dilated_sampling_local"]
    if family not in UNTILEABLE_VAE:
        names += ["vae_tiling", "memory", "memory_staged"]
    names.append(PRESET)
    return names


def plain_at(pipe, family: str, height: int, width: int):
    """`pipe` (plain diffusers) set to denoise height x width as asked where its pipeline would rescale the request
    to its base area: the plain computation a technique that changes nothing must equal."""
    if family in RESCALES_TO_BASE_AREA:  # a hair above the request's area, so the pipeline's floor keeps it
        pipe.default_sample_size = math.sqrt(height * width) * (1 + 1e-9) / pipe.vae_scale_factor
    return pipe


def denoised_size(family: str, height: int, width: int, base: int = BASE) -> tuple[int, int]:
    """The size a plain pipeline of `family` denoises for a height x width request: HiDreamImagePipeline
    rescales it to its base area, sides floored to 16, as its __call__ computes it."""
    if family not in RESCALES_TO_BASE_AREA:
        return height, width
    scale = math.sqrt(base * base / (width * height))
    return int(height * scale // 16 * 16), int(width * scale // 16 * 16)


def _family_record(family: str):
    return next(f for f in FAMILIES if f.name == family)


def call_arguments(family: str, technique: str) -> dict:
    """What each surface passes besides prompt, size, steps, generator and output_type: exactly the
    call `hires generate --guidance G` makes (hires/cli.py Renderer.render), plus what the tiny models
    needs for a technique (the same options on the CLI's side)."""
    import tiny_models

    # Qwen-Image has no distilled guidance: its calls (and the CLI's) pass no guidance_scale.
    arguments = {k: v for k, v in tiny_models.CALL_KWARGS[family].items() if k == "guidance_scale"}
    if family == "pixart":
        arguments["use_resolution_binning"] = False  # the CLI renders the size asked for
    if family in TRUE_CFG and technique == "apg":
        # Flux runs CFG only as true CFG: `hires generate --true-cfg 4 --negative "blue square"`.
        arguments.update(true_cfg_scale=4.0, negative_prompt="blue square")
    return arguments


def options_of(config) -> dict:
    """A HiresConfig as the shortest `--config` mapping: its enabled techniques' non-default options."""
    options = {}
    for field in dataclasses.fields(config):
        sub = getattr(config, field.name)
        if getattr(sub, "enabled", False):
            default = type(sub)()
            options[field.name] = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub)
                                   if getattr(sub, f.name) != getattr(default, f.name)}
    return options


def has_base_size_option() -> bool:
    import hires

    return "base_size" in {f.name for f in dataclasses.fields(hires.HiresConfig)}


# -- the command-line driver ----------------------------------------------------------------------
def run_jobs(path: str) -> None:
    import contextlib
    import io
    import runpy
    import traceback

    spec = json.loads(Path(path).read_text())
    results = {}
    for job in spec["jobs"]:
        stderr = io.StringIO()
        sys.argv = ["hires", *job["argv"]]
        code, error = 0, ""
        try:
            with contextlib.redirect_stderr(stderr):
                runpy.run_module("hires", run_name="__main__", alter_sys=False)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - an uncaught error is what the test reports
            code, error = 1, traceback.format_exc()
        error = (error or stderr.getvalue()).strip()
        results[job["id"]] = {"rc": code, "error": error[-3000:]}
        Path(spec["results"]).write_text(json.dumps(results))  # partial results survive a crash


if __name__ == "__main__":
    run_jobs(sys.argv[1])
