"""The simulated learner: its timing formula (profile [learner]) and how it consumes the trajectory stream."""

import asyncio

import pytest

from ssp.bench.sim_learner import SimClock, SimLearner, learner_step_s, push_s, steady_rate
from ssp.engine.stream import encode_frame
from ssp.engine.trajectory import Role, Trajectory, pack_group
from ssp.serving.sim_profile import load_profile


def test_step_time_matches_the_profile_note() -> None:
    """The profile's note: 3.33 M tokens of the 7B model on 8 H100 take 87.3 s of FLOPs + 1.9 s fixed, about 89 s
    (the push is not in fixed_s: benches add the modeled push once)."""
    p = load_profile()
    t = learner_step_s(p.learner, flops_per_token=p.model.flops_per_token, tokens=3_330_000, gpus=8)
    assert t == pytest.approx(89.2, abs=0.5)


def test_step_time_is_linear_in_tokens_over_gpus() -> None:
    p = load_profile()
    fixed = p.learner.fixed_s

    def var(tokens: int, gpus: int) -> float:
        return learner_step_s(p.learner, flops_per_token=p.model.flops_per_token, tokens=tokens, gpus=gpus) - fixed

    assert var(0, 4) == pytest.approx(0.0)
    assert var(2_000_000, 8) == pytest.approx(2 * var(1_000_000, 8))
    assert var(1_000_000, 16) == pytest.approx(var(1_000_000, 8) / 2)
    with pytest.raises(ValueError, match="gpus = 0"):
        learner_step_s(p.learner, flops_per_token=1.0, tokens=1, gpus=0)


def test_push_time_is_the_sim_servers_model() -> None:
    """7B: pause 50 ms + 15.23 GB / 20 GB/s + 29 buckets x 10 ms + resume 50 ms."""
    assert push_s(load_profile()) == pytest.approx(0.05 + 15.23 / 20 + 29 * 0.010 + 0.05, rel=1e-6)


def _traj(role: Role, gid: str, n_prompt: int, n_resp: int) -> Trajectory:
    return Trajectory(role=role, group_id=gid, prompt_ids=[1] * n_prompt, response_ids=[2] * n_resp,
                      loss_mask=[1] * n_resp, rollout_logprobs=[0.0] * n_resp, policy_versions=[0] * n_resp,
                      reward=1.0)


async def test_learner_trains_per_step_pushes_then_releases_the_version() -> None:
    p = load_profile()
    calls: list[str] = []

    async def push(v: int) -> None:
        calls.append(f"push {v}")

    async def on_version(v: int) -> None:
        calls.append(f"version {v}")

    clock = SimClock(time_scale=1e6)  # a learner step of ~3 simulated seconds takes ~3 us here
    learner = SimLearner(p, gpus=2, episodes_per_step=2, clock=clock, push=push, on_version=on_version)
    run = asyncio.create_task(learner.run(steps=2))
    for k in range(4):
        group = [_traj("proposer", f"g{k}", 10, 5), _traj("verifier", f"g{k}", 100, 3),
                 *[_traj("solver", f"g{k}", 4, 6) for _ in range(k % 2)]]
        await learner.write(encode_frame(pack_group(group), 1 << 20))
        await asyncio.sleep(0)
    steps = await asyncio.wait_for(run, 5)
    assert calls == ["push 1", "version 1", "push 2", "version 2"]
    # Verifier records are not trained: step 1 = g0 (1 proposer) + g1 (1 proposer + 1 solver).
    assert [(s.version, s.groups, s.trajectories, s.tokens) for s in steps] == [(1, 2, 3, 40), (2, 2, 3, 40)]
    assert steps[0].train_s == pytest.approx(learner.step_s(40))
    assert steady_rate(steps, warmup=1) == pytest.approx(3 / (steps[1].ended_at - steps[0].ended_at))
    with pytest.raises(ValueError, match="warmup"):
        steady_rate(steps, warmup=2)


async def test_learner_drops_groups_beyond_max_staleness_as_the_real_learner_does() -> None:
    """Step 2 trains version 1: there a group sampled at version 0 is 1 version old, beyond max_staleness 0, and is
    dropped; the one sampled at version 1 is trained. A dropped group costs no training time and trains nothing."""
    async def noop(v: int) -> None:
        pass

    learner = SimLearner(load_profile(), gpus=2, episodes_per_step=2, clock=SimClock(time_scale=1e6), push=noop,
                         on_version=noop)
    run = asyncio.create_task(learner.run(steps=2, max_staleness=0))
    for k, version in enumerate([0, 0, 0, 1]):
        t = _traj("proposer", f"g{k}", 10, 5)
        t.policy_versions = [version] * 5
        await learner.write(encode_frame(pack_group([t]), 1 << 20))
        await asyncio.sleep(0)
    steps = await asyncio.wait_for(run, 5)
    assert [(s.staleness_max, s.dropped_groups, s.trajectories, s.tokens) for s in steps] == [(0, 0, 2, 30),
                                                                                              (1, 1, 1, 15)]
