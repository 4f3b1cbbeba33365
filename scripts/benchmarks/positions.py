"""Positional extrapolation: Flux's timestep schedule under each shift policy, and what the position
hooks cost at real sizes (Flux's RoPE module, SD3's extended table) against diffusers' own modules.

The schedule table is arithmetic through diffusers' own scheduler; the timings run the real-size
position modules (Flux: axes (16, 56, 56), theta 10000; SD3-Medium: 1536 channels, 192-patch table)
on random ids / the sin-cos table, plain and through the hires hook, interleaved.
"""

from __future__ import annotations

import types

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.hooks import HookRegistry
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from hires.config import PositionConfig
from hires.families import FAMILIES
from hires.sampling import schedules
from hires.techniques.positions import encodings as P

from .common import Table, fmt, interleaved_times, ratio

FLUX_SCHEDULER = dict(use_dynamic_shifting=True, base_image_seq_len=256,
                      max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
FLUX_STEPS = 28
BASE_PX = 1024


def _schedule_table() -> Table:
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    base_mu = schedules.scheduler_shift_mu(scheduler.config, (BASE_PX // 16) ** 2)
    sigmas = np.linspace(1.0, 1 / FLUX_STEPS, FLUX_STEPS)
    rows = []
    for px in (1024, 2048, 3072, 4096, 8192):
        tokens = (px // 16) ** 2
        mu = schedules.scheduler_shift_mu(scheduler.config, tokens)
        row = [str(px), str(tokens), fmt(mu, 2)]
        for applied in (mu, min(mu, base_mu), schedules.mu_for_shift(6.0, "exponential")):
            scheduler.set_timesteps(sigmas=sigmas, mu=applied)
            schedule = scheduler.sigmas[:-1]
            row += [fmt(float(schedule[-1]), 3), str(int((schedule > 0.9).sum()))]
        rows.append(row)
    return Table(
        title="Flux timestep schedule by shift policy (28 steps)",
        what=f"FlowMatchEulerDiscreteScheduler with Flux's config; mu from the token count; last sigma before 0 "
             f"and how many of the {FLUX_STEPS} steps sit above sigma 0.9. dynamic: diffusers; clamp: mu capped at "
             f"its 1024 px value ({base_mu:.2f}, hires' default); static: shift 6 (I-Max's high-res pass).",
        header=["px", "tokens", "dynamic mu", "dynamic last sigma", "dynamic steps > 0.9", "clamp last sigma",
                "clamp steps > 0.9", "static 6 last sigma", "static 6 steps > 0.9"],
        rows=rows,
    )


def _fake_attachment(scale: float):
    """What the position hooks read from an attachment, for a call at `scale` times the 1024 px base."""
    info = types.SimpleNamespace(size_multiple=16, token_side=16, base_height=BASE_PX, base_width=BASE_PX,
                                 family=next(f for f in FAMILIES if f.name == "flux"))
    state = _State(scale_height=scale, scale_width=scale, log={}, slots={})
    return types.SimpleNamespace(info=info, state=state)


class _State(types.SimpleNamespace):
    """The parts of hires.runtime.CallState the position hooks use."""

    def slot(self, kind):
        return self.slots.setdefault(kind, kind())


def _flux_ids(px: int) -> torch.Tensor:
    grid = px // 16
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return torch.cat([torch.zeros(512, 3), image])


def _rope_table(runs: int) -> Table:
    rows = []
    for px in (2048, 4096):
        ids = _flux_ids(px)
        plain = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])
        functions = {"plain": lambda: plain(ids)}
        for method in ("interpolation", "ntk", "yarn"):
            module = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])
            settings = P.resolve(PositionConfig(enabled=True, rope=method),
                                 types.SimpleNamespace(family=types.SimpleNamespace(position_encoding="rope"),
                                                       prediction_type="flow", name="flux"))
            attachment = _fake_attachment(px / BASE_PX)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(
                P._RopeHook(attachment, settings), P.HOOK + ".rope")
            # first step of a call (nothing cached yet); later steps reuse the call's tables
            functions[method] = (lambda m, a: lambda: (a.state.slots.clear(), m(ids)))(module, attachment)
            if method == "yarn":
                functions["yarn, later steps"] = (lambda m: lambda: m(ids))(module)
        times = interleaved_times(functions, runs)
        plain_ms = 1000 * sorted(times["plain"])[len(times["plain"]) // 2]
        rows.append([str(px), str(len(ids)), fmt(plain_ms, 1)]
                    + [fmt(ratio(times, m, "plain"),
                           2) for m in ("interpolation", "ntk", "yarn", "yarn, later steps")])
    return Table(
        title="Flux RoPE module: hires options vs diffusers (once per denoiser call)",
        what=f"FluxPosEmbed(axes (16, 56, 56)) on 512 text + (px/16)^2 image ids, CPU, {runs} interleaved rounds; "
             "ratio of median times to plain (first step of a call; later steps reuse the call's tables).",
        header=["px", "ids", "plain ms", "interpolation / plain",
                "ntk / plain", "yarn / plain", "yarn later steps / plain"],
        rows=rows,
    )


def _sd3_table(runs: int) -> Table:
    torch.manual_seed(0)
    embed = PatchEmbed(height=128, width=128, patch_size=2, in_channels=16, embed_dim=1536, pos_embed_max_size=192)
    side, dim = 192, 1536
    functions = {
        "plain crop 3072 px": lambda: embed.cropped_pos_embed(384, 384),
        "interpolate 4096 px": lambda: P.interpolate_table(embed.pos_embed, side, 256, 256),
        "extrapolate 4096 px": lambda: P.extrapolate_table(dim, side, embed.base_size,
                                                           embed.interpolation_scale, 256, 256),
    }
    times = interleaved_times(functions, runs)
    rows = [[name, fmt(1000 * sorted(t)[len(t) // 2], 1)] for name, t in times.items()]
    return Table(
        title="SD3 positional table past pos_embed_max_size (built once per call, then reused every step)",
        what=f"SD3-Medium-size PatchEmbed (1536 channels, 192-patch table), CPU, {runs} interleaved rounds; "
             "median ms to build the table for one call.",
        header=["table", "median ms"],
        rows=rows,
    )


def run(options) -> list[Table]:
    runs = max(1, min(options.runs, 5))
    return [_schedule_table(), _rope_table(runs), _sd3_table(runs)]
