"""The retrieval server's bearer key over a real socket: /health stays open, every other route needs the key, the
HTTP retriever sends it from retriever.api_key_file, and a wildcard bind without a key is refused."""

import asyncio
import json
import re
import sys
from pathlib import Path

import aiohttp
import pytest

from ssp.retriever.client import HttpRetriever
from ssp.retriever.config import RetrievalServerConfig, RetrieverConfig
from ssp.retriever.errors import RetrieverRequestError
from ssp.retriever.registry import make_retriever
from ssp.retriever.server import serve
from ssp.run_key import RunKeyError, check_bind, load_api_key, write_run_key


async def test_keyed_server_refuses_keyless_calls_and_serves_the_keyed_client(demo_index: Path,
                                                                               tmp_path: Path) -> None:
    key_file = write_run_key(tmp_path / "stream.key")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ssp.cli", "retriever", "serve", "--index", str(demo_index), "--port", "0", "--set",
        f"retrieval_server.api_key_file={json.dumps(str(key_file))}", stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        url = line.rsplit(" on ", 1)[1].strip()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/health") as r:
                assert r.status == 200  # launchers poll it before they hold a key
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                async with s.post(f"{url}/retrieve", json={"queries": ["Ed Wood"]}, headers=headers) as r:
                    assert r.status == 401 and "retrieval_server.api_key_file" in (await r.json())["error"]
            async with s.get(f"{url}/no-such-route") as r:
                assert r.status == 401  # nothing about the server is told without the key
        keyless = HttpRetriever(url, max_retries=0)
        with pytest.raises(RetrieverRequestError, match="HTTP 401"):
            await keyless.search(["Ed Wood"], k=2)
        await keyless.close()
        keyed = make_retriever(RetrieverConfig(kind="http", url=url, api_key_file=key_file))
        docs = await keyed.search(["Ed Wood"], k=2)
        assert len(docs[0]) == 2
        await keyed.close()
    finally:
        proc.terminate()
        await proc.wait()


async def test_wildcard_bind_without_a_key_is_refused(demo_index: Path) -> None:
    with pytest.raises(RunKeyError, match="host = '0.0.0.0' accepts connections from other machines.*--insecure"):
        await serve(RetrievalServerConfig(host="0.0.0.0", port=0), demo_index)


def test_key_file_rules(tmp_path: Path) -> None:
    assert load_api_key(None, "retriever.api_key_file") is None
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    with pytest.raises(RunKeyError, match="retriever.api_key_file = .*short.key: the run key has 3 bytes"):
        load_api_key(short, "retriever.api_key_file")
    with pytest.raises(RunKeyError, match="cannot read the run key"):
        load_api_key(tmp_path / "missing.key", "retriever.api_key_file")


def test_only_loopback_binds_go_without_a_key() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_bind(host, keyed=False, insecure=False, setting="x.api_key_file")
    for host in ("0.0.0.0", "::", "10.0.0.7", "node0"):
        with pytest.raises(RunKeyError, match=f"host = '{re.escape(host)}' .* set x.api_key_file"):
            check_bind(host, keyed=False, insecure=False, setting="x.api_key_file")
        check_bind(host, keyed=True, insecure=False, setting="x.api_key_file")
        check_bind(host, keyed=False, insecure=True, setting="x.api_key_file")
