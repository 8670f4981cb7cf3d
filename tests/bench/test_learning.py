"""`ssp bench learning`'s verdicts: what each arm runs with, which scores separate, and the printed lines. The arms
themselves are `ssp train` runs (tested in tests/launcher); the bench's own run is minutes of real training."""

from __future__ import annotations

import re
from pathlib import Path

from ssp.bench.learning import ARMS, arm_overrides, compare, learning_line
from ssp.engine.evaluation import EvalResult, QuestionRecord, average, summarize


def _result(correct: int, n: int = 20) -> EvalResult:
    records = [QuestionRecord(dataset="qa", id=str(i), question="q", golden_answers=("Paris",),
                              prediction="Paris" if i < correct else "Rome", em=i < correct,
                              f1=1.0 if i < correct else 0.0, searches=1, queries=("q",), turns=2, end="answer",
                              generated_tokens=3, elapsed_s=0.1, response="")
               for i in range(n)]
    s = summarize("qa", records)
    return EvalResult(model="m", datasets=(s,), average=average([s]), wall_s=1.0, out_dir=Path("."))


def test_arms_differ_only_in_the_learning_rate() -> None:
    runs = {arm: arm_overrides(sets, ["learner.lr=3e-5"], name=f"x-{arm}", steps=12) for arm, sets in ARMS}
    assert runs["control"][-1] == "learner.lr=0" and runs["control"][:-1] == [
        "learner.lr=3e-5", 'train.name="x-control"', "train.steps=12", "train.eval_before=false"]
    assert runs["trained"] == ["learner.lr=3e-5", 'train.name="x-trained"', "train.steps=12", "train.eval_before=false"]


def test_a_score_rose_only_when_the_intervals_separate() -> None:
    rows = {r["metric"]: r for r in compare(_result(2), _result(16))}  # 10% [3, 30] vs 80% [58, 92]
    assert rows["QA exact match %"]["separation"] == 1
    line = learning_line(rows["QA exact match %"])
    assert re.fullmatch(r"learning: QA exact match % control 10\.00 \[2\.79, 30\.10\] trained 80\.00 "
                        r"\[58\.40, 91\.93\] -> rose", line), line
    assert {r["separation"] for r in compare(_result(2), _result(5))} == {0}  # within noise
    assert learning_line(compare(_result(16), _result(2))[0]).endswith("-> fell")
