"""scripts/bench_gpu.py: its CPU smoke path (the same code as the GPU run, on the tiny models)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_gpu  # noqa: E402

import hires  # noqa: E402
from hires.presets import AUTOMATIC  # noqa: E402

COLUMNS = {name: i for i, name in enumerate(bench_gpu.HEADER)}


def table(text: str) -> list[list[str]]:
    """The body rows of the report's Markdown table."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0] == "| " + " | ".join(bench_gpu.HEADER) + " |"
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def by_key(rows):
    keyed = {}
    for row in rows:
        key = (row[COLUMNS["model"]], row[COLUMNS["size"]], row[COLUMNS["row"]])
        assert key not in keyed, f"row {key} appears twice"
        keyed[key] = row
    return keyed


def test_smoke_run_writes_every_row_with_numeric_seconds(tmp_path):
    from hires.techniques.structure_guidance import guidance as progressive

    calls = set()  # (model's denoiser class, side, techniques on, stage sides) of every call

    def recording(pipe, call, side, steps):
        images = bench_gpu.generate(pipe, call, side, steps)
        attachment = hires.runtime.get_attachment(pipe)
        techniques = None if attachment is None else tuple(attachment.config.enabled_techniques())
        stages = progressive.last_run(pipe) if techniques and "structure_guidance" in techniques else None
        calls.add((type(pipe).__name__, side, techniques, tuple(s.width for s in stages or ())))
        return images

    out = tmp_path / "bench_gpu.md"
    assert bench_gpu.main(["--device", "cpu", "--smoke", "--out", str(out)], call_fn=recording) == 0
    # the rows ran what they say: plain, everything off, the preset (staged above the 64 px base, with windows) and
    # the preset without windows
    for pipeline, family in (("StableDiffusionXLPipeline", "sdxl"), ("FluxPipeline", "flux")):
        preset = tuple(AUTOMATIC[family].enabled_techniques())  # Flux's includes its positions
        assert "window_attention" in preset
        for side, stages in ((64, ()), (128, (64, 128))):
            assert {c for c in calls if c[:2] == (pipeline, side)} == {
                (pipeline, side, None, ()), (pipeline, side, (), ()),
                (pipeline, side, tuple(t for t in preset if t != "window_attention"), stages),
                (pipeline, side, preset, stages)}
    text = out.read_text()
    assert "torch " + torch.__version__ in text and "diffusers " in text and "Date: " in text
    rows = by_key(table(text))
    expected = {(m, f"{s}²", r) for m in bench_gpu.MODELS for s in bench_gpu.SMOKE_SIZES for r in bench_gpu.ROWS}
    assert set(rows) == expected
    for key, row in rows.items():
        seconds = float(row[COLUMNS["s/image (median)"]])
        assert math.isfinite(seconds) and seconds > 0, key
        assert row[COLUMNS["steps"]] == str(bench_gpu.SMOKE_STEPS)
        assert row[COLUMNS["peak GiB (measured)"]] == "n/a"  # no CUDA count on CPU
        assert float(row[COLUMNS["peak GiB (planner, plain call)"]]) >= 0
        ratio = row[COLUMNS["× direct"]]
        assert ratio.endswith("×") and float(ratio[:-1]) > 0, key
    for model in bench_gpu.MODELS:
        assert rows[(model, "64²", "direct")][COLUMNS["× direct"]] == "1.00×"


def test_planner_skip_and_oom_are_rows_not_crashes(tmp_path):
    """A budget the plain call cannot fit skips direct and everything-off with the planner's numbers;
    a call that runs out of memory becomes an OOM row, and hires is off the pipeline afterwards."""
    seen = {}

    def call_or_oom(pipe, call, side, steps):
        seen["pipe"] = pipe
        attachment = hires.runtime.get_attachment(pipe)
        config = attachment.config if attachment is not None else None
        if config is not None and config.structure_guidance.enabled and not config.window_attention.enabled:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return bench_gpu.generate(pipe, call, side, steps)

    out = tmp_path / "b.md"
    bench_gpu.main(["--device", "cpu", "--smoke", "--models", "sdxl", "--sizes", "128", "--budget", "1KiB",
                    "--out", str(out)], call_fn=call_or_oom)
    rows = by_key(table(out.read_text()))
    seconds = COLUMNS["s/image (median)"]
    for name in ("direct", "everything off"):
        assert rows[("sdxl", "128²", name)][seconds].startswith("skipped: planner predicts ")
        assert "> budget 0.0 MiB" in rows[("sdxl", "128²", name)][seconds]
    assert float(rows[("sdxl", "128²", "preset")][seconds]) > 0
    assert rows[("sdxl", "128²", "preset")][COLUMNS["× direct"]] == "n/a"  # no direct to divide by
    assert rows[("sdxl", "128²", "preset without windows")][seconds] == "OOM"
    assert not hires.is_applied(seen["pipe"])


def test_other_torch_errors_are_error_rows_and_bugs_end_the_run(tmp_path):
    def failing_kernel(pipe, call, side, steps):
        raise RuntimeError("upsample_nearest2d only supports output tensors with less than INT_MAX elements\nmore")

    out = tmp_path / "b.md"
    bench_gpu.main(["--device", "cpu", "--smoke", "--models", "flux", "--sizes", "64", "--out", str(out)],
                   call_fn=failing_kernel)
    rows = by_key(table(out.read_text()))
    assert len(rows) == len(bench_gpu.ROWS)
    for row in rows.values():
        assert row[COLUMNS["s/image (median)"]] == (
            "error: RuntimeError: upsample_nearest2d only supports output tensors with less than INT_MAX elements")

    def bug(pipe, call, side, steps):
        raise TypeError("__call__() got an unexpected keyword argument 'heigth'")

    with pytest.raises(TypeError, match="heigth"):
        bench_gpu.main(["--device", "cpu", "--smoke", "--models", "flux", "--sizes", "64", "--out", str(out)],
                       call_fn=bug)


def test_randomise_gives_trained_magnitudes_without_an_initialiser_pass():
    with torch.device("meta"):
        module = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.LayerNorm(64), torch.nn.Conv2d(64, 32, 3),
                                     torch.nn.GroupNorm(4, 32))
    module = bench_gpu.randomise(module, torch.device("cpu"), torch.bfloat16, seed=0)
    linear, layer_norm, conv, group_norm = module
    assert linear.weight.dtype == torch.bfloat16 and linear.weight.device.type == "cpu"
    for layer, fan_in in ((linear, 256), (conv, 64 * 9)):
        std = float(layer.weight.float().std())
        assert abs(std * math.sqrt(fan_in) - 1) < 0.05, (layer, std)
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
    for norm in (layer_norm, group_norm):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_real_size_architectures_and_embeddings_have_the_public_shapes():
    """The GPU path's models (meta device: no memory) and the text encoders' output shapes they take."""
    sizes = {"sdxl": (2.567e9, 77, 2048, 1280), "flux": (11.90e9, 512, 4096, 768)}
    for model, (parameters, tokens, width, pooled) in sizes.items():
        arch = bench_gpu.architecture(model, "real")
        assert arch.denoiser.device.type == "meta"
        assert abs(sum(p.numel() for p in arch.denoiser.parameters()) / parameters - 1) < 1e-3
        call = bench_gpu.prompt_embeddings(arch.denoiser.config, model, arch.text_tokens,
                                           torch.device("cpu"), torch.float32)
        assert call["prompt_embeds"].shape == (1, tokens, width)
        assert call["pooled_prompt_embeds"].shape == (1, pooled)
