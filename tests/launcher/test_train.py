"""`ssp train`: the rules that need no process, then real runs (reference server, Tantivy index, torchrun learner
on CPU) with tiny limits: a component killed mid-run ends the run naming it and its log with a resumable
checkpoint, and `--resume` continues the step counter without training any group twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssp.config import ConfigError, load_config
from ssp.launcher.progress import Snapshot, format_header, format_row, step_row
from ssp.launcher.train import TrainError, check_config, train
from ssp.run_config import SSPConfig

# ---------------------------------------------------------------- pure rules


def test_batch_sizes_must_agree() -> None:
    cfg = load_config(SSPConfig, None, ["scheduler.episodes_per_step=4", "learner.groups_per_step=8"])
    with pytest.raises(TrainError, match=r"episodes_per_step = 4 but learner.groups_per_step = 8"):
        check_config(cfg)


def test_heldout_seeds_must_not_be_trained_on(tmp_path: Path) -> None:
    from ssp.engine.config import SchedulerConfig

    train_seeds = SchedulerConfig().seeds_file
    heldout = tmp_path / "heldout.jsonl"
    answer = json.loads(train_seeds.read_text().splitlines()[3])["answer"]
    heldout.write_text(json.dumps({"answer": answer.upper(), "type": "entity"}) + "\n")  # a trained answer, recased
    cfg = load_config(SSPConfig, None, [f"train.eval_seeds=['{heldout}']"])
    with pytest.raises(TrainError, match=r"shares 1 answer\(s\) with scheduler.seeds_file"):
        check_config(cfg)
    check_config(load_config(SSPConfig, None, ["train.eval_seeds=['data/seeds/heldout_seed_answers.jsonl']"]))


@pytest.mark.parametrize("override, rule", [
    ("train.learner_address='trainer-0'", "must be HOST:PORT"),
    ("train.server_urls=['gpu-node:30000']", "must be a base URL"),
    ("train.steps=0", "steps = 0: must be >= 1"),
    ("train.name='../x'", "folder name"),
])
def test_train_section_rejects_bad_values(override: str, rule: str) -> None:
    with pytest.raises(ConfigError, match=rule):
        load_config(SSPConfig, None, [override])


def test_resume_rules(tmp_path: Path) -> None:
    base = [f"train.run_dir='{tmp_path / 'run'}'", "scheduler.episodes_per_step=8"]
    with pytest.raises(TrainError, match="nothing to resume"):
        train(load_config(SSPConfig, None, base), resume=True, progress=False)
    ckpt = tmp_path / "run" / "learner" / "checkpoints"
    (ckpt / "step-000002").mkdir(parents=True)
    (ckpt / "step-000002" / "state.json").write_text(json.dumps({"step": 2, "offset": 0,
                                                                 "consumed_group_ids": []}))
    (ckpt / "latest").write_text("step-000002")
    with pytest.raises(TrainError, match="already holds a run at step 2; continue it with --resume"):
        train(load_config(SSPConfig, None, base), resume=False, progress=False)
    with pytest.raises(TrainError, match=r"already at step 2 >= train.steps = 2.*train.steps=4"):
        train(load_config(SSPConfig, None, [*base, "train.steps=2"]), resume=True, progress=False)


def test_step_row_is_the_difference_over_the_step() -> None:
    before = Snapshot(at=10.0, finished=4, valid=2, generated_tokens=1000, accuracy_sum=1.0, proposer_reward_sum=1.5,
                      failed=0, questions=3, checked=2)
    now = Snapshot(at=20.0, finished=8, valid=3, generated_tokens=3000, accuracy_sum=1.25, proposer_reward_sum=2.25,
                   failed=1, questions=6, checked=4)
    row = step_row(3, before, now, {"loss": 0.5, "logprob_mismatch_mean": 1e-5, "staleness_max": 1.0, "step_s": 2.0})
    assert row["episodes"] == 4 and row["episodes_failed"] == 1
    assert row["episodes_per_s"] == pytest.approx(0.4) and row["tokens_per_s"] == pytest.approx(200.0)
    assert row["solver_accuracy"] == pytest.approx(0.25) and row["valid_rate"] == pytest.approx(0.25)
    assert row["proposer_reward"] == pytest.approx(0.1875)
    assert row["question_rate"] == pytest.approx(0.75) and row["checks_rate"] == pytest.approx(0.5)
    assert row["loss"] == 0.5 and row["staleness_max"] == 1.0
    idle = step_row(4, now, now, None)
    assert idle["solver_accuracy"] is None and idle["valid_rate"] is None and "loss" not in idle
    assert len(format_row(idle)) == len(format_header())
    assert format_row(idle).split()[4] == "-"  # no valid question: no accuracy, not 0


# ---------------------------------------------------------------- real runs

TINY = [
    "scheduler.episodes_per_step=1", "learner.groups_per_step=1", "scheduler.max_inflight=2", "scheduler.eta=1",
    "rollout.max_turns=2", "rollout.max_new_tokens_per_turn=24", "rollout.max_response_tokens=96",
    "rollout.max_context_tokens=1024", "game.solver_group_size=2", "game.verify_samples=1",
    "game.verify_max_new_tokens=8", "serving.context_length=1024", "train.poll_interval_s=0.25",
    "learner.warmup_steps=0", "learner.lr=1e-5", "learner.checkpoint_every=1", "train.eval_datasets=[]",
    "train.eval_seeds=[]", "train.export_policy=false", "metrics.trackers=[]",
]


def _start(run_dir: Path, model_dir: Path, index: Path, *extra: str, resume: bool = False
           ) -> tuple[subprocess.Popen[str], Path]:
    sets = [*TINY, f"train.run_dir='{run_dir}'", f"retriever.index_dir='{index}'", f"serving.model='{model_dir}'",
            f"learner.model_dir='{model_dir}'", f"rollout.tokenizer_dir='{model_dir}'", *extra]
    argv = [sys.executable, "-m", "ssp.cli", "train", "--config", "configs/demo.toml", "--no-progress",
            *(["--resume"] if resume else [])]
    for s in sets:
        argv += ["--set", s]
    run_dir.mkdir(parents=True, exist_ok=True)
    err = run_dir.parent / f"{run_dir.name}-{int(time.time() * 1000)}.stderr"
    with err.open("w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                cwd=Path(__file__).resolve().parents[2])
    return proc, err


def _wait_for(predicate, proc: subprocess.Popen[str], err: Path, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"ssp train exited ({proc.returncode}) before {what}:\n{err.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.terminate()  # SIGTERM: ssp train stops its children (SIGKILL would orphan them)
            proc.communicate(timeout=60)
            pytest.fail(f"timed out waiting for {what}:\n{err.read_text()[-3000:]}")
        time.sleep(0.25)


def _latest_step(run_dir: Path) -> int:
    pointer = run_dir / "learner" / "checkpoints" / "latest"
    if not pointer.is_file():
        return 0
    state = run_dir / "learner" / "checkpoints" / pointer.read_text().strip() / "state.json"
    return int(json.loads(state.read_text())["step"]) if state.is_file() else 0


def _pid_of(run_dir: Path, name: str) -> int:
    procs = json.loads((run_dir / "processes.json").read_text())["processes"]
    return next(p["pid"] for p in procs if p["name"] == name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_killed_server_is_named_and_resume_continues(tmp_path: Path, model_dir: Path, demo_index: Path) -> None:
    run_dir = tmp_path / "run"
    proc, err = _start(run_dir, model_dir, demo_index, "train.steps=50")
    _wait_for(lambda: _latest_step(run_dir) >= 1, proc, err, 600, "the first checkpoint")
    server = _pid_of(run_dir, "server-0")
    learner = _pid_of(run_dir, "learner")
    os.kill(server, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    stderr = err.read_text()
    assert proc.returncode == 1, stderr
    assert "server-0 failed" in stderr and str(run_dir / "logs" / "server-0.log") in stderr, stderr
    assert "--resume" in stderr and "latest checkpoint is step" in stderr, stderr
    assert not _alive(learner), "the learner outlived ssp train"
    killed_at = _latest_step(run_dir)
    assert killed_at >= 1

    # --resume: the step counter goes on from the checkpoint, and no group is trained twice.
    proc, err = _start(run_dir, model_dir, demo_index, f"train.steps={killed_at + 1}", "train.eval_datasets="
                       "['data/qa/hotpotqa_dev300_questions.jsonl']", "eval.limit=1", "eval.max_turns=1",
                       "eval.max_new_tokens_per_turn=8", 'metrics.trackers=["tensorboard"]', resume=True)
    out, _ = proc.communicate(timeout=900)
    stderr = err.read_text()
    assert proc.returncode == 0, stderr
    assert f"resuming at step {killed_at}" in stderr
    assert "EM before" in out and "episodes finished" in out, out
    learner_steps = [r["step"] for r in map(json.loads, (run_dir / "learner" / "metrics.jsonl").read_text()
                                            .splitlines()) if r.get("trained")]
    # (the step the kill interrupted was checkpointed but may have no metrics line: its push never finished)
    assert learner_steps[-1] == killed_at + 1 and learner_steps == sorted(set(learner_steps)), learner_steps
    state = json.loads((run_dir / "learner" / "checkpoints" / f"step-{killed_at + 1:06d}" / "state.json").read_text())
    assert state["step"] == killed_at + 1
    assert len(state["consumed_group_ids"]) == len(set(state["consumed_group_ids"])) == killed_at + 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("event") == "step"][-1] == killed_at + 1
    assert (run_dir / "train.png").stat().st_size > 0 and (run_dir / "samples.frames").stat().st_size > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["start_step"] == killed_at and summary["steps"] == killed_at + 1
    assert summary["eval_before"]["datasets"][0]["questions"] == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))  # the resumed run's step rows, at their steps
    events.Reload()
    assert [e.step for e in events.Scalars("rollout/episodes")] == [killed_at + 1], events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("eval/average/em")] == [killed_at, killed_at + 1]  # before and after


def _weight_version(url: str, key: str) -> str | None:
    import urllib.request

    req = urllib.request.Request(url + "/model_info", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return str(json.loads(resp.read())["weight_version"])
    except OSError:
        return None


def test_one_of_two_killed_servers_is_restarted_and_serves_the_current_weights(tmp_path: Path, model_dir: Path,
                                                                               demo_index: Path) -> None:
    """train.servers = 2: server-1 SIGKILLed after the first checkpoint is restarted on its port while server-0
    serves; the learner's next push re-forms its group over both, the pool re-admits server-1 once it serves the
    version server-0 serves, and the run finishes every step."""
    from ssp.run_key import load_api_key

    run_dir = tmp_path / "run"
    steps = 6
    # Default push and receive timeouts (ten minutes each): a kill while a bucket is on the wire must cost seconds,
    # not those timeouts (the test's own waits are shorter than them).
    proc, err = _start(run_dir, model_dir, demo_index, f"train.steps={steps}", "train.servers=2",
                       "train.max_server_restarts=1", "inference.health_check_interval_s=1.0")
    _wait_for(lambda: _latest_step(run_dir) >= 1, proc, err, 600, "the first checkpoint")
    killed = _pid_of(run_dir, "server-1")
    killed_at = _latest_step(run_dir)
    os.kill(killed, signal.SIGKILL)
    _wait_for(lambda: _pid_of(run_dir, "server-1") != killed, proc, err, 60, "server-1's restart")
    urls = json.loads((run_dir / "processes.json").read_text())["server_urls"]
    key = load_api_key(run_dir / "stream.key", "stream.key_file")
    assert key is not None

    def caught_up() -> bool:
        versions = [_weight_version(url, key) for url in urls]
        return versions[0] == versions[1] and versions[1] not in (None, "default") and \
            int(versions[1]) > killed_at
    _wait_for(caught_up, proc, err, 600, "the restarted server-1 to serve the current weights")
    proc.communicate(timeout=600)
    stderr = err.read_text()
    assert proc.returncode == 0, stderr
    assert f"server-1 (pid {killed}) exited with code -9; restarted it as pid" in stderr, stderr
    engine_log = (run_dir / "logs" / "engine.log").read_text()
    # The pool ejects a server only after failed health checks: a restart quicker than that is never ejected (and
    # then needs no re-admission), while the survivor, stalled in a broadcast cut by the kill, may be ejected too.
    for url in urls:
        if f"ejecting {url}" in engine_log:
            assert f"re-admitting {url}" in engine_log, engine_log[-3000:]
    assert "re-forming the weight-update group" in (run_dir / "logs" / "learner.log").read_text()
    trained = [r["step"] for r in map(json.loads, (run_dir / "learner" / "metrics.jsonl").read_text().splitlines())
               if "trained" in r]
    assert trained == list(range(1, steps + 1)), trained
    assert not _alive(_pid_of(run_dir, "server-1")), "the restarted server outlived ssp train"


def test_killed_learner_is_named_with_its_log(tmp_path: Path, model_dir: Path, demo_index: Path) -> None:
    run_dir = tmp_path / "run"
    proc, err = _start(run_dir, model_dir, demo_index, "train.steps=5")
    metrics = run_dir / "learner" / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and "initial_push" in metrics.read_text(), proc, err, 600,
              "the learner's first weight push")
    server = _pid_of(run_dir, "server-0")
    os.killpg(_pid_of(run_dir, "learner"), signal.SIGKILL)  # the launcher, torchrun and the rank
    proc.communicate(timeout=120)
    stderr = err.read_text()
    assert proc.returncode == 1, stderr
    assert "learner failed" in stderr and str(run_dir / "logs" / "learner.log") in stderr, stderr
    assert not _alive(server), "the server outlived ssp train"


def test_sigterm_stops_every_process(tmp_path: Path, model_dir: Path, demo_index: Path) -> None:
    """SIGTERM (or Ctrl-C) to `ssp train`, the engine's process, while the learner starts: all children stopped."""
    run_dir = tmp_path / "run"
    proc, err = _start(run_dir, model_dir, demo_index, "train.steps=5")
    listing = run_dir / "processes.json"
    _wait_for(lambda: listing.is_file() and '"learner"' in listing.read_text(), proc, err, 600,
              "the learner's start")
    children = [_pid_of(run_dir, "server-0"), _pid_of(run_dir, "learner")]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    stderr = err.read_text()
    assert proc.returncode == 130, stderr
    assert "stopped by SIGTERM; every process was stopped" in stderr and "--resume" in stderr, stderr
    assert not any(_alive(pid) for pid in children), "a child outlived ssp train"


def test_attached_learners_env_key_becomes_the_run_key(tmp_path: Path, model_dir: Path, demo_index: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """train.learner_address with $SSP_RUN_KEY: the key goes to <run>/stream.key (0600) and keys the servers this
    run starts, so the run still has one secret. (No learner listens: the run fails, after the servers started.)"""
    key = "e" * 64
    monkeypatch.setenv("SSP_RUN_KEY", key)
    run_dir = tmp_path / "run"
    proc, err = _start(run_dir, model_dir, demo_index, 'train.learner_address="127.0.0.1:9"',
                       "train.learner_start_timeout_s=2")
    proc.communicate(timeout=120)
    assert proc.returncode == 1 and "cannot connect to the learner at 127.0.0.1:9" in err.read_text()
    key_file = run_dir / "stream.key"
    assert key_file.read_text().strip() == key and key_file.stat().st_mode & 0o777 == 0o600
    run = load_config(SSPConfig, run_dir / "config.toml")
    assert run.stream.key_file == run.serving.api_key_file == run.inference.api_key_file == key_file


async def test_a_full_disk_under_the_samples_is_reported_as_such(tmp_path: Path) -> None:
    """/dev/full refuses every write with ENOSPC, as a full disk does."""
    from ssp.engine.stream import FileSink
    from ssp.launcher.training_engine import SampleSink, SamplesWriteFailed

    learner = FileSink(tmp_path / "to-learner.frames")
    sink = SampleSink(learner, FileSink(Path("/dev/full")), every=1)
    with pytest.raises(SamplesWriteFailed, match=r"/dev/full failed \(\[Errno 28\] No space left on device\); the "
                                                 r"learner got the group.*train.sample_every = 0"):
        await sink.write(b"frame-1")
    await sink.write(b"frame-2")  # the learner's stream goes on; no second copy is attempted
    await sink.close()
    assert (tmp_path / "to-learner.frames").read_bytes() == b"frame-1frame-2"
