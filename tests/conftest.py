"""Session fixtures shared across rooms: real components, started once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The prepared SmolLM2-135M-Instruct HF directory (`ssp model prepare`; converted once, then cached)."""
    from serving.model_prep import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Tantivy index over the shipped demo corpora (data/corpus/, about 19k passages), built once per session."""
    from retriever.index_build import build_index
    from ssp.paths import DEMO_CORPORA

    return build_index(DEMO_CORPORA, tmp_path_factory.mktemp("index") / "demo", progress=False).out
