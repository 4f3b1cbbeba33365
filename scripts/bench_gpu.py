"""Seconds per image and peak memory of real-size SDXL and FLUX.1-dev at 2K-8K, next to the planner.

    python scripts/bench_gpu.py                                   # CUDA: both models, 2048/4096/8192 px
    python scripts/bench_gpu.py --quick --sizes 2048 4096          # fewer steps, one run
    python scripts/bench_gpu.py --device cpu --smoke --out /tmp/b.md   # tiny models at 64/128 px

Models are built from public config values (scripts/benchmarks/common.py, planner.py,
_vae_rss_worker.py) on the meta device and materialised with random weights on the device: no
download. Text encoders are left out; random prompt embeddings of the real shapes are passed as
`prompt_embeds` / `pooled_prompt_embeds`. For each model and size four rows are measured, interleaved
round by round: plain diffusers ("direct"), `hires.apply(pipe)` (the automatic preset), the preset
with window attention, and `HiresConfig()` (everything off; its time over direct is the plugin's own
overhead, ≈1.00×). Seconds are wall-clock around each call with the device synchronised, one warm-up
call per row excluded, median of `--runs`; peak is `torch.cuda.max_memory_allocated()` reset before
each call (max over runs); the planner column is `hires.techniques.memory.estimate.plan(...)` for the same size.
A call that runs out of memory is an "OOM" row (another torch error: an "error: ..." row); direct and
everything-off calls the planner says cannot fit are skipped.

`--smoke` runs this same code at tiny scale (tests/tiny_models.py's configs, 64/128 px, 2 steps):
tests/test_bench_gpu.py runs it on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts", ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import hires  # noqa: E402
from hires.techniques.memory import estimate as memory_planner  # noqa: E402

MODELS = ("sdxl", "flux")
GPU_SIZES = (2048, 4096, 8192)
SMOKE_SIZES = (64, 128)
DEFAULT_STEPS = {"sdxl": 50, "flux": 28}
QUICK_STEPS = 12  # above 8, where structure guidance switches to its few-step schedule: the same preset as 50 steps
SMOKE_STEPS = 2
GUIDANCE = {"sdxl": 5.0, "flux": 3.5}  # SDXL: batched CFG; Flux.1-dev: distilled guidance, no true CFG
ROWS = ("direct", "preset", "preset without windows", "everything off")


# -- building pipelines: one function, two scales ---------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Architecture:
    """Denoiser and VAE on the meta device, the scheduler, and what the prompt embeddings look like."""

    denoiser: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    text_tokens: int
    default_sample_size: int | None  # FluxPipeline's latent base side; None: the pipeline's own


def _scheduler(model: str):
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    # Public scheduler_config.json values of stabilityai/stable-diffusion-xl-base-1.0 and FLUX.1-dev.
    if model == "sdxl":
        return EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                      steps_offset=1, timestep_spacing="leading")
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                           max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


def architecture(model: str, scale: str) -> Architecture:
    """`scale` "real": SDXL base / FLUX.1-dev from public config values; "tiny": tests/tiny_models.py."""
    if scale == "real":
        from benchmarks.planner import real_size_models

        denoiser, vae = real_size_models(model)  # meta device
        return Architecture(denoiser, vae, _scheduler(model), text_tokens=77 if model == "sdxl" else 512,
                            default_sample_size=None)
    import tiny_models

    tiny = tiny_models.build(model)
    denoiser = tiny.unet if model == "sdxl" else tiny.transformer
    return Architecture(memory_planner.meta_copy(denoiser, torch.float32),
                        memory_planner.meta_copy(tiny.vae, torch.float32),
                        tiny.scheduler, text_tokens=tiny_models.TEXT_LEN,
                        default_sample_size=getattr(tiny, "default_sample_size", None) if model == "flux" else None)


NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


@torch.no_grad()
def randomise(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Allocate a meta-device module on `device` in `dtype` and fill it with random weights of a
    trained model's magnitude (matrices N(0, 1/fan_in), norm scales 1, biases 0): finite outputs of
    the right size, and no full-precision copy or initialiser pass on the way."""
    module = torch.nn.Module.to(module, dtype).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    for sub in module.modules():
        for name, parameter in sub.named_parameters(recurse=False):
            if parameter.ndim >= 2:
                fan_in = parameter[0].numel()
                parameter.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
            elif name == "weight" and (isinstance(sub, NORMS) or "norm" in type(sub).__name__.lower()):
                parameter.fill_(1.0)
            else:
                parameter.zero_()
    return module.requires_grad_(False).eval()


def build_pipeline(model: str, scale: str, device: torch.device, dtype: torch.dtype):
    """A real diffusers pipeline (StableDiffusionXLPipeline / FluxPipeline) without text encoders."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    arch = architecture(model, scale)
    denoiser, vae = randomise(arch.denoiser, device, dtype, seed=0), randomise(arch.vae, device, dtype, seed=1)
    if model == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None,
                                         tokenizer=None, tokenizer_2=None,
                                         unet=denoiser, scheduler=arch.scheduler, force_zeros_for_empty_prompt=True)
    else:
        pipe = FluxPipeline(scheduler=arch.scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=denoiser)
        if arch.default_sample_size is not None:
            pipe.default_sample_size = arch.default_sample_size
    pipe.set_progress_bar_config(disable=True)
    return pipe, arch.text_tokens


def prompt_embeddings(config, model: str, text_tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Random prompt embeddings of the shapes the denoiser (`config`: its config) takes from the real
    text encoders (CLIP-L + bigG for SDXL, T5-XXL + CLIP-L pooled for Flux), as call arguments."""
    generator = torch.Generator("cpu").manual_seed(2)

    def embedding(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    if model == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return dict(prompt_embeds=embedding(1, text_tokens, config.cross_attention_dim),
                    pooled_prompt_embeds=embedding(1, pooled),
                    negative_prompt_embeds=embedding(1, text_tokens, config.cross_attention_dim),
                    negative_pooled_prompt_embeds=embedding(1, pooled))
    return dict(prompt_embeds=embedding(1, text_tokens, config.joint_attention_dim),
                pooled_prompt_embeds=embedding(1, config.pooled_projection_dim), max_sequence_length=text_tokens)


# -- the rows ---------------------------------------------------------------------------------------
def row_configs(pipe) -> dict[str, hires.HiresConfig | None]:
    """Each row's config; None: plain diffusers (hires removed)."""
    preset = hires.presets.automatic_config(hires.model_info(pipe))  # windows are part of it
    windows_off = dataclasses.replace(preset.window_attention, enabled=False)
    global_attention = dataclasses.replace(preset, window_attention=windows_off)
    return {"direct": None, "preset": preset, "preset without windows": global_attention,
            "everything off": hires.HiresConfig()}


def configure(pipe, config: hires.HiresConfig | None) -> None:
    if config is None:
        hires.remove(pipe)
    else:
        hires.apply(pipe, config)


def generate(pipe, call: dict, side: int, steps: int):
    """One image; the function every timed call goes through."""
    return pipe(height=side, width=side, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0),
                output_type="pt", **call).images


def plain_prediction(pipe, model: str, side: int, budget: int) -> tuple[memory_planner.MemoryPlan, bool]:
    """The planner's estimate for a plain call at `side` (untiled VAE, no chunking, batched CFG), and
    whether it fits `budget`. Planned against an unlimited budget so the estimate comes back either way."""
    denoiser = pipe.unet if model == "sdxl" else pipe.transformer
    parameter = next(denoiser.parameters())
    estimate = memory_planner.plan(
        denoiser, pipe.vae, height=side, width=side, latent_factor=pipe.vae_scale_factor, dtype=parameter.dtype,
        cfg=model == "sdxl", budget=2**62, weights=memory_planner.pipeline_weights(pipe, parameter.device),
        tile_vae=False, feed_forward_chunks=1, sequential_cfg=False, name=model, device_type=parameter.device.type)
    return estimate, estimate.peak <= budget


@dataclasses.dataclass
class Measurement:
    row: str
    seconds: list[float] = dataclasses.field(default_factory=list)
    peak: int | None = None  # bytes; None where the device keeps no count (CPU)
    note: str = ""  # "OOM", or why the row was skipped

    @property
    def ran(self) -> bool:
        return not self.note and bool(self.seconds)


def out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(
        sign in str(error).lower() for sign in ("out of memory", "alloc_failed"))  # cuDNN / cuBLAS workspaces


def failure_note(error: RuntimeError) -> str:
    """A row's note for a call that raised a torch error: "OOM", or the error's first line (e.g. a kernel's
    size limit at 8192²), so one failing row does not end a run of hours."""
    if out_of_memory(error):
        return "OOM"
    traceback.print_exception(error, file=sys.stderr)
    first = (str(error).strip().splitlines() or [""])[0][:160].replace("|", "/")
    return f"error: {type(error).__name__}: {first}"


def measure_size(pipe, model: str, call: dict, side: int, steps: int, runs: int, budget: int,
                 call_fn: Callable = generate,
                 device: torch.device | None = None) -> tuple[list[Measurement], memory_planner.MemoryPlan]:
    """The four rows at one size: one warm-up call each, then `runs` rounds, rows interleaved."""
    device = device or next((pipe.unet if model == "sdxl" else pipe.transformer).parameters()).device
    cuda = device.type == "cuda"
    estimate, fits = plain_prediction(pipe, model, side, budget)
    configs = row_configs(pipe)
    rows = {name: Measurement(name) for name in configs}
    if not fits:
        note = (f"skipped: planner predicts {memory_planner.format_bytes(estimate.peak)} > budget "
                f"{memory_planner.format_bytes(budget)}")
        rows["direct"].note = rows["everything off"].note = note

    def timed(name: str, record: bool) -> None:
        configure(pipe, configs[name])
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        try:
            images = call_fn(pipe, call, side, steps)
            del images
            if cuda:
                torch.cuda.synchronize(device)
        except RuntimeError as error:  # torch.OutOfMemoryError is one; other exceptions are bugs and end the run
            rows[name].note = failure_note(error)
            # the failed call's tensors live on in the traceback's frames until collected
            del error
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            return
        finally:
            hires.remove(pipe)
        seconds = time.perf_counter() - start
        if record:
            rows[name].seconds.append(seconds)
            if cuda:
                rows[name].peak = max(rows[name].peak or 0, torch.cuda.max_memory_allocated(device))

    for record in [False] + [True] * runs:
        for name in configs:
            if not rows[name].note:
                timed(name, record)
    return list(rows.values()), estimate


# -- the report -------------------------------------------------------------------------------------
def gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f}"


def table_rows(model: str, side: int, steps: int, measurements: list[Measurement],
               estimate: memory_planner.MemoryPlan) -> list[list[str]]:
    direct = next(m for m in measurements if m.row == "direct")
    rows = []
    for m in measurements:
        median = statistics.median(m.seconds) if m.ran else None
        ratio = f"{median / statistics.median(direct.seconds):.2f}×" if m.ran and direct.ran else "n/a"
        rows.append([model, f"{side}²", m.row, str(steps), m.note or f"{median:.3f}", ratio,
                     gib(m.peak) if m.ran else "n/a", gib(estimate.peak)])
    return rows


HEADER = ["model", "size", "row", "steps", "s/image (median)", "× direct", "peak GiB (measured)",
          "peak GiB (planner, plain call)"]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def machine(device: torch.device) -> str:
    import diffusers

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}"
    return (f"{platform.node()}: {where}; python {platform.python_version()}, torch {torch.__version__}, "
            f"diffusers {diffusers.__version__}, hires {hires.__version__}")


def report(options, device: torch.device, dtype: torch.dtype, rows: list[list[str]], budgets: dict[str, int]) -> str:
    scale = "tiny models from tests/tiny_models.py (smoke run: plumbing, not performance)" if options.smoke else \
        "real-size SDXL base 1.0 UNet + VAE and FLUX.1-dev transformer + VAE (public configs), random weights"
    budget = "; ".join(f"{m} {memory_planner.format_bytes(b)}" for m, b in budgets.items())
    return (f"# hires GPU benchmark\n\n"
            f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  \n"
            f"Machine: {machine(device)}  \n"
            f"Models: {scale}; {str(dtype).removeprefix('torch.')}, batch 1, text encoders left out (random "
            f"prompt embeddings of the real shapes). SDXL guidance "
            f"5 (batched CFG), Flux guidance 3.5 (no true CFG).  \n"
            f"Timing: {'CUDA-synchronised ' if device.type == 'cuda' else ''}wall clock per call, one warm-up call "
            f"per row excluded, median of {options.runs} run(s), rows interleaved round by round.  \n"
            f"Rows: direct = plain diffusers; preset = `hires.apply(pipe)` "
            f"(window attention included); preset without "
            f"windows = the preset with `WindowAttentionConfig(enabled=False)`; "
            f"everything off = `hires.apply(pipe, HiresConfig())` (its × direct "
            f"is the plugin's own overhead).  \n"
            f"Peak: `torch.cuda.max_memory_allocated()` after "
            f"`reset_peak_memory_stats()`, max over runs (n/a on CPU). "
            f"Planner: `hires.techniques.memory.estimate.plan(...)` "
            f"for a plain call at that size (untiled VAE, no chunking, "
            f"batched CFG; weights + max(one denoiser forward, one decode)); direct and everything off are skipped "
            f"where it exceeds the budget ({budget}).\n\n"
            + markdown_table(rows))


# -- command line -----------------------------------------------------------------------------------
def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny models at 64/128 px, 2 steps (the tested CPU path)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help=f"square sides in pixels (default {' '.join(map(str, GPU_SIZES))}; smoke "
                             f"{' '.join(map(str, SMOKE_SIZES))})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"denoising steps (default SDXL {DEFAULT_STEPS['sdxl']}, Flux {DEFAULT_STEPS['flux']}; "
                             f"--quick {QUICK_STEPS}; --smoke {SMOKE_STEPS})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps and one run")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed runs per row after the warm-up (default 3; --quick 1)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--budget", default=None,
                        help="memory the planner may plan for, e.g. 80GiB (default: the device's free memory "
                             "after loading the model, plus its weights)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench_gpu.md"))
    options = parser.parse_args(argv)
    if options.device not in ("cuda", "cpu") and not options.device.startswith("cuda:"):
        parser.error(f"--device {options.device}: use cuda, cuda:N or cpu")
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {options.device}: torch sees no CUDA device here; use --device cpu --smoke")
    if options.device == "cpu" and not options.smoke:
        parser.error("--device cpu runs only the tiny smoke path: add --smoke (real-size models need a GPU)")
    for name in ("steps", "runs"):
        value = getattr(options, name)
        if value is not None and value < 1:
            parser.error(f"--{name} {value}: must be at least 1")
    options.sizes = options.sizes or list(SMOKE_SIZES if options.smoke else GPU_SIZES)
    bad = [s for s in options.sizes if s <= 0 or s % 16]
    if bad:
        parser.error(f"--sizes {' '.join(map(str, bad))}: sides must be positive multiples of 16 px")
    options.runs = options.runs or (1 if options.quick or options.smoke else 3)
    if options.budget is not None:
        options.budget = hires.config.parse_bytes(options.budget, "--budget")
    return options


def steps_for(options, model: str) -> int:
    if options.steps:
        return options.steps
    return SMOKE_STEPS if options.smoke else QUICK_STEPS if options.quick else DEFAULT_STEPS[model]


def main(argv=None, call_fn: Callable = generate) -> int:
    options = parse(argv)
    device = torch.device(options.device)
    dtype = getattr(torch, options.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    scale = "tiny" if options.smoke else "real"
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, budgets = [], {}
    for model in options.models:
        start = time.perf_counter()
        pipe, text_tokens = build_pipeline(model, scale, device, dtype)
        denoiser = pipe.unet if model == "sdxl" else pipe.transformer
        call = dict(prompt_embeddings(denoiser.config, model, text_tokens, device, dtype),
                    guidance_scale=GUIDANCE[model])
        weights = memory_planner.pipeline_weights(pipe, device)
        budgets[model] = options.budget or memory_planner.detect_budget(device) + weights
        print(f"[bench_gpu] {model}: built in {time.perf_counter() - start:.1f} s, weights "
              f"{memory_planner.format_bytes(weights)}", file=sys.stderr)
        for side in options.sizes:
            start = time.perf_counter()
            steps = steps_for(options, model)
            measurements, estimate = measure_size(pipe, model, call, side, steps, options.runs, budgets[model],
                                                  call_fn=call_fn, device=device)
            rows += table_rows(model, side, steps, measurements, estimate)
            out.write_text(report(options, device, dtype, rows, budgets))  # after every size: a crash keeps the rest
            print(f"[bench_gpu] {model} {side}²: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        del pipe, denoiser, call
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
