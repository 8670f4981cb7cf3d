"""The run key: the one secret of a run. It lets an engine stream trajectories to a learner (engine/wire.py checks
it), and it is the bearer key of every HTTP server the run starts (inference servers, the retrieval server): their
`api_key_file` and their clients' point at the same file.

Why a secret per run: the learner trains on whatever arrives on its trajectory port, so anyone who can reach the
port could otherwise feed it trajectories, or take the port before the real engine does. `ssp train` (when it
starts the learner) and `ssp launch` write a fresh random key file per run and point both ends at it with
`stream.key_file`; a learner and an engine started by hand read the key from the environment variable SSP_RUN_KEY
instead. The key never appears on a command line (other users can read those in `ps`).

Why the HTTP servers need it too: without a key, anyone who can reach a server can pause or abort its generation,
set any weight version, load weights from any path or push arbitrary weights. So a server refuses to listen on a
non-loopback address without a key (`check_bind`) unless told `--insecure`.
"""

from __future__ import annotations

import ipaddress
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


def new_run_key() -> str:
    """64 random hex digits (256 bits)."""
    return secrets.token_hex(32)


def write_secret(path: Path, text: str) -> Path:
    """Write `text` to `path`, readable by its owner only (created with mode 0600, never widened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)  # a new run gets a new key; O_EXCL below then refuses a file raced in meanwhile
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def write_run_key(path: Path, key: str | None = None) -> Path:
    """Write `key` (default: a fresh `new_run_key()`) to `path` with mode 0600; `ssp launch` passes the key it
    showed masked in its plan."""
    return write_secret(path, (key or new_run_key()) + "\n")


def load_run_key(key_file: Path | None) -> bytes:
    """The run key: the content of `key_file` (surrounding whitespace stripped) when set, else $SSP_RUN_KEY."""
    if key_file is not None:
        return _read_key_file(key_file, "stream.key_file")
    value = os.environ.get(KEY_ENV)
    if value is None:
        raise RunKeyError(f"no run key for the trajectory stream: stream.key_file is unset and ${KEY_ENV} is not "
                          f"set; export the same {KEY_ENV} to the engine and the learner (e.g. `export {KEY_ENV}="
                          "$(python -c 'import secrets; print(secrets.token_hex(32))')`), or set stream.key_file "
                          "on both")
    return _checked(value.strip().encode(), f"${KEY_ENV}")


def load_api_key(key_file: Path | None, setting: str) -> str | None:
    """The bearer key in `key_file` (the config key `setting`, e.g. "serving.api_key_file"); None when unset."""
    if key_file is None:
        return None
    return _read_key_file(key_file, setting).decode()


def masked(key: str) -> str:
    """The key as it may be printed: its first 4 characters and "..."."""
    return key[:4] + "..."


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it resolves to a reachable address
        return False


def check_bind(host: str, *, keyed: bool, insecure: bool, setting: str) -> None:
    """Refuse to listen on a non-loopback `host` without a bearer key, unless `insecure` (see the module docstring).
    `setting` names the config key that gives the server its key."""
    if keyed or insecure or is_loopback(host):
        return
    raise RunKeyError(f"host = {host!r} accepts connections from other machines, and no API key is set, so anyone "
                      f"who reaches the port could drive this server; set {setting} (ssp train and ssp launch point "
                      "it at the run key), bind 127.0.0.1, or pass --insecure on a trusted network")


def _read_key_file(key_file: Path, setting: str) -> bytes:
    try:
        with Path(key_file).open("rb") as f:
            raw = f.read(MAX_KEY_BYTES + 1)
    except OSError as e:
        raise RunKeyError(f"{setting} = {key_file}: cannot read the run key ({e.strerror}); point it at the run's key "
                          "file (ssp train writes <run>/stream.key)") from None
    return _checked(raw.strip(), f"{setting} = {key_file}")


def _checked(key: bytes, where: str) -> bytes:
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise RunKeyError(f"{where}: the run key has {len(key)} bytes; it must have {MIN_KEY_BYTES} to "
                          f"{MAX_KEY_BYTES} (make one with `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return key
