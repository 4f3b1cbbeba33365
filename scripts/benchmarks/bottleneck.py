"""Bottleneck sampling: denoiser FLOPs of high-low-high stages against full-size sampling at the same step
count, on real-size Flux.1-dev and SDXL architectures built on the meta device (public configs from
benchmarks/attention.py), counted with torch.utils.flop_counter.FlopCounterMode. The stage sizes and
step counts come from hires.techniques.bottleneck.slices.plan_stages, the code a real call runs."""

from __future__ import annotations

import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.attention import _flux_inputs, _sdxl_inputs
from benchmarks.common import FLUX_DEV, FULL_SIZE_UNETS, Table, fmt

# (label, config options, steps): the default, Pruna's 10/60/30 layout, RALU's reproduced Flux 5x
# boundaries [4, 16, 21] (stages of 4, 12 and 5 steps).
SCHEDULES = (
    ("default 10/70/20", {}, None),
    ("Pruna 10/60/30", {"step_fractions": (0.1, 0.6, 0.3)}, None),
    ("RALU Flux 5x [4,16,21]", {"step_fractions": (4 / 21, 12 / 21, 5 / 21)}, 21),
)
MODELS = {  # family, steps of a usual call, sizes
    "Flux.1-dev": ("flux", 28, (1024, 2048)),
    "SDXL": ("sdxl", 50, (1024, 2048)),
}


def _info(family_name: str):
    from hires.families import FAMILIES, ModelInfo

    record = next(f for f in FAMILIES if f.name == family_name)
    patch, prediction = (2, "flow") if family_name == "flux" else (1, "epsilon")
    return ModelInfo(family=record, base_height=1024, base_width=1024, latent_factor=8, patch_size=patch,
                     prediction_type=prediction)


@functools.lru_cache(maxsize=None)
def _model(family_name: str):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    with torch.device("meta"):
        if family_name == "flux":
            return FluxTransformer2DModel(**FLUX_DEV)
        return UNet2DConditionModel(**FULL_SIZE_UNETS["sdxl"])


@functools.lru_cache(maxsize=None)
def step_flops(family_name: str, height: int, width: int) -> int:
    """One denoiser forward (batch 1) at height x width pixels."""
    if height != width:
        raise ValueError("square sizes only")
    inputs = _flux_inputs(height) if family_name == "flux" else _sdxl_inputs(height)
    with FlopCounterMode(display=False) as counter:
        _model(family_name)(**inputs)
    return counter.get_total_flops()


def run_flops(family_name: str, size: int, steps: int, options: dict) -> tuple[int, list]:
    from hires.config import BottleneckConfig
    from hires.techniques.bottleneck.slices import plan_stages

    plan = plan_stages(_info(family_name), BottleneckConfig(enabled=True, **options), size, size, steps)
    return sum(stage.steps * step_flops(family_name, stage.height, stage.width) for stage in plan), plan


def flops_table() -> Table:
    rows = []
    for model, (family_name, usual_steps, sizes) in MODELS.items():
        for size in sizes:
            for label, options, steps in SCHEDULES:
                steps = steps or usual_steps
                full = steps * step_flops(family_name, size, size)
                ours, plan = run_flops(family_name, size, steps, options)
                layout = " / ".join(f"{s.steps}@{s.height}" for s in plan)
                rows.append([model, f"{size}²", label, str(steps), layout, f"{full / 1e12:.1f}", f"{ours / 1e12:.1f}",
                             fmt(full / ours, 2)])
    return Table(
        title="Bottleneck sampling: denoiser FLOPs vs full-size sampling (real-size architectures, meta device)",
        what="FlopCounterMode totals of denoiser forwards (batch 1; CFG doubles both sides alike) summed over each "
             "stage's steps; full size runs the same step count at the requested size. Counted once "
             "(deterministic), no weights.",
        header=["model", "size", "schedule", "steps", "steps@side per stage", "full TFLOPs", "bottleneck TFLOPs",
                "full / bottleneck"],
        rows=rows,
    )


def run(options) -> list[Table]:
    return [flops_table()]
