"""Is an answer correct? EM after SQuAD normalisation against every alias, then an optional token-F1 threshold, then
an optional OpenAI-compatible LLM judge or your own judge. Every error fails closed (the answer counts as wrong) and
is counted.

Your own judge (`game.judge.plugin`, loaded like every plug-in: an entry point of group "ssp.judges" or
"package.module:ClassName", built with `**game.judge.plugin_options`) is asked only when EM and F1 did not accept
the answer, so it can accept what they miss (a number written in words, a unit, a paraphrase) but never overrule an
exact match. It needs

    async def judge(self, question: str, prediction: str, aliases: tuple[str, ...]) -> bool
    async def close(self) -> None          # optional: release what it holds (sessions, models)

An exception it raises fails closed like an LLM error (counted under "error", the answer wrong): a judge that calls a
service will sometimes fail. A return value that is not a bool is a broken plug-in, and stops the run
(JudgePluginError) rather than quietly marking every answer wrong.

Fixes of the SSP reference code: ground truths are always a list of alias strings (it stored a list but compared
it as a string; here a bare string is rejected, not silently mis-compared); the LLM verdict must be exactly "Correct"
or "Wrong" (it parsed "Incorrect" as correct); a judge error is never a pass (its verification failed open).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import inspect
import logging
import os
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from ssp.engine.config import JudgeConfig
from ssp.plugins import build_plugin

log = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def check_aliases(aliases: Sequence[str]) -> tuple[str, ...]:
    """Ground truths as a tuple of non-empty strings. A bare string is an error: iterating it would compare
    characters (the reference's list-vs-string bug in reverse)."""
    if isinstance(aliases, str):
        raise TypeError(f"ground truth must be a list of alias strings, got the bare string {aliases!r}; "
                        f"pass [{aliases!r}]")
    out = tuple(a for a in aliases if isinstance(a, str) and a.strip())
    if len(out) != len(aliases) or not out:
        raise TypeError(f"ground truth {list(aliases)!r}: every alias must be a non-empty string, and there must be "
                        "at least one")
    return out


def exact_match(prediction: str, aliases: Sequence[str]) -> bool:
    """True when the normalised prediction equals some normalised alias."""
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in check_aliases(aliases))


def token_f1(prediction: str, aliases: Sequence[str]) -> float:
    """Highest token F1 (SQuAD) of the prediction against any alias."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for alias in check_aliases(aliases):
        gold = normalize_answer(alias).split()
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred), common / len(gold)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


class Method(enum.Enum):
    """Which rule decided a verdict."""

    NO_ANSWER = "no_answer"  # there was nothing to judge
    EM = "em"
    F1 = "f1"
    LLM = "llm"
    PLUGIN = "plugin"  # the user's judge accepted or rejected it
    NONE = "none"  # no rule accepted it (and no LLM judge is configured)
    ERROR = "error"  # the LLM judge failed: counted, and the answer is wrong (fail closed)


@dataclass(frozen=True, slots=True)
class Verdict:
    correct: bool
    method: Method
    error: str | None = None


class JudgeError(Exception):
    """The LLM judge did not give a usable verdict (HTTP error, timeout, or a reply that is not Correct/Wrong)."""


class JudgePluginError(ValueError):
    """A judge plug-in that cannot be loaded or built, or that broke its contract (a verdict that is not a bool)."""


JUDGE_ENTRY_POINT_GROUP = "ssp.judges"


def load_judge_plugin(cfg: JudgeConfig) -> Any:
    """The user's judge that `cfg.plugin` names, built with `cfg.plugin_options` (None when unset)."""
    if cfg.plugin is None:
        return None
    plugin = build_plugin(cfg.plugin, cfg.plugin_options, group=JUDGE_ENTRY_POINT_GROUP, key="game.judge.plugin",
                          options_key="game.judge.plugin_options", builtin=(), error=JudgePluginError)
    if not inspect.iscoroutinefunction(getattr(plugin, "judge", None)):
        raise JudgePluginError(f"game.judge.plugin = {cfg.plugin!r} built a {type(plugin).__name__} without an "
                               "`async def judge(question, prediction, aliases) -> bool` method")
    return plugin


def parse_verdict(reply: str) -> bool:
    """Strict parse: the reply, stripped of whitespace, quotes, asterisks and a final period, must be exactly
    "correct" or "wrong" (any case). Anything else, "Incorrect" included, raises JudgeError."""
    word = reply.strip().strip("\"'*`").rstrip(".").strip().lower()
    if word == "correct":
        return True
    if word == "wrong":
        return False
    raise JudgeError(f"judge reply {reply[:80]!r} is neither 'Correct' nor 'Wrong'")


JUDGE_SYSTEM = "You are a strict, fair judge of short answers."
JUDGE_TEMPLATE = (
    "Question: {question}\nModel answer: {prediction}\nReference answer(s): {references}\n\n"
    "Decide whether the model answer is correct. It is correct when it means the same as a reference answer: "
    "numbers must be equal or very close; wording, spelling variants and language may differ; an answer that "
    "contains a reference answer and says nothing that conflicts with it is correct. Reply with exactly one word: "
    "Correct or Wrong."
)


class Judge:
    """Judges answers; holds the optional LLM judge's HTTP session. Use as `async with Judge(cfg) as judge`.

    Counts are kept per method and for errors (`counts`), so validity and reward metrics can report them.
    """

    def __init__(self, cfg: JudgeConfig) -> None:
        self.cfg = cfg
        self.counts: collections.Counter[str] = collections.Counter()
        self._session: aiohttp.ClientSession | None = None
        self._plugin = load_judge_plugin(cfg)
        self._closed = False

    async def __aenter__(self) -> Judge:
        if self._closed:
            raise RuntimeError("this Judge was closed; create a new one")
        if self.cfg.llm_url is not None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.llm_timeout_s))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None
        plugin, self._plugin = self._plugin, None
        if plugin is not None and hasattr(plugin, "close"):
            await plugin.close()

    async def judge(self, question: str, prediction: str | None, aliases: Sequence[str]) -> Verdict:
        aliases = check_aliases(aliases)
        verdict = await self._decide(question, prediction, aliases)
        self.counts[verdict.method.value] += 1
        return verdict

    async def _decide(self, question: str, prediction: str | None, aliases: tuple[str, ...]) -> Verdict:
        if prediction is None or not prediction.strip():
            return Verdict(False, Method.NO_ANSWER)
        if exact_match(prediction, aliases):
            return Verdict(True, Method.EM)
        if self.cfg.f1_threshold is not None and token_f1(prediction, aliases) >= self.cfg.f1_threshold:
            return Verdict(True, Method.F1)
        if self._plugin is not None:
            return await self._ask_plugin(question, prediction, aliases)
        if self.cfg.llm_url is None:
            return Verdict(False, Method.NONE)
        try:
            return Verdict(await self._ask_llm(question, prediction, aliases), Method.LLM)
        except JudgeError as e:
            log.warning("LLM judge failed, counting the answer as wrong: %s", e)
            return Verdict(False, Method.ERROR, str(e))

    async def _ask_plugin(self, question: str, prediction: str, aliases: tuple[str, ...]) -> Verdict:
        try:
            correct = await self._plugin.judge(question, prediction, aliases)
        except Exception as e:  # a failing judge fails closed, as the LLM judge does
            log.warning("judge plug-in %s failed, counting the answer as wrong: %r", self.cfg.plugin, e)
            return Verdict(False, Method.ERROR, f"{type(e).__name__}: {e}")
        if not isinstance(correct, bool):
            raise JudgePluginError(f"game.judge.plugin = {self.cfg.plugin!r} returned {correct!r} for the answer "
                                   f"{prediction!r}; a judge must return True or False")
        return Verdict(correct, Method.PLUGIN)

    async def _ask_llm(self, question: str, prediction: str, aliases: tuple[str, ...]) -> bool:
        if self._session is None:
            raise RuntimeError("Judge is not open; use `async with Judge(cfg) as judge`")
        headers = {}
        if self.cfg.llm_api_key_env is not None:
            key = os.environ.get(self.cfg.llm_api_key_env)
            if not key:
                raise JudgeError(f"environment variable {self.cfg.llm_api_key_env} (judge.llm_api_key_env) is "
                                 "empty; export the judge's API key")
            headers["Authorization"] = f"Bearer {key}"
        body = {
            "model": self.cfg.llm_model,
            "messages": [
                {"role": "system", "content": JUDGE_SYSTEM},
                {"role": "user", "content": JUDGE_TEMPLATE.format(
                    question=question, prediction=prediction, references=" | ".join(aliases))},
            ],
            "temperature": 0.0,
            "max_tokens": 5,
        }
        url = self.cfg.llm_url.rstrip("/") + "/v1/chat/completions"
        last = ""
        for attempt in range(self.cfg.llm_max_retries + 1):
            try:
                async with self._session.post(url, json=body, headers=headers) as resp:
                    if resp.status >= 500:
                        last = f"HTTP {resp.status} from {url}"
                        await asyncio.sleep(0.2 * (attempt + 1))
                        continue
                    if resp.status != 200:
                        raise JudgeError(f"HTTP {resp.status} from {url}: {(await resp.text())[:200]}")
                    data = await resp.json(content_type=None)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                last = f"{type(e).__name__} talking to {url}: {e}"
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            try:
                reply = data["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise JudgeError(f"{url} answered without choices[0].message.content: {str(data)[:200]}") from None
            if not isinstance(reply, str):
                raise JudgeError(f"{url} answered a non-string content {reply!r}")
            return parse_verdict(reply)
        raise JudgeError(f"gave up after {self.cfg.llm_max_retries + 1} attempts: {last}")
