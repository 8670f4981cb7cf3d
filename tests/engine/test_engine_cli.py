"""`ssp rollout` and `ssp inspect` through the real command line entry point, against a simulated server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssp.cli import main
from ssp.paths import CONFIGS_DIR

SCHEMA_FIELDS = {"schema", "role", "group_id", "prompt_ids", "response_ids", "loss_mask", "rollout_logprobs",
                 "policy_versions", "reward", "meta"}


@pytest.fixture(scope="module")
def frames(sim_server: str, demo_index: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run.frames"
    rc = main(["rollout", "--config", str(CONFIGS_DIR / "demo.toml"), "--episodes", "3", "--out", str(out),
               "--set", f'inference.server_urls=["{sim_server}"]', "--set", f'retriever.index_dir="{demo_index}"',
               "--set", f'rollout.tokenizer_dir="{model_dir}"', "--set", "rollout.max_new_tokens_per_turn=200",
               "--set", "rollout.max_response_tokens=3000", "--set", "rollout.max_context_tokens=8000",
               "--set", "game.verify_max_new_tokens=70"])
    assert rc == 0
    return out


def test_rollout_writes_frames_metrics_and_plot(frames: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert frames.exists() and frames.with_suffix(".metrics.jsonl").exists()
    assert frames.with_suffix(".metrics.png").exists()


def test_inspect_json_has_the_schema_fields(frames: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["inspect", str(frames), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records and all(set(r) == SCHEMA_FIELDS for r in records)
    assert sum(r["role"] == "proposer" for r in records) == 3


def test_inspect_shows_masks(frames: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["inspect", str(frames), "--json"]) == 0
    searched = sum(len(json.loads(line)["meta"]["searches"]) for line in capsys.readouterr().out.splitlines())
    assert main(["inspect", str(frames), "--role", "proposer", "--limit", "1", "--tokenizer", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "=== proposer" in out and "--- prompt" in out and "1 trajectories shown" in out
    assert main(["inspect", str(frames), "--tokenizer", str(model_dir)]) == 0
    out = capsys.readouterr().out
    # Tool output (loss mask 0) is bracketed, once per executed search.
    assert out.count("[[\n\n<information>") == searched


def test_inspect_reports_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.frames"
    bad.write_bytes(b"\x00\x00\x00\x09abc")
    assert main(["inspect", str(bad)]) == 2
    assert "truncated" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.frames")]) == 2
