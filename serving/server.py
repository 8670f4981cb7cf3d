"""`ssp model serve`: build the backend (model or simulation), put the HTTP front on it, serve until interrupted."""

from __future__ import annotations

import logging
from pathlib import Path

from ssp.serving.backend import Backend
from ssp.serving.config import ServingConfig

log = logging.getLogger(__name__)

READY_LINE = "ssp server listening on "
"""Printed (with the base URL) once the port is open; tests and launchers wait for it."""


def build_backend(cfg: ServingConfig, *, sim: bool, sim_profile: Path | None,
                  sim_time_scale: float | None = None) -> Backend:
    """The model backend, or the simulated one (`serving/sim*.py`, `build_sim_backend`)."""
    if sim:
        from ssp.serving.sim import build_sim_backend

        return build_sim_backend(cfg, sim_profile, sim_time_scale)
    if sim_profile is not None or sim_time_scale is not None:
        raise ValueError("--sim-profile and --sim-time-scale only apply with --sim; drop them or add --sim")
    from ssp.serving.model_backend import ModelBackend

    return ModelBackend(cfg)


def with_key(cfg: ServingConfig, *, insecure: bool) -> ServingConfig:
    """`cfg` with the key of serving.api_key_file read into api_key; refuses (RunKeyError) a non-loopback bind
    without any key unless `insecure`. Runs before the model loads, so a bad setup fails in a second."""
    import dataclasses

    from ssp.run_key import check_bind, load_api_key

    if cfg.api_key_file is not None:
        key = load_api_key(cfg.api_key_file, "serving.api_key_file")
        cfg = dataclasses.replace(cfg, api_key=key, api_key_file=None)
    check_bind(cfg.host, keyed=cfg.api_key is not None, insecure=insecure, setting="serving.api_key_file")
    return cfg


def serve(cfg: ServingConfig, *, sim: bool = False, sim_profile: Path | None = None,
          sim_time_scale: float | None = None, insecure: bool = False) -> int:
    """Serve until interrupted; `insecure` allows a non-loopback bind without an API key (`with_key`)."""
    import uvloop

    from ssp.serving.app import create_app, run_app

    cfg = with_key(cfg, insecure=insecure)
    backend = build_backend(cfg, sim=sim, sim_profile=sim_profile, sim_time_scale=sim_time_scale)
    app = create_app(backend, cfg)

    def on_bound(url: str) -> None:
        print(f"{READY_LINE}{url}", flush=True)

    try:
        uvloop.run(run_app(app, cfg.host, cfg.port, on_bound=on_bound, log_requests=cfg.log_requests))
    except KeyboardInterrupt:
        pass
    return 0
