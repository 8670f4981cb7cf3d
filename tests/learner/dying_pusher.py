"""A learner that dies mid-push: run by test_push_recovery.py as `python dying_pusher.py URL MODEL_DIR KILL_AT`.

It connects a WeightPusher to the server and pushes the model's own weights in small buckets, and when the push asks
for tensor number KILL_AT it SIGKILLs itself: earlier buckets have landed, the server is paused, its weight-update
session is open and our group is registered there, as a learner process that crashed mid-push leaves them.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from ssp.learner.push import WeightPusher


def dying_weights(state: dict[str, torch.Tensor], kill_at: int) -> Iterator[tuple[str, torch.Tensor]]:
    for i, (name, tensor) in enumerate(state.items()):
        if i == kill_at:
            print("killing myself mid-push", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        yield name, tensor


def main(url: str, model_dir: Path, kill_at: int) -> None:
    state = load_file(str(model_dir / "model.safetensors"))
    pusher = WeightPusher([url], backend="gloo", bytes_per_bucket=4 << 20, timeout_s=60)
    pusher.connect()
    print("connected", flush=True)
    pusher.push(dying_weights(state, kill_at), version="never")
    raise SystemExit(f"the push finished before tensor {kill_at}; pick a smaller KILL_AT")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
