"""The trajectory record the engine streams to the learner, and its msgpack encoding (schema version 1).

One record per rollout; records of one episode share `group_id`. Token-level lists are aligned with
`response_ids`: loss_mask is 1 on tokens the policy generated and 0 on tool output (search results); rollout
logprobs and policy versions are meaningful only where loss_mask is 1 (0.0 and -1 elsewhere). A generated token's
policy version is the version of the weights that sampled it, or UNKNOWN_VERSION when the server did not say
(it reported no per-token version spans): such tokens are counted by the learner, never stamped with a guess.
Advantages are *not* here: they are RL math and belong to the learner.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import msgpack

SCHEMA_VERSION = 1

UNKNOWN_VERSION = -2
"""Policy version of a generated token whose sampling weights the server did not report."""

Role = Literal["proposer", "solver", "verifier"]
ROLES: tuple[str, ...] = get_args(Role)
TOKEN_LISTS = ("prompt_ids", "response_ids", "loss_mask", "rollout_logprobs", "policy_versions")


class SchemaError(ValueError):
    """A frame does not decode into a valid trajectory (wrong version, missing field, misaligned lengths)."""


@dataclass(kw_only=True, slots=True)
class Trajectory:
    role: Role
    group_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    rollout_logprobs: list[float]
    policy_versions: list[int]
    reward: float
    meta: dict[str, Any] = field(default_factory=dict)

    def validate(self, vocab_size: int | None = None) -> None:
        """Check the invariants the learner relies on; raise SchemaError naming the first violation.

        Why so strict: the learner trains on these records as they come, and one bad value poisons a whole step (a
        NaN reward or logprob turns every gradient into NaN; a token id outside the model's vocabulary indexes past
        the embedding). `vocab_size` (the learner's model) bounds the token ids; without it only their type and sign
        are checked. Each check runs at C speed over the whole list and looks for the culprit only when it fails
        (the engine validates every rollout too)."""
        where = f"trajectory {self.group_id}/{self.role}"
        if self.role not in ROLES:
            raise SchemaError(f"{where}: role {self.role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(self.group_id, str) or not self.group_id:
            raise SchemaError(f"{where}: group_id must be a non-empty string, got {self.group_id!r}")
        for name in TOKEN_LISTS:
            if not isinstance(getattr(self, name), list):
                raise SchemaError(f"{where}: {name} must be a list, got {type(getattr(self, name)).__name__}")
        if not self.prompt_ids:
            raise SchemaError(f"{where}: prompt_ids is empty")
        for name in ("prompt_ids", "response_ids"):
            _check_token_ids(where, name, getattr(self, name), vocab_size)
        n = len(self.response_ids)
        for name in ("loss_mask", "rollout_logprobs", "policy_versions"):
            got = len(getattr(self, name))
            if got != n:
                raise SchemaError(f"{where}: {name} has {got} entries, response_ids has {n}; every token-level list "
                                  "must align with response_ids")
        mask = self.loss_mask
        if not (_only(mask, int) and set(mask) <= {0, 1}):
            bad = _first(mask, lambda m: type(m) is not int or m not in (0, 1))
            raise SchemaError(f"{where}: loss_mask[{bad}] = {mask[bad]!r}; loss_mask must contain only the integers "
                              "0 and 1")
        logprobs = self.rollout_logprobs
        if not (_only(logprobs, float, int) and math.isfinite(sum(logprobs))):
            bad = _first(logprobs, lambda x: not _finite(x))
            if bad is not None:  # (None: all finite, only their sum overflowed)
                raise SchemaError(f"{where}: rollout_logprobs[{bad}] = {logprobs[bad]!r} is not a finite number")
        versions = self.policy_versions
        if not _only(versions, int):
            bad = _first(versions, lambda v: type(v) is not int)
            raise SchemaError(f"{where}: policy_versions[{bad}] = {versions[bad]!r} is not an integer")
        if any(m and v < 0 and v != UNKNOWN_VERSION for v, m in zip(versions, mask)):
            raise SchemaError(f"{where}: a generated token (loss_mask 1) has a negative policy version other than "
                              f"{UNKNOWN_VERSION} (unknown); versions are the learner's step numbers")
        if not _finite(self.reward):
            raise SchemaError(f"{where}: reward = {self.reward!r} is not a finite number")
        if not isinstance(self.meta, dict):
            raise SchemaError(f"{where}: meta must be a map, got {type(self.meta).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "role": self.role,
            "group_id": self.group_id,
            "prompt_ids": self.prompt_ids,
            "response_ids": self.response_ids,
            "loss_mask": self.loss_mask,
            "rollout_logprobs": self.rollout_logprobs,
            "policy_versions": self.policy_versions,
            "reward": self.reward,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], vocab_size: int | None = None) -> "Trajectory":
        """A validated record (see `validate` for `vocab_size`)."""
        if not isinstance(d, dict):
            raise SchemaError(f"a trajectory record must be a map, got {type(d).__name__}")
        version = d.get("schema")
        if version != SCHEMA_VERSION:
            raise SchemaError(f"trajectory schema {version!r} is not supported (this ssp reads {SCHEMA_VERSION}); "
                              "produce it with the same ssp version as the learner")
        try:
            traj = cls(**{k: v for k, v in d.items() if k != "schema"})
        except TypeError as e:
            raise SchemaError(f"trajectory record is malformed: {e}") from None
        traj.validate(vocab_size)
        return traj


def _only(values: list[Any], *types: type) -> bool:
    """Every value is exactly of one of `types` (a bool is not an int here)."""
    return set(map(type, values)) <= set(types)


def _first(values: list[Any], bad: Callable[[Any], bool]) -> int | None:
    """Index of the first value for which `bad` holds, None when there is none."""
    return next((i for i, v in enumerate(values) if bad(v)), None)


def _finite(x: object) -> bool:
    """A real number (not a bool, not a string), neither NaN nor infinite."""
    return type(x) in (int, float) and math.isfinite(x)  # type: ignore[arg-type]


def _check_token_ids(where: str, name: str, ids: list[Any], vocab_size: int | None) -> None:
    if not _only(ids, int):
        bad = _first(ids, lambda t: type(t) is not int)
        raise SchemaError(f"{where}: {name}[{bad}] = {ids[bad]!r} is not an integer token id")
    if ids and (min(ids) < 0 or (vocab_size is not None and max(ids) >= vocab_size)):
        bad = _first(ids, lambda t: t < 0 or (vocab_size is not None and t >= vocab_size))
        assert bad is not None
        limit = f"the vocabulary [0, {vocab_size})" if vocab_size is not None else "the non-negative ids"
        raise SchemaError(f"{where}: {name}[{bad}] = {ids[bad]} is outside {limit}; the engine must tokenize with "
                          "the learner's model")


def pack_group(trajectories: list[Trajectory]) -> bytes:
    """Encode one episode's trajectories as one msgpack payload (a frame body of the trajectory stream)."""
    return msgpack.packb([t.to_dict() for t in trajectories], use_bin_type=True)


def unpack_group(payload: bytes, vocab_size: int | None = None) -> list[Trajectory]:
    """Decode a payload written by `pack_group`, validating every trajectory (token ids below `vocab_size` when
    given: the learner passes its model's)."""
    try:
        records = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError) as e:
        raise SchemaError(f"trajectory frame is not valid msgpack: {e}") from None
    if not isinstance(records, list):
        raise SchemaError(f"trajectory frame must hold a list of records, got {type(records).__name__}")
    return [Trajectory.from_dict(r, vocab_size) for r in records]
