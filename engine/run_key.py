"""The run key: the secret that lets an engine stream trajectories to a learner (engine/wire.py checks it).

Why a secret per run: the learner trains on whatever arrives on its trajectory port, so anyone who can reach the
port could otherwise feed it trajectories, or take the port before the real engine does. `ssp train` (when it
starts the learner) and `ssp launch` write a fresh random key file per run and point both ends at it with
`stream.key_file`; a learner and an engine started by hand read the key from the environment variable SSP_RUN_KEY
instead. The key never appears on a command line (other users can read those in `ps`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_ENV = "SSP_RUN_KEY"
"""Environment variable holding the run key when stream.key_file is unset."""

MIN_KEY_BYTES = 32
"""Shortest accepted key; `write_run_key` writes 64 random hex digits (256 bits)."""

MAX_KEY_BYTES = 4096
"""Longest accepted key: a key file is read whole, so a wrong path (a model, a log) must not be."""


class RunKeyError(ValueError):
    """No run key is configured, or the configured one is unusable (the message says where to put one)."""


def write_run_key(path: Path) -> Path:
    """Write a fresh random key to `path`, readable by its owner only (created with mode 0600, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a new run gets a new key; O_EXCL below then refuses a file raced in meanwhile
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


def load_run_key(key_file: Path | None) -> bytes:
    """The run key: the content of `key_file` (surrounding whitespace stripped) when set, else $SSP_RUN_KEY."""
    if key_file is not None:
        try:
            with Path(key_file).open("rb") as f:
                raw = f.read(MAX_KEY_BYTES + 1)
        except OSError as e:
            raise RunKeyError(f"stream.key_file = {key_file}: cannot read the run key ({e.strerror}); point it at "
                              "the run's key file (ssp train writes <run>/stream.key)") from None
        return _checked(raw.strip(), f"stream.key_file = {key_file}")
    value = os.environ.get(KEY_ENV)
    if value is None:
        raise RunKeyError(f"no run key for the trajectory stream: stream.key_file is unset and ${KEY_ENV} is not "
                          f"set; export the same {KEY_ENV} to the engine and the learner (e.g. `export {KEY_ENV}="
                          "$(python -c 'import secrets; print(secrets.token_hex(32))')`), or set stream.key_file "
                          "on both")
    return _checked(value.strip().encode(), f"${KEY_ENV}")


def _checked(key: bytes, where: str) -> bytes:
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise RunKeyError(f"{where}: the run key has {len(key)} bytes; it must have {MIN_KEY_BYTES} to "
                          f"{MAX_KEY_BYTES} (make one with `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return key
