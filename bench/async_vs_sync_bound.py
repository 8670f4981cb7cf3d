"""Bounds of `ssp bench async-vs-sync`: the fastest each schedule could train, in trained trajectories per simulated
second, from the profile's formulas and the token counts of the very groups the run trained. A measured rate over
its bound is the schedule's efficiency; below ~90% the harness (host time counted on the simulated clock) or the
schedule wastes the GPUs, and the report says which by the per-phase clock guard.

Per rollout the groups give two costs (`RolloutCost`):
    chain  the rollout alone on a server: each generated token one decode step at batch 1 (a + b + c*context), each
           tool block prefilled at the profile's rate. Nothing can finish it faster, whatever else runs.
    work   its share of a server at full batch (the server's slot cap, bounded by KV): per generated token
           a/B + b + c*context (+ the eager penalty above the CUDA-graph cap), plus its prefilled tokens (a group's
           shared prompt once, as the prefix cache allows).

Schedules:
    sync       per step, each phase (propose, verify, solve) ends no sooner than its longest chain nor than its
               work spread over the n servers: sum over phases of max(chain, work / n), then training on G GPUs,
               then one push.
    lock-step  per step (eta 0, no phase barriers): max(longest episode chain = proposer + verifier + solver chains,
               work / n), then training on G GPUs, then one push.
    async      servers and learner overlap: min(servers and deadlines, learner rate). Server rate at a load of n
               requests per server: g servers, per step the groups' decode work at batch n plus the prefill the
               servers actually did (their own counters, priced by the profile: recompute of retracted or flushed
               contexts and prefix-cache misses under load included; never less than the groups' own prefill), and
               one push during which they are paused. Deadline rate at load n: an episode started on version v must
               be trained by version v + eta, so the learner reaches v + eta + 1 no sooner than the longest episode
               started on v has run (its critical path, each decode step at load n: a + b*n + c*n*context) and
               been trained and pushed; eta + 1 steps take at least that, per start version. Each step of that
               path also carries the prefill that the other n - 1 requests on its server bring in (the workload's
               prefill seconds per decoded token, as the servers measured them, times n - 1): a server that keeps n
               requests running prefills their successors in the same steps. A fuller server decodes
               more per second but runs the longest episode slower, so the servers' side is the best load n of
               min(server rate, deadline rate); at n = the slot cap with the deadline slack it is the full-batch
               server rate. Learner rate: training on G - g GPUs plus one push.
The push is the profile's weight-update model, once per step (the profile's learner fixed_s excludes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ssp.bench.sim_learner import TRAINED_ROLES, learner_step_s, push_s
from ssp.learner.batching import oldest_trained_version
from ssp.serving.sim_profile import SimProfile

PHASES = {"proposer": "propose", "verifier": "verify", "solver": "solve"}
"""The sync phase each role's rollouts run in."""


@dataclass(frozen=True, slots=True)
class Costs:
    """The profile's per-token costs at a server's full batch."""

    profile: SimProfile
    batch: int
    """Requests decoded together at full load: the slot cap, bounded by max_running_requests and by KV."""
    mean_context: float = 0.0
    """Mean context of a decoded token over the run: what each request of a batch adds to a step's KV reads."""

    @classmethod
    def at_capacity(cls, profile: SimProfile, slots: int, mean_context: float) -> Costs:
        s = profile.server
        batch = max(1, min(slots, s.max_running_requests, int(s.kv_capacity_tokens // max(1.0, mean_context))))
        return cls(profile, batch, mean_context)

    def step_s(self, batch: int) -> float:
        """One decode step of a server running `batch` requests of the run's mean context: what each of them waits
        per generated token."""
        return batch * self.decode_token_s(self.mean_context, batch=batch)

    def fixed_share_s(self, batch: int) -> float:
        """The part of one token's share of a step that depends on the batch: the step's fixed cost over it (the
        eager penalty above the CUDA-graph cap included)."""
        d, s = self.profile.decode, self.profile.server
        eager = d.eager_penalty_ms if batch > s.cuda_graph_max_bs else 0.0
        return (d.a_ms + eager) / batch / 1000

    def decode_token_s(self, context: float, *, batch: int) -> float:
        """One generated token's share of a decode step at `batch` running requests, at `context` tokens."""
        d = self.profile.decode
        return self.fixed_share_s(batch) + (d.b_ms_per_request + d.c_ms_per_kv_token * context) / 1000

    def prefill_s(self, tokens: float, context: float) -> float:
        """Seconds to prefill `tokens` new tokens after `context` ones (the sim's prefill formula)."""
        p = self.profile.prefill
        return tokens * (1 + (context + tokens / 2) / p.attn_ctx_half_tokens) / p.tokens_per_s


@dataclass(frozen=True, slots=True)
class RolloutCost:
    role: str
    chain_s: float
    work_s: float
    """Decode and prefill work together."""
    prefill_s: float
    """The prefill part of work_s."""
    decode_steps: int = 0
    """Decode steps of the rollout (generated tokens after each turn's first)."""
    chain_prefill_s: float = 0.0
    """The prefill part of chain_s (its tool blocks)."""


def rollout_cost(t: Any, costs: Costs, *, prompt_cached: bool, block_tokens: int) -> RolloutCost:
    """Chain and work seconds of trajectory `t` (its response segments say which tokens were generated and which
    were tool blocks). `prompt_cached`: an earlier rollout of the group prefilled the same prompt."""
    segments = t.meta.get("segments") if isinstance(t.meta, dict) else None
    if not segments:
        segments = [["gen", 0, len(t.response_ids)]]
    context = len(t.prompt_ids)
    # The first prompt's prefill is left off the chain: it may be cached (a template, a group's shared prompt).
    chain, prefill = 0.0, 0.0 if prompt_cached else costs.prefill_s(context, 0)
    decode, decode_steps, chain_prefill = 0.0, 0, 0.0
    for kind, start, end in segments:
        n = end - start
        if kind == "gen":
            # The prefill step before a turn emits its first token; each further token is one decode step.
            steps, mid = max(0, n - 1), context + n / 2
            chain += steps * costs.decode_token_s(mid, batch=1)
            decode += steps * costs.decode_token_s(mid, batch=costs.batch)
            decode_steps += steps
        else:
            # A later turn prefills its tool block and the partly filled cache block before it.
            fresh = n + block_tokens / 2
            chain += costs.prefill_s(n, context)
            chain_prefill += costs.prefill_s(n, context)
            prefill += costs.prefill_s(fresh, context)
        context += n
    return RolloutCost(t.role, chain, decode + prefill, prefill, decode_steps, chain_prefill)


@dataclass(frozen=True, slots=True)
class GroupCost:
    """One episode: its longest chain per phase and its total work, plus what the learner trains of it."""

    chain_s: dict[str, float]
    """Phase -> the longest chain among the episode's rollouts of that phase (0 when it had none)."""
    work_s: dict[str, float]
    """Phase -> server seconds of the episode's rollouts of that phase at full batch."""
    prefill_s: float
    """The prefill part of the episode's work (all phases)."""
    trajectories: int
    """Trained (proposer and solver) trajectories."""
    tokens: int
    """Tokens of the trained trajectories."""
    decode_steps: int = 0
    """Decode steps of all the episode's rollouts (its work's share of each step's fixed cost depends on the load)."""
    path_steps: int = 0
    """Decode steps along the episode's critical path (per phase the rollout with the longest chain)."""
    path_prefill_s: float = 0.0
    """Prefill seconds along that path (tool blocks)."""
    start_version: int | None = None
    """The policy version the episode started on (the oldest version among its tokens), when the tokens carry one."""

    @property
    def episode_chain_s(self) -> float:
        """The episode's own critical path: proposer, then the slowest verifier sample, then the slowest solver."""
        return sum(self.chain_s.values())

    @property
    def total_work_s(self) -> float:
        return sum(self.work_s.values())

    def path_s(self, costs: Costs, load: int, prefill_per_token_s: float = 0.0) -> float:
        """The episode's critical path on servers running `load` requests each. Each of its decode steps is one
        step of a batch of `load` and also waits for the prefill the other load - 1 requests bring in at the
        workload's `prefill_per_token_s` (prefill seconds per decoded token): a server runs its prefill chunks in
        the same steps, so a server that keeps `load` requests running keeps prefilling what replaces them."""
        per_step = costs.step_s(load) + (load - 1) * prefill_per_token_s
        return self.path_steps * per_step + self.path_prefill_s


def group_cost(group: Sequence[Any], costs: Costs, block_tokens: int) -> GroupCost:
    chain = dict.fromkeys(PHASES.values(), 0.0)
    work = dict.fromkeys(PHASES.values(), 0.0)
    longest: dict[str, RolloutCost] = {}
    prompts: set[tuple[str, int]] = set()
    prefill, decode_steps = 0.0, 0
    for t in group:
        key = (t.role, hash(tuple(t.prompt_ids)))
        c = rollout_cost(t, costs, prompt_cached=key in prompts, block_tokens=block_tokens)
        prompts.add(key)
        phase = PHASES[t.role]
        if c.chain_s >= chain[phase]:
            chain[phase], longest[phase] = c.chain_s, c
        work[phase] += c.work_s
        prefill += c.prefill_s
        decode_steps += c.decode_steps
    trained = [t for t in group if t.role in TRAINED_ROLES]
    return GroupCost(chain, work, prefill, len(trained),
                     sum(len(t.prompt_ids) + len(t.response_ids) for t in trained), decode_steps=decode_steps,
                     path_steps=sum(c.decode_steps for c in longest.values()),
                     path_prefill_s=sum(c.chain_prefill_s for c in longest.values()),
                     start_version=oldest_trained_version(list(group), tuple(PHASES)))


class GroupTally:
    """The groups the learner received, in arrival order (its steps take them in that order), costed on arrival."""

    def __init__(self, profile: SimProfile, slots: int) -> None:
        self.profile = profile
        self.slots = slots
        self.groups: list[list[Any]] = []

    def add(self, group: list[Any]) -> None:
        self.groups.append(group)

    def costs(self) -> tuple[Costs, list[GroupCost]]:
        """Every group's cost at the batch the run's mean context allows (one batch for the whole run)."""
        generated = sum(sum(t.loss_mask) for g in self.groups for t in g)
        ctx = sum(sum(t.loss_mask) * (len(t.prompt_ids) + len(t.response_ids) / 2) for g in self.groups for t in g)
        costs = Costs.at_capacity(self.profile, self.slots, ctx / max(1, generated))
        block = self.profile.sim.prefix_block_tokens
        return costs, [group_cost(g, costs, block) for g in self.groups]


def train_s(profile: SimProfile, tokens: int, gpus: int) -> float:
    return learner_step_s(profile.learner, flops_per_token=profile.model.flops_per_token, tokens=tokens, gpus=gpus)


@dataclass(frozen=True, kw_only=True, slots=True)
class StepBound:
    """The shortest a step of a phased schedule could take, by part."""

    phases_s: dict[str, float]
    """Phase -> its shortest makespan (sync), or {"episodes": ...} (lock-step)."""
    bound_by: dict[str, str]
    """Phase -> "chain" or "work": which limit set it."""
    train_s: float
    push_s: float

    @property
    def total_s(self) -> float:
        return sum(self.phases_s.values()) + self.train_s + self.push_s


def sync_step_bound(profile: SimProfile, step: Sequence[GroupCost], *, servers: int, gpus: int) -> StepBound:
    phases, by = {}, {}
    for phase in PHASES.values():
        chain = max((g.chain_s[phase] for g in step), default=0.0)
        work = sum(g.work_s[phase] for g in step) / servers
        phases[phase], by[phase] = max(chain, work), "chain" if chain >= work else "work"
    return StepBound(phases_s=phases, bound_by=by, train_s=train_s(profile, sum(g.tokens for g in step), gpus),
                     push_s=push_s(profile))


def lockstep_step_bound(profile: SimProfile, step: Sequence[GroupCost], *, servers: int, gpus: int) -> StepBound:
    chain = max((g.episode_chain_s for g in step), default=0.0)
    work = sum(g.total_work_s for g in step) / servers
    return StepBound(phases_s={"episodes": max(chain, work)},
                     bound_by={"episodes": "chain" if chain >= work else "work"},
                     train_s=train_s(profile, sum(g.tokens for g in step), gpus), push_s=push_s(profile))


def phased_bound(profile: SimProfile, groups: Sequence[GroupCost], *, per_step: int, window: range, servers: int,
                 gpus: int, lockstep: bool) -> dict[str, Any]:
    """Bound of a sync or lock-step run over the learner steps in `window` (0-based): each step's groups are the
    next `per_step` the learner received. Returns the rate bound and the mean step parts."""
    steps = [groups[k * per_step:(k + 1) * per_step] for k in window]
    if any(len(s) < per_step for s in steps):
        raise ValueError(f"{len(groups)} groups received: fewer than the {len(window)} steps x {per_step} of the "
                         "window; the learner trains only full steps, so this is a bookkeeping error")
    make = lockstep_step_bound if lockstep else sync_step_bound
    bounds = [make(profile, s, servers=servers, gpus=gpus) for s in steps]
    trained = sum(g.trajectories for s in steps for g in s)
    total = sum(b.total_s for b in bounds)
    n = len(bounds)
    parts = {name: sum(b.phases_s[name] for b in bounds) / n for name in bounds[0].phases_s}
    by = {name: max(("chain", "work"), key=lambda k: sum(b.bound_by[name] == k for b in bounds))
          for name in bounds[0].bound_by}
    parts["train"] = sum(b.train_s for b in bounds) / n
    parts["push"] = bounds[0].push_s
    return {"bound_traj_per_s": trained / total, "bound_step_s": total / n,
            "bound_parts_s": {k: round(v, 3) for k, v in parts.items()}, "bound_phase_by": by}


def async_bound(profile: SimProfile, groups: Sequence[GroupCost], *, costs: Costs, per_step: int,
                serve_servers: int, learn_gpus: int, eta: int, measured_prefill_s_per_episode: float) -> dict[str, Any]:
    """Bound of an async run from the groups it trained in its window: the best load n (requests per server, up to
    the slot cap) of min(server rate at n, deadline rate at n), then the learner rate if lower.
    `measured_prefill_s_per_episode`: the servers' prefill seconds in the window per trained episode."""
    n = max(1, len(groups))
    traj = sum(g.trajectories for g in groups) / n
    own_prefill = sum(g.prefill_s for g in groups) / n
    prefill = max(own_prefill, measured_prefill_s_per_episode)
    work = sum(g.total_work_s for g in groups) / n - own_prefill + prefill
    decode_steps = sum(g.decode_steps for g in groups) / n
    tokens = sum(g.tokens for g in groups) / n
    push = push_s(profile)
    train = train_s(profile, int(tokens * per_step), learn_gpus)
    learner_step = train + push
    learner_rate = per_step * traj / learner_step
    # The longest episode per start version: eta + 1 learner steps span at least its path plus training and a push.
    cohorts: dict[int, list[GroupCost]] = {}
    for g in groups:
        if g.start_version is not None:
            cohorts.setdefault(g.start_version, []).append(g)

    def server_step(load: int) -> float:
        # Work was priced at the full batch; at `load` each decoded token carries a larger share of the fixed cost.
        at_load = work + decode_steps * (costs.fixed_share_s(load) - costs.fixed_share_s(costs.batch))
        return per_step * at_load / serve_servers + push

    prefill_per_token = prefill / max(1.0, decode_steps)

    def deadline_step(load: int) -> float:
        if not cohorts:
            return 0.0
        longest = [max(g.path_s(costs, load, prefill_per_token) for g in c) for c in cohorts.values()]
        return (sum(longest) / len(longest) + train + push) / (eta + 1)

    load = max(range(1, costs.batch + 1), key=lambda k: (min(1 / server_step(k), 1 / max(1e-9, deadline_step(k))), k))
    server_rate = per_step * traj / server_step(load)
    deadline_rate = per_step * traj / deadline_step(load) if cohorts else float("inf")
    full_rate = per_step * traj / server_step(costs.batch)
    bound = min(server_rate, deadline_rate, learner_rate)
    by = ("learner" if learner_rate <= min(server_rate, deadline_rate)
          else "servers" if load == costs.batch and server_rate <= deadline_rate else "deadline")
    return {"bound_traj_per_s": bound, "bound_step_s": per_step * traj / bound,
            "server_rate_traj_per_s": full_rate, "learner_rate_traj_per_s": learner_rate,
            "deadline_rate_traj_per_s": deadline_rate, "load_rate_traj_per_s": min(server_rate, deadline_rate),
            "load_requests_per_server": load, "bound_by": by,
            "server_s_per_episode": work, "decode_s_per_episode": work - prefill, "prefill_s_per_episode": prefill,
            "prefill_beyond_own_s_per_episode": prefill - own_prefill}
