"""Fixtures shared by the serving tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ssp.serving.model_runner import ModelRunner


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> Iterator[ModelRunner]:
    """SmolLM2 in a ModelRunner on one torch thread, as the server runs it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ModelRunner(model_dir, device="cpu", dtype=torch.float32)
    torch.set_num_threads(threads)
