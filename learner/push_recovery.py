"""Weight pushes that outlive an inference server: the update group is re-formed over the servers that answer.

A `WeightPusher`'s group is fixed at connect(), and every member takes part in every broadcast, so a dead member
fails every push after it. `RecoveringPusher` keeps one over the servers that are up:

    before each push, read every server's /model_info (its weight version; no answer = down), and re-form the group
    over the servers that answer (a new WeightPusher, whose connect() resets what the old group left) when
      - a member is down, or a server answers that is not a member (e.g. restarted by `ssp train`), or
      - a member reports another version than the last one we gave it (it was restarted: initial weights, no group)
    a push that fails midway (a member died) raises PushInterrupted within moments of the death: the failed push
    abandoned its group, and the survivors generate again (WeightPusher's module docstring). The caller pushes again
    with fresh tensors and that push re-forms first. Meanwhile the survivors hold a mix of old and new weights under
    the old label; the repeated push replaces all of them.

Each group formed gets a new name (`group_name`, "<base>-<n>" from the first re-form on): a survivor may still hold
the abandoned group, a receive stuck in it until serving.weight_receive_timeout_s, and torch refuses a second
process group of the same name while the first exists.

So a restarted server gets the current weights with the first push after it answers. Until then its weight version
differs from the others', and the engine's pool does not route to it (engine/pool.py re-admits a server only when it
serves a version the admitted ones serve). A relabel (a step that trained nothing) goes only to the members that
hold our last version; a restarted server waits for the next push, which brings it weights as well as the label.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable

import torch

from ssp.learner.push import PushError, PushStats, WeightPusher

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
"""How long one server may take to answer /model_info before it counts as down for this push."""


class NoServerAnswers(PushError):
    """No inference server answered for learner.push_timeout_s: nothing to push to."""


class PushInterrupted(PushError):
    """A push failed midway (a server died, most likely). Push again with fresh tensors: the group is re-formed
    over the servers that answer first."""


class RecoveringPusher:
    """A WeightPusher over whichever of `server_urls` answer, re-formed when that set changes (module docstring).

    `make_pusher(urls)` returns a new (unconnected) WeightPusher over `urls` (its group_name is the base of the
    names this gives the groups it forms); `wait_s` bounds how long a push waits for at least one server to
    answer."""

    def __init__(self, server_urls: list[str], *, make_pusher: Callable[[list[str]], WeightPusher],
                 api_key: str | None, wait_s: float) -> None:
        if not server_urls:
            raise ValueError("RecoveringPusher needs at least one server URL")
        self.urls = [u.rstrip("/") for u in server_urls]
        self._make_pusher = make_pusher
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.wait_s = wait_s
        self._pusher: WeightPusher | None = None
        self._interrupted = False
        self.version: str | None = None
        """The version of our last push or relabel (what every member should report)."""
        self.reforms = 0
        """Times the group was re-formed after the first connect."""
        self.formed = 0
        """Groups formed so far (their names count on)."""

    @property
    def members(self) -> list[str]:
        """The servers in the current update group."""
        return list(self._pusher.urls) if self._pusher is not None else []

    @property
    def current_group(self) -> str | None:
        """The name of the current update group (None before connect)."""
        return self._pusher.group_name if self._pusher is not None else None

    def connect(self) -> None:
        self._form(self._answering())

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> PushStats:
        """One full weight update to the servers that answer. PushInterrupted if it failed midway (push again);
        NoServerAnswers if none answered within wait_s."""
        versions = self._answering()
        failure = ""
        try:
            if self._pusher is None or self._interrupted or self._changed(versions):
                self._form(versions)
            assert self._pusher is not None
            stats = self._pusher.push(named_tensors, version)
        except Exception as e:  # noqa: BLE001 - a refused call, a broken wire (gloo), a timeout, a server gone
            failure = f"{type(e).__name__}: {e}"
        if failure:
            # Raised out here, not inside the except: the old error's traceback holds the failed push's frames, and
            # with them its process group, whose sockets must close before the next push re-forms the group.
            self._interrupted = True
            answering = [u for u in self.urls if versions.get(u) is not None]
            raise PushInterrupted(f"weight push of version {version} to {answering} failed: {failure}")
        self.version = version
        return stats

    def relabel(self, version: str) -> None:
        """Label our weights `version` on the members that hold them (see the module docstring)."""
        versions = self._probe()
        holders = [u for u in self.members if versions.get(u) is not None and versions[u] == self.version]
        for url in holders:
            reply = self._post(url, "/update_weight_version", {"new_version": version,
                                                                "abort_all_requests": False})
            if not reply.get("success", False):
                raise PushError(f"update_weight_version failed on {url}: {reply.get('message')}")
        self.version = version
        log.info("relabelled the weights of %d of %d server(s) v%s (nothing trained this step)", len(holders),
                 len(self.urls), version)

    def close(self) -> None:
        if self._pusher is not None:
            self._pusher.close()
            self._pusher = None

    # ---------------------------------------------------------------- membership

    def _changed(self, versions: dict[str, str | None]) -> bool:
        up = {u for u, v in versions.items() if v is not None}
        members = set(self.members)
        if up != members:
            return True
        return self.version is not None and any(versions[u] != self.version for u in members)

    def _form(self, versions: dict[str, str | None]) -> None:
        """A new group over the servers that answered (the old one closed first: see WeightPusher.close)."""
        up = [u for u in self.urls if versions.get(u) is not None]
        pushes = 0
        old, self._pusher = self._pusher, None
        if old is not None:
            pushes = old.pushes
            self.reforms += 1
            log.warning("re-forming the weight-update group: members were %s, answering now %s (versions %s)",
                        old.urls, up, versions)
            try:
                old.close()
            except Exception as e:  # noqa: BLE001 - the old group is gone either way; the new one is what counts
                log.warning("closing the old weight-update group: %s: %s", type(e).__name__, e)
        pusher = self._make_pusher(up)
        pusher.group_name = group_name(pusher.group_name, self.formed)
        self.formed += 1
        try:
            pusher.connect()
        except BaseException:
            pusher.close()
            raise
        pusher.pushes = pushes  # the kv_refresh_every schedule counts on
        self._pusher = pusher
        self._interrupted = False

    def _answering(self) -> dict[str, str | None]:
        """Every server's weight version (None = down), once at least one answers; PushError after wait_s."""
        deadline = time.monotonic() + self.wait_s
        while True:
            versions = self._probe()
            if any(v is not None for v in versions.values()):
                return versions
            if time.monotonic() > deadline:
                raise NoServerAnswers(f"no inference server answers /model_info within {self.wait_s:g} s "
                                f"(learner.push_timeout_s): {self.urls}")
            time.sleep(1.0)

    def _probe(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for url in self.urls:
            try:
                req = urllib.request.Request(url + "/model_info", headers=self._headers)
                with urllib.request.urlopen(req, timeout=PROBE_TIMEOUT_S) as resp:
                    out[url] = str(json.loads(resp.read()).get("weight_version", "default"))
            except (OSError, ValueError) as e:  # refused, reset, timed out, HTTP error, not JSON
                log.debug("%s/model_info: %s", url, e)
                out[url] = None
        return out

    def _post(self, url: str, path: str, body: dict[str, object]) -> dict[str, object]:
        req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={**self._headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=PROBE_TIMEOUT_S * 6) as resp:
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as e:
            return dict(json.loads(e.read() or b"{}"))


def group_name(base: str, formed_before: int) -> str:
    """The name of the group formed after `formed_before` others: the base first, then "<base>-1", "<base>-2", ...
    A restarted learner's reset destroys the base name on every server and the others where /server_info lists them
    (the reference server does; WeightPusher._reset_servers)."""
    return base if formed_before == 0 else f"{base}-{formed_before}"
