"""Where ssp keeps things: the shipped data, and the artifacts it derives at set-up or run time.

Artifacts (prepared models, indexes, runs, bench reports) are generated, never committed; they live under
`artifacts/` in the checkout unless `SSP_ARTIFACTS` points elsewhere (e.g. a scratch disk on a cluster).
"""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = PROJECT_ROOT / "data"
CONFIGS_DIR = PROJECT_ROOT / "configs"


def artifacts_dir() -> Path:
    """Root of generated files; read at call time so tests and users can redirect it with SSP_ARTIFACTS."""
    return Path(os.environ.get("SSP_ARTIFACTS", PROJECT_ROOT / "artifacts"))


def default_model_dir() -> Path:
    """Where `ssp model prepare` writes SmolLM2-135M-Instruct as a Hugging Face directory."""
    return artifacts_dir() / "models" / "SmolLM2-135M-Instruct"


def default_index_dir() -> Path:
    """Where `just demo` builds the Tantivy index over the shipped demo corpora."""
    return artifacts_dir() / "index" / "demo"


DEMO_CORPORA = (
    DATA_DIR / "corpus" / "hotpotqa_dev300_corpus.jsonl",
    DATA_DIR / "corpus" / "2wikimultihopqa_hipporag_corpus.jsonl",
    DATA_DIR / "corpus" / "wiki_vital10k.jsonl",
)
"""The corpora of the embedded demo index (about 19k Wikipedia passages, see data/README.md)."""
