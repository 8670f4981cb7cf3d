"""API keys (sglang-api.md §0), checked on the HTTP front over the simulated backend (same front, no weights):
--api-key guards every route but health/ready; --admin-api-key guards the control routes and the API key does not
open them."""

from __future__ import annotations

from typing import Any

import aiohttp

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
