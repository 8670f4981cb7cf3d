"""SGLang's /generate request parsing, validation and response shapes, and its error answers.

Pure functions, no I/O: `serving/app.py` calls them and turns `ApiError` into HTTP answers. Validation follows
SGLang's order and error shapes, because clients (ours and others) branch on them:

1. body parse and top-level field types  -> 400 {"object": "error", "message", "type": "Bad Request", ...}
2. the contract gate: `sampling_params` keys and JSON types -> 400 {"error": "<serde-style text>"}
3. values (ranges, lengths, ids, and this server's caps on what one call may cost: n, batch size, logprob asks,
   stop strings, rids; ServingConfig) -> 400 {"error": {"message": ...}} (in a stream: 200 + SSE error event)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from ssp.serving.backend import GenerateOutput, GenerateRequest, ModelDescription, SamplingOptions, TopLogprobs
from ssp.serving.config import ServingConfig

ErrorKind = Literal["request", "contract", "invalid"]

GREEDY_TEMPERATURE = 1e-6
"""SGLang treats temperature below this as greedy."""
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
"""The contract gate reads integer fields as i64 (serde); orjson also accepts up to 2**64 - 1."""


class ApiError(Exception):
    """A rejected request, with the HTTP status and the SGLang error shape of its validation stage.

    kind "request": FastAPI-level (bad JSON, wrong top-level type, missing required key) — always an HTTP error.
    kind "contract": the contract gate (sampling_params keys/types) — always an HTTP error, `error` is a string.
    kind "invalid": a value check — an HTTP error, or in a stream a 200 with an SSE error event.
    """

    def __init__(self, kind: ErrorKind, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status

    def body(self) -> dict[str, Any]:
        if self.kind == "request":
            return error_response(self.message, self.status)
        if self.kind == "contract":
            return {"error": self.message}
        return {"error": {"message": self.message}}

    def sse_body(self) -> dict[str, Any]:
        """The in-stream error event of SGLang's streaming path."""
        return {"error": {"message": self.message, "type": "invalid_request_error", "code": self.status,
                          "retryable": self.status >= 500}}


def error_response(message: str, status: int) -> dict[str, Any]:
    """SGLang's ErrorResponse (FastAPI validation errors, queue full, ...)."""
    return {"object": "error", "message": message, "type": "Bad Request" if status == 400 else str(status),
            "param": None, "code": status}


# ---- JSON ----------------------------------------------------------------------------------------------------------


def parse_json(raw: bytes, *, required: bool = True) -> Any:
    """Parse a request body as strict JSON with orjson, as SGLang does: no NaN/Infinity, no number out of double
    range; an integer beyond 64 bits reads as a float, which the field checks then reject where an int belongs."""
    if not raw.strip():
        if required:
            raise ApiError("request", "Field required: the request body is missing; send a JSON object (at least {})")
        return {}
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ApiError("request", f"JSON decode error: {e}") from None


def dumps(obj: Any) -> bytes:
    """Serialize a response as SGLang does (orjson: compact UTF-8, non-finite floats become null)."""
    return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)


# ---- serde-style type descriptions (the contract gate's messages) --------------------------------------------------


def _serde_desc(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{str(v).lower()}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f"string {json.dumps(v)}"
    if isinstance(v, list):
        return "sequence"
    return "map"


def _contract_type_error(v: Any, expected: str) -> ApiError:
    return ApiError("contract", f"invalid type: {_serde_desc(v)}, expected {expected}")


def _check_i64(v: Any) -> None:
    """An integer field of the contract: a JSON integer that fits i64 (serde's wording when it does not)."""
    if not _is_int(v):
        raise _contract_type_error(v, "i64")
    if not I64_MIN <= v <= I64_MAX:
        raise ApiError("contract", f"invalid value: integer `{v}`, expected i64")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---- sampling_params -----------------------------------------------------------------------------------------------

SAMPLING_KEYS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
)
"""Exactly SGLang 0.5.23's allowed key set, in its order (the unknown-field message lists them)."""

_INT_KEYS = ("max_new_tokens", "top_k", "min_new_tokens", "n", "stream_interval", "sampling_seed", "beam_width")
_FLOAT_KEYS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
_BOOL_KEYS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")
_STR_KEYS = ("json_schema", "regex", "ebnf", "structural_tag")

_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "stop_regex": None,
    "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None, "logit_bias": None,
    "custom_params": None, "beam_width": None, "watermark": None, "choice": None,
}
"""Keys SGLang accepts that this server does not implement: any other value is refused (fail closed)."""


def check_sampling_contract(params: Any) -> dict[str, Any]:
    """Stage 2: the key set and JSON types of one `sampling_params` object. Returns it with nulls dropped."""
    if not isinstance(params, dict):
        raise _contract_type_error(params, "struct SamplingParams")
    for key in params:
        if key not in SAMPLING_KEYS:
            expected = ", ".join(f"`{k}`" for k in SAMPLING_KEYS)
            raise ApiError("contract", f"unknown field `{key}`, expected one of {expected}")
    # A null means "the default", except max_new_tokens, where null means "up to the context limit".
    out = {k: v for k, v in params.items() if v is not None or k == "max_new_tokens"}
    for key, v in out.items():
        if v is None:
            continue
        if key in _INT_KEYS:
            _check_i64(v)
        if key in _FLOAT_KEYS and not _is_number(v):
            raise _contract_type_error(v, "f64")
        if key in _BOOL_KEYS and not isinstance(v, bool):
            raise _contract_type_error(v, "a boolean")
        if key in _STR_KEYS and not isinstance(v, str):
            raise _contract_type_error(v, "a string")
        if key in ("stop", "stop_regex") and not (
            isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
        ):
            raise _contract_type_error(v, "a string or a sequence of strings")
        if key == "stop_token_ids":
            if not isinstance(v, list):
                raise _contract_type_error(v, "a sequence")
            for t in v:
                _check_i64(t)
        if key == "logit_bias" and not isinstance(v, dict):
            raise _contract_type_error(v, "a map")
    return out


def build_sampling(params: dict[str, Any], *, prompt_len: int, desc: ModelDescription,
                   cfg: ServingConfig) -> SamplingOptions:
    """Stage 3: value checks of one request's sampling params (SGLang's messages, and this server's caps from `cfg`),
    resolved against the prompt."""
    for key, default in _UNSUPPORTED_DEFAULTS.items():
        if key in params and params[key] != default:
            raise ApiError("invalid", f"{key}={params[key]!r} is not supported by the ssp reference server; leave it "
                                      f"at its default ({default}) or use a real SGLang server")
    temperature = float(params.get("temperature", 1.0))
    top_p = float(params.get("top_p", 1.0))
    top_k = int(params.get("top_k", -1))
    min_p = float(params.get("min_p", 0.0))
    if temperature < 0.0:
        raise ApiError("invalid", f"temperature must be non-negative, got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise ApiError("invalid", f"top_p must be in (0, 1], got {top_p}.")
    if top_k == 0 or top_k < -1:
        raise ApiError("invalid", f"top_k must be -1 (disable), or at least 1, got {top_k}.")
    if not 0.0 <= min_p <= 1.0:
        raise ApiError("invalid", f"min_p must be in [0, 1], got {min_p}.")
    stop = params.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > cfg.max_stop_strings:
        raise ApiError("invalid", f"stop must contain at most {cfg.max_stop_strings} strings, got {len(stop)} "
                                  "(serving.max_stop_strings).")
    longest = max(map(len, stop), default=0)
    if longest > cfg.max_stop_string_chars:
        raise ApiError("invalid", f"stop strings must be at most {cfg.max_stop_string_chars} characters long, got one "
                                  f"of {longest} (serving.max_stop_string_chars); use a shorter stop string.")
    stop_token_ids = tuple(params.get("stop_token_ids", ()))
    for t in stop_token_ids:
        if not 0 <= t < desc.vocab_size:
            raise ApiError("invalid", f"stop_token_ids must be in [0, {desc.vocab_size}), got {t}.")
    stream_interval = params.get("stream_interval")
    if stream_interval is not None and stream_interval < 1:
        raise ApiError("invalid", f"stream_interval must be at least 1, got {stream_interval}.")

    room = desc.context_length - prompt_len
    max_new_tokens = params.get("max_new_tokens", 128)
    if max_new_tokens is not None and max_new_tokens < 0:
        raise ApiError("invalid", f"max_new_tokens must be at least 0, got {max_new_tokens}.")
    if prompt_len >= desc.context_length:
        raise ApiError("invalid", f"The input ({prompt_len} tokens) is longer than the model's context length "
                                  f"({desc.context_length} tokens).")
    if max_new_tokens is None:  # an explicit null: up to the context limit
        max_new_tokens = room
    if max_new_tokens > room:
        total = prompt_len + max_new_tokens
        raise ApiError("invalid", f"Requested token count exceeds the model's maximum context length of "
                                  f"{desc.context_length} tokens. You requested a total of {total} tokens: {prompt_len} "
                                  f"tokens from the input messages and {max_new_tokens} tokens for the completion. "
                                  "Please reduce the number of tokens in the input messages or the completion to fit "
                                  "within the limit.")
    if prompt_len > desc.max_req_input_len:
        raise ApiError("invalid", f"Input length ({prompt_len} tokens) exceeds the maximum allowed length "
                                  f"({desc.max_req_input_len} tokens). Use a shorter input or enable "
                                  "--allow-auto-truncate.")
    min_new_tokens = params.get("min_new_tokens", 0)
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ApiError("invalid", f"min_new_tokens must be in [0, max_new_tokens({max_new_tokens})], got "
                                  f"{min_new_tokens}.")
    greedy = temperature < GREEDY_TEMPERATURE
    return SamplingOptions(
        max_new_tokens=max_new_tokens,
        temperature=0.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p,
        top_k=-1 if greedy else top_k,
        min_p=0.0 if greedy else min_p,
        min_new_tokens=min_new_tokens,
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=params.get("ignore_eos", False),
        skip_special_tokens=params.get("skip_special_tokens", True),
        spaces_between_special_tokens=params.get("spaces_between_special_tokens", True),
        no_stop_trim=params.get("no_stop_trim", False),
        sampling_seed=params.get("sampling_seed"),
    )


# ---- /generate body -> requests ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class GenerateCall:
    """One /generate call, expanded into the samples to run (prompt-major for n > 1)."""

    items: list[GenerateRequest]
    batched: bool
    """The response is a JSON array (list input or n > 1); stream chunks then carry "index"."""
    stream: bool
    return_text_in_logprobs: bool
    return_prompt_token_ids: bool
    stream_intervals: list[int]
    """Tokens between stream chunks, per item."""


def _request_type_error(field: str, expected: str, value: Any) -> ApiError:
    shown = json.dumps(value)[:80]
    return ApiError("request", f"body.{field}: Input should be {expected}, got {shown}")


def _per_item(body: dict[str, Any], key: str, default: Any, n_items: int, check: Any, expected: str) -> list[Any]:
    """A top-level field that may be a scalar (applies to every prompt) or a list (one per prompt)."""
    v = body.get(key)
    if v is None:
        return [default] * n_items
    if isinstance(v, list):
        if not all(check(x) for x in v):
            raise _request_type_error(key, expected, v)
        if len(v) != n_items:
            raise ApiError("invalid", f"The length of {key} ({len(v)}) does not match the batch size ({n_items}).")
        return v
    if not check(v):
        raise _request_type_error(key, expected, v)
    return [v] * n_items


def _outside_vocab(ids: Sequence[int], vocab_size: int) -> int | None:
    """The first id outside [0, vocab_size), or None. The check runs min and max in C: a prompt has thousands of
    ids, and a Python loop over them was a visible share of a simulated server's work per request in a burst of
    verifier prompts (~5.6k ids each)."""
    if not ids or (min(ids) >= 0 and max(ids) < vocab_size):
        return None
    return next(t for t in ids if not 0 <= t < vocab_size)


def _is_int_list(v: Any) -> bool:
    # NOTE: the types are collected in C (map, set): input_ids are thousands of ids per request; bools are not ints.
    return isinstance(v, list) and (not v or set(map(type, v)) == {int})


def parse_generate(body: Any, *, desc: ModelDescription, cfg: ServingConfig, encode: Any) -> GenerateCall:
    """Validate a /generate body (all three stages, with this server's caps from `cfg`) and expand it.
    `encode(text) -> ids` tokenizes text prompts."""
    if not isinstance(body, dict):
        raise ApiError("request", f"body: Input should be a JSON object, got {json.dumps(body)[:80]}")
    # Stage 1: declared top-level types.
    text, input_ids = body.get("text"), body.get("input_ids")
    if text is not None and not (isinstance(text, str) or (isinstance(text, list) and
                                                             all(isinstance(t, str) for t in text))):
        raise _request_type_error("text", "a string or a list of strings", text)
    if input_ids is not None and not (_is_int_list(input_ids) or (isinstance(input_ids, list) and
                                                                  all(_is_int_list(x) for x in input_ids))):
        raise _request_type_error("input_ids", "a list of integers or a list of lists of integers", input_ids)
    for key in ("stream", "return_prompt_token_ids"):
        if key in body and body[key] is not None and not isinstance(body[key], bool):
            raise _request_type_error(key, "a valid boolean", body[key])
    rid = body.get("rid")
    if rid is not None and not (isinstance(rid, str) or (isinstance(rid, list) and
                                                         all(isinstance(r, str) for r in rid))):
        raise _request_type_error("rid", "a string or a list of strings", rid)
    # Stage 2: the contract gate.
    if body.get("return_text_in_logprobs") is not None and not isinstance(body["return_text_in_logprobs"], bool):
        raise _contract_type_error(body["return_text_in_logprobs"], "a boolean")
    raw_sampling = body.get("sampling_params")
    sampling_list = raw_sampling if isinstance(raw_sampling, list) else [raw_sampling or {}]
    sampling_list = [check_sampling_contract(p) for p in sampling_list]

    # Stage 3: values. The call's size first: nothing below may do work that grows with a refused n or batch.
    if input_ids is not None:
        if not input_ids:
            raise ApiError("invalid", "input_ids cannot be empty.")
        batched = isinstance(input_ids[0], list)
        given: list[Any] = input_ids if batched else [input_ids]
    elif text is not None:
        batched = isinstance(text, list)
        given = text if batched else [text]
    else:
        raise ApiError("invalid", "Either text, input_ids or input_embeds should be provided.")
    if not given:
        raise ApiError("invalid", "The batch is empty: send at least one prompt.")
    n = _check_call_size(len(given), sampling_list, rid, cfg)
    prompts: list[list[int]] = given if input_ids is not None else [encode(t) for t in given]
    for ids in prompts:
        if not ids:
            raise ApiError("invalid", "input_ids cannot be empty.")
        bad = _outside_vocab(ids, desc.vocab_size)
        if bad is not None:
            raise ApiError("invalid", f"input_ids contain token id {bad}, outside the vocabulary [0, "
                                      f"{desc.vocab_size}).")
    n_prompts = len(prompts)
    if isinstance(raw_sampling, list):
        if len(sampling_list) != n_prompts:
            raise ApiError("invalid", f"The length of sampling_params ({len(sampling_list)}) does not match the "
                                      f"batch size ({n_prompts}).")
    else:
        sampling_list = sampling_list * n_prompts

    per_item_keys = ("return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob")
    if n > 1:
        listed = [k for k in per_item_keys if isinstance(body.get(k), list) and
                  not (k == "token_ids_logprob" and _is_int_list(body[k]))]
        if listed:
            raise ApiError("invalid", f"{listed[0]} must be a scalar when n > 1 (per-item lists are not supported "
                                      "with parallel sampling); send n separate requests instead.")
    return_logprob = _per_item(body, "return_logprob", False, n_prompts, lambda x: isinstance(x, bool),
                               "a valid boolean")
    start_lens = _per_item(body, "logprob_start_len", -1, n_prompts, _is_int, "a valid integer")
    top_nums = _per_item(body, "top_logprobs_num", 0, n_prompts, _is_int, "a valid integer")
    tid_raw = body.get("token_ids_logprob")
    if tid_raw is None:
        token_ids = [()] * n_prompts
    elif _is_int_list(tid_raw):
        token_ids = [tuple(tid_raw)] * n_prompts
    elif isinstance(tid_raw, list) and all(_is_int_list(x) for x in tid_raw) and len(tid_raw) == n_prompts:
        token_ids = [tuple(x) for x in tid_raw]
    else:
        raise _request_type_error("token_ids_logprob", "a list of integers (or one list per prompt)", tid_raw)

    if n > 1:
        rids = [uuid.uuid4().hex for _ in range(n_prompts * n)]
    elif batched:
        if isinstance(rid, list):
            if len(rid) != n_prompts:
                raise ApiError("invalid", "The specified rids length mismatch with the batch_size for batch "
                                          "processing.")
            dup = _first_repeat(rid)
            if dup is not None:
                raise ApiError("invalid", f"Duplicate request ID detected: {dup}")
            rids = list(rid)
        elif isinstance(rid, str):
            rids = [f"{rid}_{i}" for i in range(n_prompts)]
        else:
            rids = [uuid.uuid4().hex for _ in range(n_prompts)]
    else:
        if isinstance(rid, list):
            if len(rid) != 1:
                raise ApiError("invalid", "The specified rids length mismatch with the batch_size for batch "
                                          "processing.")
            rid = rid[0]
        rids = [rid if rid is not None else uuid.uuid4().hex]

    items: list[GenerateRequest] = []
    intervals: list[int] = []
    for p, ids in enumerate(prompts):
        params = {k: v for k, v in sampling_list[p].items() if k != "n"}
        sampling = build_sampling(params, prompt_len=len(ids), desc=desc, cfg=cfg)
        start = start_lens[p]
        if return_logprob[p]:
            if start < -1 or start > len(ids):
                raise ApiError("invalid", f"req.logprob_start_len={start} is higher than the number of input tokens "
                                          f"{len(ids)}. Please use a smaller logprob_start_len (-1 = no prompt "
                                          "logprobs).")
            _check_logprob_asks(top_nums[p], token_ids[p], desc, cfg)
        for s in range(n):
            items.append(GenerateRequest(
                rid=rids[p * n + s], input_ids=list(ids), sampling=sampling, return_logprob=return_logprob[p],
                logprob_start_len=start if return_logprob[p] else -1,
                top_logprobs_num=top_nums[p] if return_logprob[p] else 0,
                token_ids_logprob=token_ids[p] if return_logprob[p] else (),
            ))
            intervals.append(sampling_list[p].get("stream_interval") or 1)
    return GenerateCall(
        items=items, batched=batched or n > 1, stream=bool(body.get("stream")),
        return_text_in_logprobs=bool(body.get("return_text_in_logprobs")),
        return_prompt_token_ids=bool(body.get("return_prompt_token_ids")), stream_intervals=intervals,
    )


def _check_call_size(n_prompts: int, sampling_list: list[dict[str, Any]], rid: Any, cfg: ServingConfig) -> int:
    """The caps on what one call expands into: n, prompts x n samples, the rid list. Returns n."""
    ns = {p.get("n") or 1 for p in sampling_list}
    if len(ns) > 1:
        raise ApiError("invalid", "The n parameter must be the same for all samples in a batch.")
    n = ns.pop()
    if n < 1:
        raise ApiError("invalid", f"n must be at least 1, got {n}.")
    if n > cfg.max_n:
        raise ApiError("invalid", f"n must be at most {cfg.max_n} (serving.max_n), got {n}; send several requests "
                                  "or raise serving.max_n.")
    if n_prompts * n > cfg.max_batch_size:
        raise ApiError("invalid", f"The call expands into {n_prompts * n} samples ({n_prompts} prompts x n={n}), more "
                                  f"than {cfg.max_batch_size} (serving.max_batch_size); split it into smaller calls.")
    rids = rid if isinstance(rid, list) else [] if rid is None else [rid]
    if len(rids) > cfg.max_batch_size:
        raise ApiError("invalid", f"rid lists {len(rids)} ids, more than {cfg.max_batch_size} per call "
                                  "(serving.max_batch_size); split the batch.")
    longest = max(map(len, rids), default=0)
    if longest > cfg.max_rid_chars:
        raise ApiError("invalid", f"rid must be at most {cfg.max_rid_chars} characters long (serving.max_rid_chars), "
                                  f"got one of {longest}; use shorter request ids.")
    return n


def _first_repeat(items: list[str]) -> str | None:
    """The first item seen a second time, in one pass."""
    seen: set[str] = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _check_logprob_asks(top_num: int, token_ids: tuple[int, ...], desc: ModelDescription, cfg: ServingConfig) -> None:
    """top_logprobs_num and token_ids_logprob of one prompt that returns logprobs: each costs work and response size
    per position, and top_logprobs_num above the vocabulary cannot be answered."""
    if top_num < 0:
        raise ApiError("invalid", f"top_logprobs_num must be at least 0, got {top_num}.")
    if top_num > desc.vocab_size:
        raise ApiError("invalid", f"top_logprobs_num must be at most the vocabulary size ({desc.vocab_size}), got "
                                  f"{top_num}.")
    if top_num > cfg.max_top_logprobs_num:
        raise ApiError("invalid", f"top_logprobs_num must be at most {cfg.max_top_logprobs_num} "
                                  f"(serving.max_top_logprobs_num), got {top_num}.")
    if len(token_ids) > cfg.max_token_ids_logprob:
        raise ApiError("invalid", f"token_ids_logprob must list at most {cfg.max_token_ids_logprob} ids "
                                  f"(serving.max_token_ids_logprob), got {len(token_ids)}.")
    bad = _outside_vocab(token_ids, desc.vocab_size)
    if bad is not None:
        raise ApiError("invalid", f"token_ids_logprob contains {bad}, outside [0, {desc.vocab_size}).")


# ---- responses -----------------------------------------------------------------------------------------------------


def format_output(
    req: GenerateRequest, out: GenerateOutput, *, e2e_latency_s: float, token_text: Any | None,
    return_prompt_token_ids: bool,
) -> dict[str, Any]:
    """One response object (or stream chunk) in SGLang's shape. `token_text(id) -> str` fills logprob texts."""

    def entry(logprob: float | None, tid: int) -> list[Any]:
        return [logprob, tid, token_text(tid) if token_text is not None else None]

    def tops(rows: list[TopLogprobs | None]) -> list[Any]:
        return [None if row is None else [entry(lp, t) for lp, t in row] for row in rows]

    meta: dict[str, Any] = {"id": out.rid, "finish_reason": out.finish.to_json() if out.finish else None}
    if out.ran:
        meta["prompt_tokens"] = out.prompt_tokens
    meta["completion_tokens"] = len(out.output_ids)
    if out.ran:
        meta["cached_tokens"] = out.cached_tokens
        meta["reasoning_tokens"] = 0
    meta["weight_version"] = out.weight_version
    meta["num_retractions"] = out.num_retractions
    if req.return_logprob:
        start = req.logprob_start_len
        meta["input_token_logprobs"] = (
            [] if start < 0 else [entry(lp, t) for lp, t in zip(out.input_logprobs, req.input_ids[start:])]
        )
        meta["output_token_logprobs"] = (
            [[lp, t, None] for lp, t in zip(out.output_logprobs, out.output_ids)] if token_text is None
            else [entry(lp, t) for lp, t in zip(out.output_logprobs, out.output_ids)])
        meta["output_token_logprobs_length"] = len(meta["output_token_logprobs"])
        if req.top_logprobs_num > 0:
            meta["input_top_logprobs"] = tops(out.input_top_logprobs)
            meta["output_top_logprobs"] = tops(list(out.output_top_logprobs))
        if req.token_ids_logprob:
            meta["input_token_ids_logprobs"] = tops(out.input_token_ids_logprobs)
            meta["output_token_ids_logprobs"] = tops(list(out.output_token_ids_logprobs))
    if out.finish is not None:
        meta["e2e_latency"] = e2e_latency_s
        meta["weight_versions"] = [{"version": v, "start": s, "end": e} for v, s, e in out.weight_spans]
    result: dict[str, Any] = {"text": out.text, "output_ids": list(out.output_ids), "meta_info": meta}
    if return_prompt_token_ids:
        result["prompt_token_ids"] = list(req.input_ids)
    return result
