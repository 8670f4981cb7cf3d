"""A learner that dies mid-push, and one that hangs, against a real reference server (`ssp model serve`, its own
process, over sockets on 127.0.0.1): the server is not left stuck.

- killed mid-push (SIGKILL between buckets: paused, session open, group registered), a restarted learner's
  WeightPusher resets what was left and pushes into the same server, which then serves the new version;
- with nobody coming back, the abandoned session expires after serving.weight_update_idle_timeout_s;
- a trainer that joins and never broadcasts holds neither generation after continue_generation nor the server: its
  update call fails after serving.weight_receive_timeout_s;
- a group abandoned while a receive waits on it is destroyed at once, and a group of another name receives meanwhile;
- one of two servers SIGKILLed mid-push: the push fails within seconds (not learner.push_timeout_s), the survivor
  generates right away, and the next push re-forms over the survivor and lands there.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def call(url: str, path: str, body: dict[str, Any] | None = None, timeout_s: float = 120) -> tuple[int, Any]:
    """(status, parsed body) of a GET (body None) or POST; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return status, raw.decode()


def generate(url: str, timeout_s: float = 60) -> dict[str, Any]:
    status, out = call(url, "/generate", {"input_ids": PROMPT, "sampling_params": {"temperature": 0,
                                                                                   "max_new_tokens": 4}}, timeout_s)
    assert status == 200, out
    return out


def kill_mid_push(url: str, model_dir: Path) -> None:
    """Run tests/learner/dying_pusher.py against `url` until it SIGKILLs itself at tensor 40 (a few buckets in)."""
    script = Path(__file__).parent / "dying_pusher.py"
    done = subprocess.run([sys.executable, str(script), url, str(model_dir), "40"], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == -9 and "killing myself mid-push" in done.stdout, done.stdout + done.stderr


def start_server(server_launcher: Any, model_dir: Path, *settings: str) -> str:
    args = ["--model", str(model_dir), "--port", "0", "--set", "serving.context_length=1024"]
    for s in settings:
        args += ["--set", s]
    return server_launcher(args).url


def test_a_restarted_learner_pushes_into_the_server_a_killed_one_left(server_launcher: Any,
                                                                      model_dir: Path) -> None:
    from safetensors.torch import load_file

    from ssp.learner.push import WeightPusher

    url = start_server(server_launcher, model_dir, "serving.weight_update_idle_timeout_s=0")  # no expiry: reset only
    kill_mid_push(url, model_dir)
    assert call(url, "/ready")[0] == 503  # left paused ...
    status, reply = call(url, "/begin_weight_update", {})
    assert status == 400 and "already open" in reply["message"]  # ... with its session open

    state = load_file(str(model_dir / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"] * 1.5
    pusher = WeightPusher([url], backend="gloo", bytes_per_bucket=4 << 20, timeout_s=60)
    try:
        pusher.connect()  # finds the dead learner's group still registered: "already exists" without the reset
        stats = pusher.push(iter(state.items()), version="after-crash")
    finally:
        pusher.close()
    assert stats.tensors == len(state)
    assert call(url, "/model_info")[1]["weight_version"] == "after-crash"
    status, norm = call(url, "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 576})
    assert status == 200 and norm == state["model.norm.weight"].tolist()
    out = generate(url)
    assert out["meta_info"]["weight_version"] == "after-crash" and len(out["output_ids"]) == 4


def test_an_abandoned_session_expires(server_launcher: Any, model_dir: Path) -> None:
    url = start_server(server_launcher, model_dir, "serving.weight_update_idle_timeout_s=4")
    kill_mid_push(url, model_dir)
    killed = time.monotonic()
    assert call(url, "/ready")[0] == 503  # paused by the dead learner
    while call(url, "/ready")[0] != 200:
        assert time.monotonic() - killed < 60, "the abandoned weight-update session never expired"
        time.sleep(0.2)
    assert generate(url)["meta_info"]["weight_version"] == "default"
    status, reply = call(url, "/destroy_weights_update_group", {"group_name": "weight_update_group"})
    assert status == 400 and "does not exist" in reply["message"]  # the dead learner's group is gone
    assert call(url, "/begin_weight_update", {})[0] == 200  # and its session closed
    assert call(url, "/end_weight_update", {})[0] == 200


def join_group(url: str, name: str, port: int) -> Any:
    """Our side (rank 0) of a 2-rank gloo group `name` with the server at `url` (rank 1)."""
    from ssp.serving.weight_sync import init_custom_process_group

    joined: list[tuple[int, Any]] = []
    join = threading.Thread(target=lambda: joined.append(call(url, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2, "group_name": name,
        "backend": "gloo"})))
    join.start()
    group = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=0,
                                      group_name=name)
    join.join()
    assert joined[0][0] == 200, joined
    return group


def post_norm_update(url: str, group_name: str, **extra: Any) -> tuple[threading.Thread, list[tuple[int, Any]]]:
    """Start the server's side of one flattened-bucket update of model.norm.weight over `group_name` (its receive
    waits for our broadcast) on a thread; the call's (status, reply) lands in the returned list."""
    answer: list[tuple[int, Any]] = []
    thread = threading.Thread(target=lambda: answer.append(call(url, "/update_weights_from_distributed", {
        "names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[576]], "group_name": group_name,
        "load_format": "flattened_bucket", **extra})))
    thread.start()
    return thread, answer


def test_a_hung_trainer_holds_neither_generation_nor_the_server(server_launcher: Any, model_dir: Path) -> None:
    """The trainer pauses in place, opens a session, posts a bucket and never broadcasts it. continue_generation
    must not queue behind that receive (it did while receives ran on the scheduler thread), and the receive must
    end at the configured bound instead of the 30-minute group default."""
    import torch.distributed as dist

    from ssp.processes import free_port

    receive_timeout_s = 15.0
    url = start_server(server_launcher, model_dir, "serving.weight_update_idle_timeout_s=0",
                       f"serving.weight_receive_timeout_s={receive_timeout_s}")
    group = join_group(url, "hung", free_port())
    try:
        assert call(url, "/pause_generation", {"mode": "in_place"})[0] == 200
        assert call(url, "/begin_weight_update", {})[0] == 200
        posted = time.monotonic()
        receiving, update = post_norm_update(url, "hung")
        time.sleep(1.0)  # the server posts its receive

        t0 = time.monotonic()
        assert call(url, "/continue_generation", {}, timeout_s=60)[0] == 200
        assert time.monotonic() - t0 < 5.0, "continue_generation waited for the hung receive"
        generate(url, timeout_s=30)
        assert receiving.is_alive(), "the update call should still be waiting for the broadcast"

        receiving.join(timeout=receive_timeout_s + 30)
        assert not receiving.is_alive(), "the receive was not bounded by serving.weight_receive_timeout_s"
        status, reply = update[0]
        assert status == 400 and "Timed out" in reply["message"], reply
        assert time.monotonic() - posted < receive_timeout_s + 20
        assert call(url, "/end_weight_update", {})[0] == 200
        assert call(url, "/destroy_weights_update_group", {"group_name": "hung"})[0] == 200
    finally:
        dist.destroy_process_group(group)
    generate(url)


def test_a_group_abandoned_mid_receive_is_destroyed_at_once_and_a_new_one_receives(server_launcher: Any,
                                                                                   model_dir: Path) -> None:
    """What a learner does when a member dies mid-broadcast: it abandons the group while the survivor's receive still
    waits on it (gloo ends that receive only at serving.weight_receive_timeout_s). The destroy must answer at once,
    a group of a new name must receive meanwhile (the old name stays taken until the stuck receive ends: torch
    refuses a second group of one name), and the stuck receive still ends at its bound."""
    import torch
    import torch.distributed as dist

    from ssp.processes import free_port

    receive_timeout_s = 20.0
    url = start_server(server_launcher, model_dir, "serving.weight_update_idle_timeout_s=0",
                       f"serving.weight_receive_timeout_s={receive_timeout_s}")
    old = join_group(url, "old", free_port())
    assert call(url, "/pause_generation", {"mode": "in_place"})[0] == 200
    assert call(url, "/begin_weight_update", {})[0] == 200
    posted = time.monotonic()
    receiving, stuck = post_norm_update(url, "old")
    time.sleep(1.0)  # the server posts its receive; we never broadcast

    t0 = time.monotonic()
    status, reply = call(url, "/destroy_weights_update_group", {"group_name": "old"}, timeout_s=60)
    assert status == 200 and "abandoned" in reply["message"], reply
    assert call(url, "/end_weight_update", {})[0] == 200
    assert call(url, "/continue_generation", {})[0] == 200
    assert time.monotonic() - t0 < 5.0, "destroying the group waited for the stuck receive"
    generate(url, timeout_s=30)

    # Why each group gets a new name: the server refuses a second group of the old name (past the rendezvous, which
    # a store of ours answers; this process holds an "old" group too, so it cannot be the other member).
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=30), wait_for_workers=False)
    status, reply = call(url, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
        "group_name": "old", "backend": "gloo"}, timeout_s=60)
    del store
    assert status == 400 and "already been created" in reply["message"], reply

    new = join_group(url, "new", free_port())
    try:
        norm = torch.full((576,), 0.5)
        assert call(url, "/begin_weight_update", {})[0] == 200
        update, landed = post_norm_update(url, "new", weight_version="new-group")
        dist.broadcast(norm.view(torch.uint8), src=0, group=new)
        update.join(timeout=30)
        assert landed and landed[0][0] == 200, landed
        assert call(url, "/end_weight_update", {})[0] == 200
        assert receiving.is_alive(), "the old receive should still wait (it is what the new group must not queue on)"
        status, weights = call(url, "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 576})
        assert status == 200 and weights == norm.tolist()
        assert generate(url)["meta_info"]["weight_version"] == "new-group"

        receiving.join(timeout=receive_timeout_s + 30)
        assert not receiving.is_alive() and stuck[0][0] == 400, stuck  # the last resort still bounds it
        assert time.monotonic() - posted < receive_timeout_s + 20
        assert call(url, "/destroy_weights_update_group", {"group_name": "new"})[0] == 200
    finally:
        dist.destroy_process_group(new)
        dist.destroy_process_group(old)


@pytest.mark.parametrize("bucket_bytes,kill_at,fixed_port", [(1 << 20, 30, False), (128 << 20, -1, False),
                                                             (1 << 20, 30, True), (128 << 20, -1, True)],
                         ids=["small-buckets", "on-the-wire", "small-buckets-fixed-port", "on-the-wire-fixed-port"])
def test_a_server_killed_mid_push_fails_the_push_fast_and_the_next_one_lands_on_the_survivor(
        server_launcher: Any, model_dir: Path, bucket_bytes: int, kill_at: int, fixed_port: bool) -> None:
    """Two servers; the first member is SIGKILLed mid-push (and the push waits until it is gone): with many small
    buckets once a few landed, with 128 MiB buckets while the first is on the wire (the last tensor is read while it
    is broadcast), where our own side of the broadcast hangs. Gloo would hold that broadcast, or the survivor's
    receive, until the group's timeout; the push must instead fail within seconds of the death, leave the survivor
    generating, and the next push re-forms (a new group name) over the survivor and lands there. With a fixed
    rendezvous port (learner.push_master_port, as `ssp launch` sets it), every group binds that port, while the
    abandoned group, held by its stuck broadcast, may still hold its store there."""
    from safetensors.torch import load_file

    from ssp.learner.push import WeightPusher
    from ssp.learner.push_recovery import PushInterrupted, RecoveringPusher
    from ssp.processes import free_port

    push_timeout_s = 300.0
    victim = server_launcher(["--model", str(model_dir), "--port", "0", "--set", "serving.context_length=1024"])
    survivor = start_server(server_launcher, model_dir)
    state = load_file(str(model_dir / "model.safetensors"))
    master_port = free_port() if fixed_port else 0

    def make_pusher(urls: list[str]) -> WeightPusher:
        return WeightPusher(urls, backend="gloo", bytes_per_bucket=bucket_bytes, timeout_s=push_timeout_s,
                            master_port=master_port)

    def killing_mid_push() -> Any:
        for i, item in enumerate(state.items()):
            if i == kill_at % len(state):
                victim.kill()  # SIGKILL, and waits until it is gone
            yield item

    pusher = RecoveringPusher([victim.url, survivor], make_pusher=make_pusher, api_key=None, wait_s=60)
    try:
        pusher.connect()
        outcome: list[BaseException | None] = []

        def push() -> None:
            try:
                pusher.push(killing_mid_push(), version="cut")
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001 - checked below
                outcome.append(e)

        started = time.monotonic()
        pushing = threading.Thread(target=push, daemon=True)
        pushing.start()
        pushing.join(timeout=30)
        failed_after_s = time.monotonic() - started
        assert not pushing.is_alive(), f"the push still waits {failed_after_s:.0f} s after the kill (its timeout: " \
                                       f"{push_timeout_s:g} s)"
        assert isinstance(outcome[0], PushInterrupted), outcome
        t0 = time.monotonic()
        assert generate(survivor, timeout_s=30)["meta_info"]["weight_version"] == "default"
        assert time.monotonic() - t0 < 5.0, "the survivor was left paused"

        state["model.norm.weight"] = state["model.norm.weight"] * 1.5
        stats = pusher.push(iter(state.items()), version="after-kill")
        assert stats.tensors == len(state)
        assert pusher.members == [survivor] and pusher.reforms == 1
        assert call(survivor, "/model_info")[1]["weight_version"] == "after-kill"
        status, norm = call(survivor, "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 576})
        assert status == 200 and norm == state["model.norm.weight"].tolist()
        assert generate(survivor)["meta_info"]["weight_version"] == "after-kill"
    finally:
        pusher.close()


def test_a_restarted_learner_destroys_the_group_a_dead_one_re_formed(server_launcher: Any, model_dir: Path,
                                                                     tmp_path: Path) -> None:
    """Learner A (its own process) loses one of two servers, re-forms its group as "<base>-1" over the survivor,
    pushes, and is SIGKILLed. Learner B starts from the base name again; its reset must destroy A's "<base>-1" too
    (listed in the survivor's /server_info), not only "<base>", or the survivor keeps a group with sockets to a dead
    store until it restarts."""
    from safetensors.torch import load_file

    from ssp.learner.push import WeightPusher
    from ssp.learner.push_recovery import RecoveringPusher

    victim = server_launcher(["--model", str(model_dir), "--port", "0", "--set", "serving.context_length=1024"])
    survivor = start_server(server_launcher, model_dir, "serving.weight_update_idle_timeout_s=0")
    with (tmp_path / "learner_a.log").open("w") as log:
        learner_a = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "reformed_pusher.py"), str(model_dir), victim.url, survivor],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            cwd=Path(__file__).resolve().parents[2])
        try:
            assert learner_a.stdout is not None
            assert learner_a.stdout.readline().strip() == "connected", (tmp_path / "learner_a.log").read_text()
            victim.kill()
            out, _ = learner_a.communicate("go\n", timeout=300)
        finally:
            learner_a.kill()
    assert learner_a.returncode == -9 and "pushed as weight_update_group-1" in out, \
        out + (tmp_path / "learner_a.log").read_text()[-3000:]
    assert call(survivor, "/server_info")[1]["weight_update_groups"] == ["weight_update_group-1"]

    state = load_file(str(model_dir / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"] * 1.5

    def make_pusher(urls: list[str]) -> WeightPusher:
        return WeightPusher(urls, backend="gloo", bytes_per_bucket=4 << 20, timeout_s=60)

    learner_b = RecoveringPusher([victim.url, survivor], make_pusher=make_pusher, api_key=None, wait_s=60)
    try:
        learner_b.connect()
        learner_b.push(iter(state.items()), version="learner-b")
        assert learner_b.current_group == "weight_update_group"
        assert call(survivor, "/server_info")[1]["weight_update_groups"] == ["weight_update_group"]
        assert call(survivor, "/model_info")[1]["weight_version"] == "learner-b"
        status, norm = call(survivor, "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 576})
        assert status == 200 and norm == state["model.norm.weight"].tolist()
        assert generate(survivor)["meta_info"]["weight_version"] == "learner-b"
    finally:
        learner_b.close()
    assert call(survivor, "/server_info")[1]["weight_update_groups"] == []
