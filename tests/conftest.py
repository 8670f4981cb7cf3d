"""Session fixtures shared across rooms: real components, started once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The prepared SmolLM2-135M-Instruct HF directory (`ssp model prepare`; converted once, then cached)."""
    from serving.model_prep import prepare_default_model

    return prepare_default_model()
