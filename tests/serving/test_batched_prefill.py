"""The scheduler prefills requests admitted together in one pass; each still gets what it gets alone, and a pass that
raises is rerun one request at a time so only the request that causes the failure fails."""

from __future__ import annotations

import threading

import pytest
import torch

from ssp.serving.backend import GenerateOutput, GenerateRequest, SamplingOptions
from ssp.serving.batcher import ContinuousBatcher
from ssp.serving.model_runner import ModelRunner, Prefilled, Prompt

PROMPTS = [[1, 504, 3010], [1] + list(range(400, 430)), [1, 900, 901, 902, 903, 904, 905, 906, 907],
           [1, 77, 78, 79, 80, 81]]
NEW_TOKENS = 4


def run_together(runner: ModelRunner, prompts: list[list[int]]) -> dict[str, GenerateOutput]:
    """Queue every prompt while paused, then resume: the first admission takes them all at once."""
    sched = ContinuousBatcher(runner, max_running=8, max_queued=8, max_total_tokens=4096, context_length=2048,
                      weight_version="v", prefix_cache_tokens=0)
    runner.clear()
    finals: dict[str, GenerateOutput] = {}
    done = threading.Event()

    def emit(out: GenerateOutput) -> None:
        if out.finish is not None:
            finals[out.rid] = out
            if len(finals) == len(prompts):
                done.set()

    sched.start()
    try:
        sched.call(lambda: sched.pause("in_place")).result()
        for i, ids in enumerate(prompts):
            req = GenerateRequest(rid=f"r{i}", input_ids=ids, return_logprob=True,
                                  sampling=SamplingOptions(max_new_tokens=NEW_TOKENS, temperature=0.0,
                                                           ignore_eos=True))
            sched.call(lambda req=req: sched.add(req, emit)).result()  # type: ignore[misc]
        sched.call(sched.resume).result()
        assert done.wait(120), "requests did not finish"
    finally:
        sched.stop()
    return finals


def test_requests_prefilled_together_get_what_they_get_alone(runner: ModelRunner,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    alone = {f"r{i}": run_together(runner, [ids])["r0"] for i, ids in enumerate(PROMPTS)}
    passes: list[int] = []
    batched = runner.prefill_batch

    def spy(prompts: list[Prompt]) -> list[Prefilled]:
        passes.append(len(prompts))
        return batched(prompts)

    monkeypatch.setattr(runner, "prefill_batch", spy)
    together = run_together(runner, PROMPTS)
    assert len(PROMPTS) in passes, f"not prefilled in one pass: {passes}"
    for rid, ref in alone.items():
        got = together[rid]
        assert got.output_ids == ref.output_ids
        assert len(got.output_logprobs) == NEW_TOKENS
        for a, b in zip(got.output_logprobs, ref.output_logprobs):
            assert a is not None and b is not None and abs(a - b) < 1e-4


def test_a_failing_batched_prefill_fails_only_the_request_that_causes_it(runner: ModelRunner,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bad = PROMPTS[2]
    one, many = runner.prefill, runner.prefill_batch

    def batched(prompts: list[Prompt]) -> list[Prefilled]:
        if len(prompts) > 1:
            raise RuntimeError("planted fault in the batched pass")
        return many(prompts)

    def single(ids: list[int], **kwargs: object) -> Prefilled:
        if ids == bad:
            raise RuntimeError("planted fault: this prompt")
        return one(ids, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "prefill_batch", batched)
    monkeypatch.setattr(runner, "prefill", single)
    finals = run_together(runner, PROMPTS)
    for i in range(len(PROMPTS)):
        finish = finals[f"r{i}"].finish
        assert finish is not None
        if PROMPTS[i] == bad:
            assert finish.status_code == 500 and "planted fault: this prompt" in (finish.message or "")
        else:
            assert finish.type == "length" and len(finals[f"r{i}"].output_ids) == NEW_TOKENS
