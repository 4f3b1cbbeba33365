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
