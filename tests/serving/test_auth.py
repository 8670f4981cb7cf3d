"""API keys (as SGLang's), checked on the HTTP front over the simulated backend (same front, no weights):
--api-key guards every route but health/ready; --admin-api-key guards the control routes and the API key does not
open them."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ssp.engine.errors import ServerError
from ssp.engine.inference_config import InferenceConfig
from ssp.engine.pool import InferencePool
from ssp.run_key import write_run_key

API, ADMIN = "user-key", "admin-key"


async def status(session: aiohttp.ClientSession, method: str, url: str, key: str | None,
                 body: Any = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.request(method, url, json=body, headers=headers) as r:
        await r.read()
        return r.status


async def test_api_and_admin_keys(sim_launcher: Any) -> None:
    server = sim_launcher(extra_args=("--set", f"serving.api_key={API!r}", "--set",
                                      f"serving.admin_api_key={ADMIN!r}"))
    gen = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}
    async with aiohttp.ClientSession() as s:
        assert await status(s, "GET", server.url + "/health", None) == 200
        assert await status(s, "GET", server.url + "/ready", None) == 200
        assert await status(s, "POST", server.url + "/generate", None, gen) == 401
        assert await status(s, "POST", server.url + "/generate", "wrong", gen) == 401
        assert await status(s, "POST", server.url + "/generate", API, gen) == 200
        assert await status(s, "GET", server.url + "/model_info", API) == 200
        assert await status(s, "POST", server.url + "/abort_request", API, {"abort_all": True}) == 401
        assert await status(s, "POST", server.url + "/abort_request", ADMIN, {"abort_all": True}) == 200
        assert await status(s, "POST", server.url + "/flush_cache", API) == 401
        assert await status(s, "POST", server.url + "/flush_cache", ADMIN) == 200


async def test_key_file_guards_every_control_route(sim_launcher: Any, tmp_path: Path) -> None:
    """serving.api_key_file (as ssp train sets it): without the key, nobody can abort, pause, relabel the weights or
    load weights from a path; the engine's pool sends it from inference.api_key_file."""
    key_file = write_run_key(tmp_path / "stream.key")
    key = key_file.read_text().strip()
    server = sim_launcher(extra_args=("--set", f"serving.api_key_file={json.dumps(str(key_file))}"))
    controls = [("POST", "/abort_request", {"abort_all": True}), ("POST", "/pause_generation", {}),
                ("POST", "/continue_generation", {}), ("POST", "/update_weight_version", {"new_version": "evil"}),
                ("POST", "/update_weights_from_disk", {"model_path": "/tmp/evil"}),
                ("POST", "/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1,
                                                        "rank_offset": 1, "world_size": 2}),
                ("POST", "/flush_cache", None)]
    async with aiohttp.ClientSession() as s:
        for method, path, body in controls:
            assert await status(s, method, server.url + path, None, body) == 401, path
            assert await status(s, method, server.url + path, key[:-1] + "x", body) == 401, path
        assert await status(s, "POST", server.url + "/abort_request", key, {"abort_all": True}) == 200
        async with s.get(server.url + "/model_info", headers={"Authorization": f"Bearer {key}"}) as r:
            assert (await r.json())["weight_version"] != "evil"
    async with InferencePool(InferenceConfig(server_urls=(server.url,), api_key_file=key_file)) as pool:
        assert all(r.success for r in (await pool.pause("abort")).values())
        assert all(r.success for r in (await pool.continue_()).values())
    with pytest.raises(ValueError, match="api_key and api_key_file .* are both set"):
        InferenceConfig(server_urls=(server.url,), api_key="k", api_key_file=key_file)


def test_wildcard_bind_without_a_key_is_refused(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "ssp.cli", "model", "serve", "--sim", "--host", "0.0.0.0", "--port",
                          "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "host = '0.0.0.0' accepts connections from other machines" in out.stderr
    assert "serving.api_key_file" in out.stderr and "--insecure" in out.stderr


def test_weight_push_needs_the_admin_key(model_dir: Path, server_launcher: Any, tmp_path: Path) -> None:
    """A keyed reference server: a pusher without the key is refused before any weight moves; with the key
    (learner.push_api_key_file) the whole update sequence goes through."""
    from safetensors.torch import load_file

    from ssp.learner.push import WeightPusher

    key_file = write_run_key(tmp_path / "stream.key")
    server = server_launcher(["--model", str(model_dir), "--port", "0", "--set",
                              f"serving.api_key_file={json.dumps(str(key_file))}"])
    keyless = WeightPusher([server.url], backend="gloo", timeout_s=60)
    try:
        with pytest.raises(ServerError, match="Unauthorized") as refused:
            keyless.connect()
        assert refused.value.status == 401
    finally:
        keyless.close()
    state = load_file(str(model_dir / "model.safetensors"))
    names = [n for n in state if n.startswith("model.layers.0.")]
    key = key_file.read_text().strip()
    pusher = WeightPusher([server.url], backend="gloo", timeout_s=60, api_key=key)
    try:
        pusher.connect()
        assert pusher.push(((n, state[n]) for n in names), "keyed-1").tensors == len(names)
    finally:
        pusher.close()
    info = urllib.request.Request(server.url + "/model_info", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(info, timeout=30) as r:
        assert json.loads(r.read())["weight_version"] == "keyed-1"
