"""`ssp launch --dry-run` on the shipped cluster configs, and the errors of an impossible or unallocated launch."""

import json
import re
from pathlib import Path

import pytest

from ssp.cli import main
from ssp.config import load_config
from ssp.launcher.cluster_run import prepare_launch, slurm_allocation_nodes, write_run_secrets
from ssp.launcher.plan import PlanError
from ssp.paths import CONFIGS_DIR
from ssp.run_config import SSPConfig

CONFIG_32B = CONFIGS_DIR / "train-32b.toml"


def test_dry_run_32b_prints_a_valid_plan_and_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--config", str(CONFIG_32B), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 GPU nodes x 8 GPUs" in out and "plan OK" in out
    assert out.count("sglang.launch_server") == 4 and out.count("--nnodes=2") == 2
    assert "--tp-size 4" in out and "CUDA_VISIBLE_DEVICES=4,5,6,7" in out
    engine_line = next(line for line in out.splitlines() if line.strip().startswith("[engine"))
    assert "train.learner_address=\"node2:29600\"" in engine_line and "http://node1:30001" in engine_line


def test_dry_run_7b_is_a_valid_two_node_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--config", str(CONFIGS_DIR / "train-7b.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Qwen2.5-7B-Instruct: 7.62 B parameters" in out and "TP 4 x PP 1 x DP 2" in out
    assert out.count("sglang.launch_server") == 8 and out.endswith("\n") and "plan OK" in out


def test_engine_and_learner_agree_on_addresses() -> None:
    root = load_config(SSPConfig, CONFIG_32B)
    prepared = prepare_launch(root, config_path=CONFIG_32B, overrides=[], use_allocation=False)
    learners = [launch for launch in prepared.launches if launch.name.startswith("learner")]
    assert all("tcp://node2:29600" in launch.argv for launch in learners)  # rank 0's node, not 0.0.0.0
    assert prepared.learner_config["tensor_parallel"] == 8 and prepared.learner_config["data_parallel"] == 2
    assert prepared.learner_config["max_steps"] == root.train.steps
    assert prepared.learner_config["max_staleness"] == root.scheduler.eta  # the learner's backstop of the gate
    assert prepared.learner_config["push_master_address"] == "node2"
    engine = next(launch for launch in prepared.launches if launch.name == "engine")
    assert any(arg.startswith('learner.out_dir="') and arg.endswith('/learner"') for arg in engine.argv)
    assert 'rollout.tokenizer_dir="/models/Qwen2.5-32B-Instruct"' in engine.argv
    # The trajectory stream's handshake: both ends read the same key file (its path, never the key) and run id.
    stream = prepared.stream_config
    assert stream["key_file"] == str(prepared.run_dir / "stream.key") and stream["run_id"] == prepared.run_dir.name
    assert all(str(prepared.run_dir / "stream_config.json") in launch.argv for launch in learners)
    assert f"stream.key_file={json.dumps(stream['key_file'])}" in engine.argv
    assert f"stream.run_id={json.dumps(stream['run_id'])}" in engine.argv


def test_dry_run_shows_every_process_keyed_and_no_wildcard_bind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--config", str(CONFIG_32B), "--dry-run"]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("  [")]
    shown = re.search(r"run key ([0-9a-f]{4})\.\.\. ", out)
    assert shown and len(commands) == 1 + 4 + 2 + 1
    assert all(f"key {shown.group(1)}... via " in line for line in commands)
    assert "0.0.0.0" not in out and not re.search(r"[0-9a-f]{8}", out.replace("qwen2.5", ""))  # no key in full


def test_every_server_and_client_gets_the_run_key_file(tmp_path: Path) -> None:
    root = load_config(SSPConfig, CONFIG_32B, [f"train.run_dir={json.dumps(str(tmp_path))}"])
    prepared = prepare_launch(root, config_path=CONFIG_32B, overrides=[], use_allocation=False)
    key_file = json.dumps(str(tmp_path / "stream.key"))
    by_name = {launch.name: launch for launch in prepared.launches}
    assert f"retrieval_server.api_key_file={key_file}" in by_name["retriever"].argv
    assert by_name["retriever"].argv[by_name["retriever"].argv.index("--host") + 1] == "node0"
    sglang = by_name["sglang-0"].argv
    assert sglang[sglang.index("--config") + 1] == str(tmp_path / "sglang-auth.yaml")
    assert sglang[sglang.index("--host") + 1] == "node0"
    assert prepared.learner_config["push_api_key_file"] == str(tmp_path / "stream.key")
    for key in ("stream.key_file", "inference.api_key_file", "retriever.api_key_file"):
        assert f"{key}={key_file}" in by_name["engine"].argv
    assert all(prepared.run_key not in " ".join(launch.argv) for launch in prepared.launches)


def test_run_secrets_are_owner_only_and_sglang_reads_its_keys(tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    write_run_secrets(tmp_path, "k" * 64)
    assert (tmp_path / "stream.key").read_text().strip() == "k" * 64
    auth = tmp_path / "sglang-auth.yaml"
    assert yaml.safe_load(auth.read_text()) == {"api-key": "k" * 64, "admin-api-key": "k" * 64}
    assert (auth.stat().st_mode & 0o777) == (tmp_path / "stream.key").stat().st_mode & 0o777 == 0o600


def test_pipeline_parallel_is_refused_until_the_learner_runs_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch", "--config", str(CONFIG_32B), "--dry-run", "--set", "cluster.train_pp=2"]) == 2
    assert "this learner runs PP = 1 only" in capsys.readouterr().err


def test_impossible_plan_exits_2_naming_the_constraint(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["launch", "--config", str(CONFIG_32B), "--dry-run", "--set", "cluster.train_tp=2"])
    assert code == 2
    assert "trainer needs ~" in capsys.readouterr().err


def test_launch_outside_an_allocation_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    with pytest.raises(PlanError, match="not inside a SLURM allocation.*salloc --nodes=N"):
        slurm_allocation_nodes()


def test_hosts_launcher_uses_ssh_on_each_host(tmp_path: Path) -> None:
    root = load_config(SSPConfig, CONFIG_32B, [
        'cluster.launcher="hosts"', 'cluster.hosts=["g0", "g1", "g2", "g3"]',
    ])
    prepared = prepare_launch(root, config_path=CONFIG_32B, overrides=[], use_allocation=True)
    sglang = next(launch for launch in prepared.launches if launch.name == "sglang-3")
    wrapped = sglang.wrapped(root.cluster, tmp_path)
    assert wrapped[:3] == ["ssh", "-o", "BatchMode=yes"] and wrapped[3] == "g1"
    assert "CUDA_VISIBLE_DEVICES=4,5,6,7" in wrapped[4]
