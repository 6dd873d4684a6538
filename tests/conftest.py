"""Shared fixtures: tiny models built from configs (offline, seeded) and random-weight adapters."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from tiny import ARCHITECTURES, tiny_model  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(params=["llama", "gpt2"])
def arch(request) -> str:
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


__all__ = ["ARCHITECTURES", "tiny_model"]
