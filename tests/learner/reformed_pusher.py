"""A learner that re-formed its weight-update group and then died: run by test_push_recovery.py as
`python reformed_pusher.py MODEL_DIR URL...`.

It connects a RecoveringPusher to the servers, prints "connected" and waits for a line on stdin (the test kills a
server meanwhile). Its push then re-forms the group over the servers that answer, under the name "<base>-1", and
lands; it prints "pushed as NAME" and SIGKILLs itself, so the survivors keep that group as a learner that crashed
after a re-form leaves it.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from safetensors.torch import load_file

from ssp.learner.push import WeightPusher
from ssp.learner.push_recovery import RecoveringPusher


def make_pusher(urls: list[str]) -> WeightPusher:
    return WeightPusher(urls, backend="gloo", bytes_per_bucket=4 << 20, timeout_s=60)


def main(model_dir: Path, urls: list[str]) -> None:
    state = load_file(str(model_dir / "model.safetensors"))
    pusher = RecoveringPusher(urls, make_pusher=make_pusher, api_key=None, wait_s=60)
    pusher.connect()
    print("connected", flush=True)
    sys.stdin.readline()
    pusher.push(iter(state.items()), version="reformed")
    assert pusher.reforms == 1, "the push did not re-form the group"
    print(f"pushed as {pusher.current_group}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
