import os
import sys

import pytest
import torch

# Tiny models are far faster on one thread, and parallel runs on a 2-core machine don't thrash.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import tiny_models  # noqa: E402


@pytest.fixture(params=tiny_models.FAMILY_NAMES)
def family(request):
    return request.param


@pytest.fixture
def make_pipe():
    return tiny_models.build


@pytest.fixture
def no_weights(monkeypatch):
    """Loading a model's weights in the command line fails the test: the error under test must come first."""
    from hires import cli

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(cli, "load_pipeline", refuse)


@pytest.fixture
def no_model(no_weights, monkeypatch):
    """Neither weights nor the model's configs may be read by the command line."""
    from hires import cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was read before the error")

    monkeypatch.setattr(cli, "load_pipeline_skeleton", refuse)
