"""Learner fixtures: tiny random checkpoints of both supported families, and a single-process parallel state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from learner_tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def par1() -> Iterator[object]:
    """TP=1 megatron parallel state in this process (gloo, world size 1), torn down at the end of the session."""
    from ssp.learner.model import destroy_parallel, init_parallel

    yield init_parallel(tp=1)
    destroy_parallel()
