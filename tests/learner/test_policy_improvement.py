"""The RL loop improves a policy: on a one-step bandit, the real learner (Trainer, loss, advantages, batching)
raises the probability of rewarded responses, and its controls behave.

The bandit: a fixed prompt, a one-token response sampled from the current policy (the model's own forward and
softmax), reward 1 when the token falls in a set S whose initial probability is about 0.1. What this file proves:
- the solver path (GRPO groups) and the proposer path (REINFORCE with the batch-mean baseline) raise P(S | prompt)
  past a threshold within a fixed number of steps, and a negated reward lowers it;
- a constant reward leaves P(S) inside a noise band (its advantages are exactly 0; only weight decay moves weights);
- tokens under loss mask 0 (tool spans) contribute exactly nothing: the weights after a step are bit-identical
  whatever those tokens' rollout logprobs and (for a trailing span) ids are;
- samples from a policy several versions old, with that policy's logprobs as behaviour logprobs, still improve it;
- over the real path (TCP stream -> ssp.learner.trainer.run -> weight push to the reference server), the server's own
  P(S), re-sampled from after every push, rises with the learner's and equals it after the last push.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from learner_tiny import EngineStream

from ssp.engine.config import StreamConfig
from ssp.engine.trajectory import Trajectory
from ssp.engine.wire import Terms, terms_of
from ssp.learner.config import LearnerConfig
from ssp.learner.model import ModelShape, Parallel, build_model
from ssp.learner.trainer import StepResult, Trainer
from ssp.run_key import write_run_key

VOCAB_DIVISOR = 8
"""The tiny model's vocab (250) padded to 256: the padded logits exist and must stay masked."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Bandit:
    """A fixed prompt; a one-token response is rewarded when it falls in `rewarded` (the set S)."""

    prompt: list[int]
    rewarded: frozenset[int]


TINY_BANDIT = Bandit(prompt=[11, 42, 7, 99], rewarded=frozenset(range(0, 250, 10)))
"""S: 25 of the tiny model's 250 tokens. Its random init is near uniform (max token prob 0.006), so P(S) starts at
0.100: small enough that rising past RISE_TO is learning, large enough that a batch of SAMPLES_PER_STEP holds
about 3 rewarded samples (GRPO needs groups with mixed rewards)."""
LR = 1e-2
"""Adam moves each weight by about LR per step. 1e-2 takes the tiny model's P(S) from 0.1 past 0.9 in 15-20
steps; 1e-3 moves it only ~0.003 per step, 3e-2 makes the stale runs oscillate."""
SAMPLES_PER_STEP = 32
"""Solver: 4 GRPO groups of 8; proposer: 32 groups of one proposer each (the batch-mean baseline spans them)."""
SOLVER_GROUP_SIZE = 8
STEPS = 20
"""Optimizer steps of an on-policy run (~0.3 s on one CPU thread). Over seeds 0-9 P(S) after 20 steps was
0.978-0.999 (rewarded) and 0.002-0.013 (negated): both thresholds below hold with a wide margin."""
RISE_TO = 0.6
"""P(S) must end above this (from 0.100): a 6x rise, far outside sampling noise."""
FALL_TO = 0.03
"""Under the negated reward P(S) must end below this (from 0.100). The solver falls slowest: as P(S) shrinks,
more GRPO groups hold no rewarded sample and are dropped as zero-variance."""
CONSTANT_BAND = 1e-3
"""With a constant reward |P(S) after - before| must stay under this. The advantages are exactly 0, so only
weight decay (lr x 0.01 per step) moves the weights: measured 3.7e-6 over STEPS. Without the baseline (advantage
= reward) each sampled token pushes itself up and P(S) random-walks: measured |change| 3e-4 to 0.6, above 1e-3
in 8 of 10 seeds (seed 0: 0.064)."""
STALENESS = 3
"""Samples come from the policy this many versions behind the learner (the engine running 3 pushes ahead)."""
STALE_STEPS = 30
"""Stale runs learn slower: the PPO clip against the old behaviour logprobs cuts much of each step (clip_frac up
to 0.8-0.9). Over seeds 0-9 P(S) after 30 steps was 0.870-0.986 (solver) and 0.969-0.993 (proposer)."""
STALE_RISE_TO = 0.6
"""The stale runs must cross the same bar as on-policy ones, given STALE_STEPS instead of STEPS."""
SEED = 0
"""Sampling seed of every bandit run (the thresholds above were checked on seeds 0-9)."""


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One CPU thread: fixed reduction order (bit-identical runs) and no contention with other tests' processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(**overrides: Any) -> LearnerConfig:
    return LearnerConfig(lr=LR, warmup_steps=0, vocab_divisor=VOCAB_DIVISOR, **overrides)


def _load_model(model_dir: Path, par: Parallel, *,
                vocab_divisor: int = VOCAB_DIVISOR) -> tuple[ModelShape, torch.nn.Module]:
    from ssp.learner.convert import load_hf_into_model

    shape = ModelShape.from_dir(model_dir)
    model = build_model(shape, par, vocab_divisor=vocab_divisor)
    load_hf_into_model(model, model_dir, shape, tp=1, tp_rank=0, vocab_divisor=vocab_divisor)
    return shape, model


def _trainer(model_dir: Path, par: Parallel, cfg: LearnerConfig) -> Trainer:
    shape, model = _load_model(model_dir, par)
    return Trainer(cfg, par, shape, model, None)


@torch.no_grad()
def _next_token_logprobs(model: torch.nn.Module, vocab_size: int, prompt: list[int]) -> torch.Tensor:
    """log pi(. | prompt) over the real vocab (V,), from the model's own forward (fp32 on CPU)."""
    from ssp.learner.logprobs import mask_padded_vocab

    ids = torch.tensor([prompt])
    logits = model(ids, torch.arange(len(prompt))[None], None)
    return torch.log_softmax(mask_padded_vocab(logits, vocab_size)[0, -1].float(), dim=-1)[:vocab_size]


def _prob_of_rewarded(model: torch.nn.Module, vocab_size: int, bandit: Bandit) -> float:
    """P(S | prompt): the exact probability mass of the rewarded set, no sampling noise."""
    return _next_token_logprobs(model, vocab_size, bandit.prompt)[sorted(bandit.rewarded)].exp().sum().item()


def _sample(model: torch.nn.Module, vocab_size: int, bandit: Bandit, n: int,
            gen: torch.Generator) -> list[tuple[int, float]]:
    """n one-token responses from the model and their exact logprobs (what a rollout server would return)."""
    logprobs = _next_token_logprobs(model, vocab_size, bandit.prompt)
    tokens = torch.multinomial(logprobs.exp(), n, replacement=True, generator=gen)
    return [(t, logprobs[t].item()) for t in tokens.tolist()]


def _groups(bandit: Bandit, samples: list[tuple[int, float]], role: str, step: int, version: int,
            reward_of: dict[bool, float]) -> list[list[Trajectory]]:
    """Solver: GRPO groups of SOLVER_GROUP_SIZE sharing a group id; proposer: one proposer per group."""
    size = SOLVER_GROUP_SIZE if role == "solver" else 1
    trajectories = [Trajectory(role=role, group_id=f"s{step}-g{i // size}", prompt_ids=bandit.prompt,
                               response_ids=[token], loss_mask=[1], rollout_logprobs=[logprob],
                               policy_versions=[version], reward=reward_of[token in bandit.rewarded])
                    for i, (token, logprob) in enumerate(samples)]
    return [trajectories[i:i + size] for i in range(0, len(trajectories), size)]


@dataclass(frozen=True, kw_only=True, slots=True)
class BanditRun:
    """P(S) before each step and after the last (steps + 1 values), and what each step did."""

    prob: list[float]
    steps: list[StepResult]

    def describe(self) -> str:
        """The P(S) trajectory, for assertion messages."""
        return "P(S) per step: " + " ".join(f"{p:.3f}" for p in self.prob)


REWARD_S = {True: 1.0, False: 0.0}
"""Reward by whether the sampled token is in S."""
NEGATED = {True: -1.0, False: 0.0}
CONSTANT = {True: 1.0, False: 1.0}
"""Nonzero, so a missing baseline would turn it into a positive advantage for every sample."""


def _run_bandit(trainer: Trainer, role: str, *, reward_of: dict[bool, float], steps: int = STEPS,
                staleness: int = 0, seed: int = SEED) -> BanditRun:
    """`steps` optimizer steps, each on SAMPLES_PER_STEP fresh samples drawn from the policy `staleness` versions
    behind the learner (version max(step - staleness, 0), kept as frozen weight snapshots) with that policy's
    logprobs as the behaviour logprobs. `reward_of[token in S]` is each sample's reward."""
    gen = torch.Generator().manual_seed(seed)
    vocab = trainer.shape.vocab_size
    snapshots = [{n: p.detach().clone() for n, p in trainer.model.named_parameters()}]
    behaviour = build_model(trainer.shape, trainer.par, vocab_divisor=VOCAB_DIVISOR)  # weights: from snapshots
    prob = [_prob_of_rewarded(trainer.model, vocab, TINY_BANDIT)]
    results = []
    for step in range(steps):
        version = max(step - staleness, 0)
        with torch.no_grad():
            for name, p in behaviour.named_parameters():
                p.copy_(snapshots[version][name])
        samples = _sample(behaviour, vocab, TINY_BANDIT, SAMPLES_PER_STEP, gen)
        groups = _groups(TINY_BANDIT, samples, role, step, version, reward_of)
        results.append(trainer.train_step(groups, policy_version=step))
        snapshots.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
        prob.append(_prob_of_rewarded(trainer.model, vocab, TINY_BANDIT))
    return BanditRun(prob=prob, steps=results)


ROLES = ["solver", "proposer"]
"""solver: GRPO over groups sharing a group id; proposer: REINFORCE with the batch-mean baseline
(train_roles names only the role under test, so each path is exercised alone)."""


@pytest.mark.parametrize("role", ROLES)
def test_rewarded_set_gains_probability(role: str, tiny_llama: Path, par1: Parallel) -> None:
    """Reward 1 in S: P(S) goes from 0.100 past RISE_TO within STEPS on-policy steps."""
    run = _run_bandit(_trainer(tiny_llama, par1, _config(train_roles=(role,))), role, reward_of=REWARD_S)
    assert run.prob[0] == pytest.approx(0.1, abs=0.01), run.describe()
    assert run.prob[-1] > RISE_TO, run.describe()


@pytest.mark.parametrize("role", ROLES)
def test_negated_reward_loses_probability(role: str, tiny_llama: Path, par1: Parallel) -> None:
    """Reward -1 in S: the same loop drives P(S) below FALL_TO (the sign of the update follows the reward's)."""
    run = _run_bandit(_trainer(tiny_llama, par1, _config(train_roles=(role,))), role, reward_of=NEGATED)
    assert run.prob[-1] < FALL_TO, run.describe()


@pytest.mark.parametrize("role", ROLES)
def test_constant_reward_stays_within_noise(role: str, tiny_llama: Path, par1: Parallel) -> None:
    """A real optimizer step with all-zero advantages each time. For the solver that needs
    drop_zero_variance_groups=False: by default every group (all rewards equal) is dropped and no step runs."""
    cfg = _config(train_roles=(role,), drop_zero_variance_groups=False)
    run = _run_bandit(_trainer(tiny_llama, par1, cfg), role, reward_of=CONSTANT)
    assert all(r.trained and r.metrics["samples"] == SAMPLES_PER_STEP and r.metrics["grad_norm"] == 0.0
               for r in run.steps)
    assert abs(run.prob[-1] - run.prob[0]) < CONSTANT_BAND, run.describe()


@pytest.mark.parametrize("role", ROLES)
def test_samples_from_a_stale_policy_still_improve_it(role: str, tiny_llama: Path, par1: Parallel) -> None:
    """The behaviour logprobs are the old policy's, so the PPO ratio against them is live (clip_frac > 0)."""
    run = _run_bandit(_trainer(tiny_llama, par1, _config(train_roles=(role,))), role, reward_of=REWARD_S,
                      steps=STALE_STEPS, staleness=STALENESS)
    trained = {step: r.metrics for step, r in enumerate(run.steps) if r.trained}
    assert all(m["staleness_max"] == min(step, STALENESS) for step, m in trained.items())
    assert max((m["clip_frac"] for m in trained.values()), default=0.0) > 0
    assert run.prob[-1] > STALE_RISE_TO, run.describe()


RESPONSE_MASK = [1, 1, 0, 0, 0, 1, 1, 1, 0, 0]
"""A response with a tool span inside (positions 2-4) and one at the end (8-9), as when a search result closes it."""
TOOL_REWARDS = [1.0, 0.0, 0.0, 1.0]
"""One GRPO group: two positive and two negative advantages, so both branches of the PPO clip are exercised."""


@torch.no_grad()
def _response_logprobs(model: torch.nn.Module, vocab_size: int, response: list[int]) -> list[float]:
    """log pi(response_j | TINY_BANDIT.prompt + response_<j) for every response token (the model's own forward)."""
    from ssp.learner.logprobs import mask_padded_vocab

    ids = torch.tensor([TINY_BANDIT.prompt + response])
    n = ids.shape[1] - 1
    logits = mask_padded_vocab(model(ids[:, :-1], torch.arange(n)[None], None), vocab_size)
    logprobs = torch.log_softmax(logits[0, len(TINY_BANDIT.prompt) - 1:].float(), dim=-1)
    return logprobs.gather(-1, ids[0, len(TINY_BANDIT.prompt):, None])[:, 0].tolist()


def _tool_span_group(model_dir: Path, par: Parallel, *, masked_variant: bool,
                     loss_token_shift: float = 0.0) -> list[list[Trajectory]]:
    """The group with loss tokens' rollout logprobs exact (PPO ratio 1: every loss token carries gradient).

    Masked tokens carry the engine's placeholders (logprob 0.0, version -1); `masked_variant` instead gives them
    their exact logprobs (ratio 1: they WOULD carry gradient if the mask were ignored) and other ids in the trailing
    span (a changed id inside the response would change the context of later loss tokens, a legitimate change).
    `loss_token_shift` moves one loss token's rollout logprob: the control that the comparison sees loss tokens."""
    shape, model = _load_model(model_dir, par)
    gen = torch.Generator().manual_seed(SEED)
    group = []
    for i, reward in enumerate(TOOL_REWARDS):
        response = torch.randint(shape.vocab_size, (len(RESPONSE_MASK),), generator=gen).tolist()
        if masked_variant:
            response[-2:] = [(t + 1 + i) % shape.vocab_size for t in response[-2:]]
        exact = _response_logprobs(model, shape.vocab_size, response)
        rollout = [lp if m or masked_variant else 0.0 for lp, m in zip(exact, RESPONSE_MASK)]
        if i == 0:
            rollout[0] += loss_token_shift
        group.append(Trajectory(role="solver", group_id="tool-spans", prompt_ids=TINY_BANDIT.prompt,
                                response_ids=response, loss_mask=RESPONSE_MASK, rollout_logprobs=rollout,
                                policy_versions=[0 if m else -1 for m in RESPONSE_MASK], reward=reward))
    return [group]


def _weights_after_one_step(model_dir: Path, par: Parallel, cfg: LearnerConfig,
                            groups: list[list[Trajectory]]) -> dict[str, torch.Tensor]:
    trainer = _trainer(model_dir, par, cfg)
    assert trainer.train_step(groups, policy_version=0).trained
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_masked_tool_tokens_contribute_exactly_nothing(aggregation: str, tiny_llama: Path, par1: Parallel) -> None:
    """Two batches that differ only in what sits under loss mask 0 give bit-identical weights after a step; a
    0.05 change of one loss token's rollout logprob does not (so the comparison can see a loss token)."""
    cfg = _config(loss=replace(LearnerConfig().loss, aggregation=aggregation))
    engine = _weights_after_one_step(tiny_llama, par1, cfg, _tool_span_group(tiny_llama, par1, masked_variant=False))
    masked = _weights_after_one_step(tiny_llama, par1, cfg, _tool_span_group(tiny_llama, par1, masked_variant=True))
    changed = [n for n in engine if not torch.equal(engine[n], masked[n])]
    assert not changed, f"content under loss mask 0 changed {len(changed)} tensors, e.g. {changed[:3]}"
    shifted = _weights_after_one_step(tiny_llama, par1, cfg, _tool_span_group(
        tiny_llama, par1, masked_variant=False, loss_token_shift=0.05))
    assert any(not torch.equal(engine[n], shifted[n]) for n in engine)


REAL_PROMPT = "My favourite colour is"
REAL_REWARDED_WORDS = (" red", " white", " black", " gold", " green", " purple")
"""S for SmolLM2: colours other than its favourite " blue" (0.106); together 0.166 of the next-token mass."""
REAL_STEPS = 3
"""Optimizer steps (each: rollouts from the server, a step, a push). A step of the 135M model takes ~4 s on one
CPU thread and a push ~0.6 s; with loading, the initial push and the final checkpoint the test takes ~35-45 s."""
REAL_LR = 1e-5
"""Adam's first steps move every weight by ~lr: 1e-5 raises the server's P(S) by ~0.1 per step (measured 0.165 ->
0.276 -> 0.372 -> 0.470), smoothly."""
REAL_SAMPLES_PER_STEP = 16
"""Two GRPO groups of 8 server rollouts per step (groups_per_step = 2)."""
REAL_RISE_TO = 0.3
"""The server's P(S) after REAL_STEPS pushes must exceed this (from 0.166): nearly double, where one step's
sampling noise moves it by a few hundredths."""
LOGPROB_TOL = 1e-4
"""Server and learner compute the same fp32 model on CPU; their logprobs agree to ~1e-6 (test_push.py)."""


def _post(url: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _weight_version(url: str) -> str:
    with urllib.request.urlopen(url + "/model_info", timeout=30) as resp:
        return json.loads(resp.read())["weight_version"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerRollouts:
    """One batch of one-token rollouts from the server, and what the server said about them."""

    samples: list[tuple[int, float]]
    """(token, the server's logprob of it), as the engine streams them."""
    prob: float
    """The server's P(S | prompt): the sum of its probabilities of every token of S at the sampled position."""
    versions: set[str]
    """The weight versions the server reported for the batch."""


def _server_rollouts(url: str, bandit: Bandit, *, seed: int, n: int) -> ServerRollouts:
    """n one-token rollouts sampled by the server, with seeds seed..seed + n - 1 (reproducible batches)."""
    outs = _post(url, "/generate", {
        "input_ids": [bandit.prompt] * n, "return_logprob": True, "token_ids_logprob": sorted(bandit.rewarded),
        "sampling_params": [{"temperature": 1.0, "max_new_tokens": 1, "ignore_eos": True, "sampling_seed": seed + i}
                            for i in range(n)]})
    return ServerRollouts(
        samples=[(o["output_ids"][0], o["meta_info"]["output_token_logprobs"][0][0]) for o in outs],
        prob=sum(math.exp(lp) for lp, _, _ in outs[0]["meta_info"]["output_token_ids_logprobs"][0]),
        versions={o["meta_info"]["weight_version"] for o in outs})


def _play_engine(port: int, terms: Terms, url: str, bandit: Bandit, server_prob: list[float],
                 errors: list[BaseException], timeout_s: float = 300.0) -> None:
    """The engine's part of the loop: for each version 0..REAL_STEPS, wait until the server has it, sample there,
    record the server's P(S), and stream the rewarded rollouts to the learner (not after the last push). Closing
    the connection ends the learner's stream, also on failure (so run() never waits for frames that won't come)."""
    engine: EngineStream | None = None
    try:
        engine = EngineStream(port, terms)  # the real engine's handshake and frames
        deadline = time.monotonic() + timeout_s
        for version in range(REAL_STEPS + 1):
            while _weight_version(url) != str(version):
                assert time.monotonic() < deadline, f"the server never reached weight version {version}"
                time.sleep(0.05)
            rollouts = _server_rollouts(url, bandit, seed=1000 * version, n=REAL_SAMPLES_PER_STEP)
            assert rollouts.versions == {str(version)}, rollouts.versions
            server_prob.append(rollouts.prob)
            if version < REAL_STEPS:
                for group in _groups(bandit, rollouts.samples, "solver", version, version, REWARD_S):
                    engine.send(group)
    except BaseException as e:  # re-raised by the test thread
        errors.append(e)
    finally:
        if engine is not None:
            engine.close()


@pytest.mark.slow
def test_server_policy_improves_through_stream_and_push(model_dir: Path, ref_server: str, par1: Parallel,
                                                         tmp_path: Path) -> None:
    """The whole loop: server rollouts -> TCP stream -> ssp.learner.trainer.run -> push -> the next rollouts from the
    pushed weights. The server's P(S) rises past REAL_RISE_TO, the learner recomputes every rollout's logprob as
    the server sampled it, and its final checkpoint has exactly the server's final P(S)."""
    from transformers import AutoTokenizer

    from ssp.learner.trainer import run
    from ssp.metrics import read_metrics

    tok = AutoTokenizer.from_pretrained(model_dir)
    words = [tok(w, add_special_tokens=False)["input_ids"] for w in REAL_REWARDED_WORDS]
    assert all(len(ids) == 1 for ids in words), words
    bandit = Bandit(prompt=tok(REAL_PROMPT, add_special_tokens=False)["input_ids"],
                    rewarded=frozenset(ids[0] for ids in words))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # drop_zero_variance_groups=False: a step whose groups all lack a rewarded sample still trains (A = 0) and
    # pushes, so the engine's wait for the next version always ends.
    cfg = LearnerConfig(model_dir=model_dir, out_dir=tmp_path / "run", groups_per_step=2, lr=REAL_LR,
                        warmup_steps=0, max_steps=REAL_STEPS, checkpoint_every=0, keep_checkpoints=1,
                        drop_zero_variance_groups=False, push_bytes_per_bucket=64 << 20, push_timeout_s=120)
    original_version = _weight_version(ref_server)
    server_prob: list[float] = []
    errors: list[BaseException] = []
    stream = StreamConfig(key_file=write_run_key(tmp_path / "stream.key"))
    engine = threading.Thread(target=_play_engine, args=(port, terms_of(stream), ref_server, bandit, server_prob,
                                                         errors), daemon=True)
    engine.start()
    try:
        assert run(cfg, f"tcp://127.0.0.1:{port}", [ref_server], stream) == 0
        engine.join(timeout=60)
    finally:  # restore the session-shared server's weights and version
        restored = _post(ref_server, "/update_weights_from_disk", {"model_path": str(model_dir),
                                                                   "weight_version": original_version})
        assert restored["success"], restored
    if errors:
        raise errors[0]
    assert len(server_prob) == REAL_STEPS + 1
    steps = [r for r in read_metrics(cfg.out_dir / "metrics.jsonl") if not r.get("initial_push")]
    assert [r["step"] for r in steps] == list(range(1, REAL_STEPS + 1))
    assert all(r["logprob_mismatch_max"] < LOGPROB_TOL and r["staleness_max"] == 0 for r in steps), steps

    shape, model = _load_model(model_dir, par1, vocab_divisor=cfg.vocab_divisor)
    learner_before = _prob_of_rewarded(model, shape.vocab_size, bandit)
    trained = torch.load(cfg.out_dir / "checkpoints" / f"step-{REAL_STEPS:06d}" / "tp0.pt", weights_only=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(trained["model"][name])
    learner_after = _prob_of_rewarded(model, shape.vocab_size, bandit)
    described = f"server P(S) per version {[round(p, 4) for p in server_prob]}, learner {learner_before:.4f} -> " \
                f"{learner_after:.4f}"
    assert server_prob[0] == pytest.approx(learner_before, abs=LOGPROB_TOL), described
    assert server_prob[-1] > REAL_RISE_TO, described
    assert server_prob[-1] == pytest.approx(learner_after, abs=LOGPROB_TOL), described
    after_restore = _server_rollouts(ref_server, bandit, seed=0, n=1)
    assert after_restore.prob == pytest.approx(server_prob[0], abs=1e-6), "the server's weights were not restored"
