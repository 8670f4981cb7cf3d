"""The trajectory record the engine streams to the learner, and its msgpack encoding (schema version 1).

One record per rollout; records of one episode share `group_id`. Token-level lists are aligned with
`response_ids`: loss_mask is 1 on tokens the policy generated and 0 on tool output (search results); rollout
logprobs and policy versions are meaningful only where loss_mask is 1 (0.0 and -1 elsewhere). A generated token's
policy version is the version of the weights that sampled it, or UNKNOWN_VERSION when the server did not say
(it reported no per-token version spans): such tokens are counted by the learner, never stamped with a guess.
Advantages are *not* here: they are RL math and belong to the learner.
"""

from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

SCHEMA_VERSION = 1

UNKNOWN_VERSION = -2
"""Policy version of a generated token whose sampling weights the server did not report."""

Role = Literal["proposer", "solver", "verifier"]


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

    def validate(self) -> None:
        """Check the invariants the learner relies on; raise SchemaError naming the first violation."""
        n = len(self.response_ids)
        for name in ("loss_mask", "rollout_logprobs", "policy_versions"):
            got = len(getattr(self, name))
            if got != n:
                raise SchemaError(f"trajectory {self.group_id}/{self.role}: {name} has {got} entries, "
                                  f"response_ids has {n}; every token-level list must align with response_ids")
        if any(m not in (0, 1) for m in self.loss_mask):
            raise SchemaError(f"trajectory {self.group_id}/{self.role}: loss_mask must contain only 0 and 1")
        if any(m and v < 0 and v != UNKNOWN_VERSION for v, m in zip(self.policy_versions, self.loss_mask)):
            raise SchemaError(f"trajectory {self.group_id}/{self.role}: a generated token (loss_mask 1) has a "
                              f"negative policy version other than {UNKNOWN_VERSION} (unknown); versions are the "
                              "learner's step numbers")
        if not self.prompt_ids:
            raise SchemaError(f"trajectory {self.group_id}/{self.role}: prompt_ids is empty")

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
    def from_dict(cls, d: dict[str, Any]) -> "Trajectory":
        version = d.get("schema")
        if version != SCHEMA_VERSION:
            raise SchemaError(f"trajectory schema {version!r} is not supported (this ssp reads {SCHEMA_VERSION}); "
                              "produce it with the same ssp version as the learner")
        try:
            traj = cls(**{k: v for k, v in d.items() if k != "schema"})
        except TypeError as e:
            raise SchemaError(f"trajectory record is malformed: {e}") from None
        traj.validate()
        return traj


def pack_group(trajectories: list[Trajectory]) -> bytes:
    """Encode one episode's trajectories as one msgpack payload (a frame body of the trajectory stream)."""
    return msgpack.packb([t.to_dict() for t in trajectories], use_bin_type=True)


def unpack_group(payload: bytes) -> list[Trajectory]:
    """Decode a payload written by `pack_group`, validating every trajectory."""
    try:
        records = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (msgpack.UnpackException, ValueError) as e:
        raise SchemaError(f"trajectory frame is not valid msgpack: {e}") from None
    if not isinstance(records, list):
        raise SchemaError(f"trajectory frame must hold a list of records, got {type(records).__name__}")
    return [Trajectory.from_dict(r) for r in records]
