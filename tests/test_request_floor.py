"""Absurd sizes are refused up front, by arithmetic, before anything is allocated."""

from __future__ import annotations

import time

import pytest
import torch

import hires
from hires.techniques.memory.estimate import FLOOR_BYTES_PER_PIXEL, MemoryBudgetError, check_request
from tiny_models import build, generate


def test_100000_squared_is_refused_in_seconds_without_allocating(monkeypatch):
    pipe = hires.apply(build("sd15"))  # the automatic preset: a 1,562-stage ladder if it started
    calls = []
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: calls.append(1))  # no work may start
    start = time.perf_counter()
    with pytest.raises(MemoryBudgetError, match=r"100000x100000.*decoded image alone needs .* ask for at most about"):
        generate(pipe, "sd15", 100000)
    assert time.perf_counter() - start < 5 and not calls


def test_the_floor_uses_the_memory_budget_and_passes_what_fits():
    pipe = hires.apply(build("sd15"), hires.HiresConfig(memory=hires.MemoryConfig(enabled=True, max_memory=10**5)))
    with pytest.raises(MemoryBudgetError, match=r"128x128 .*needs 0.2 MiB"):
        generate(pipe, "sd15", 128)
    check_request(128, 128, "cpu", budget=FLOOR_BYTES_PER_PIXEL * 128 * 128)  # exactly enough: no error
    with pytest.raises(MemoryBudgetError):
        check_request(128, 128, "cpu", budget=FLOOR_BYTES_PER_PIXEL * 128 * 128 - 1)


def test_the_floor_reads_the_free_memory_and_leaves_base_size_calls_alone(monkeypatch):
    from hires.techniques.memory import estimate as memory_planner

    pipe = build("sd15")
    plain = generate(pipe, "sd15", 64, output_type="pt")
    hires.apply(pipe)
    monkeypatch.setattr(memory_planner, "detect_budget", lambda device: 10**5)  # a device with 100 kB free
    # at the base size hires only validates: plain diffusers' call, whatever the budget says
    assert torch.equal(generate(pipe, "sd15", 64, output_type="pt"), plain)
    with pytest.raises(MemoryBudgetError, match=r"128x128.*free"):
        generate(pipe, "sd15", 128)
