"""Where a training run keeps its things: the run folder, the learner's folder inside it, the step of the latest
checkpoint, and processes.json (what runs where). `ssp train`, its summary and its failure message all ask here."""

from __future__ import annotations

import json
from pathlib import Path

from ssp.paths import artifacts_dir
from ssp.processes import ProcessSet
from ssp.run_config import SSPConfig


def run_dir_of(cfg: SSPConfig) -> Path:
    return cfg.train.run_dir or artifacts_dir() / "runs" / cfg.train.name


def learner_dir_of(cfg: SSPConfig) -> Path:
    """The learner's out_dir: inside the run folder when ssp train starts it; the configured one when attached."""
    return run_dir_of(cfg) / "learner" if cfg.train.learner_address is None else cfg.learner.out_dir


def checkpoint_step(learner_dir: Path) -> int | None:
    """Step of the learner's latest complete checkpoint, None when there is none."""
    from ssp.learner import checkpoint

    path = checkpoint.latest(learner_dir / "checkpoints")
    if path is None:
        return None
    return int(json.loads((path / "state.json").read_text())["step"])


def write_processes(run_dir: Path, procs: ProcessSet, urls: list[str], cfg: SSPConfig) -> None:
    """<run>/processes.json: what runs where (pids, logs, URLs), for a person debugging the run."""
    (run_dir / "processes.json").write_text(json.dumps({
        "processes": [{"name": p.name, "pid": p.pid, "log": str(p.log_path), "argv": p.argv}
                      for p in procs.processes],
        "server_urls": urls, "stream": f"{cfg.stream.host}:{cfg.stream.port}", "retriever": cfg.retriever.kind,
    }, indent=1) + "\n")
