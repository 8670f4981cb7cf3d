"""The runner's slot KV cache computes what the model computes on each sequence alone, whatever happens to the
batch around it: rows joining with different lengths, rows leaving from the middle, prefixes reused from the prefix
cache, and buffers growing past their first capacity. Reference: one plain forward over the sequence's tokens."""

from __future__ import annotations

import pytest
import torch

from ssp.serving.model_runner import ModelRunner, Prompt

TOL = 1e-4


@torch.no_grad()
def alone(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Next-token logits after `ids`, from one forward pass without any cache."""
    return runner.model(torch.tensor([ids])).logits[0, -1].float()


def prompt(seed: int, n: int) -> list[int]:
    return [1] + [(seed * 7919 + i * 104729) % 40000 + 100 for i in range(n - 1)]


def same_kv(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal up to fp32 rounding: K/V grow to ~20 in the deep layers, where matmuls of another shape (a padded batch
    vs one prompt) round differently at ~1e-5 of that scale; a padded token leaking in would be off by O(1)."""
    return float((got - ref).abs().max()) <= TOL * max(1.0, float(ref.abs().max()))


def step(runner: ModelRunner, seqs: list[list[int]]) -> None:
    """One greedy decode step for every row; each row's logits must equal its sequence's alone."""
    logits_BV = runner.decode([s[-1] for s in seqs], [len(s) - 1 for s in seqs])
    for row, seq in enumerate(seqs):
        ref = alone(runner, seq)
        assert torch.allclose(logits_BV[row], ref, atol=TOL), f"row {row} (length {len(seq)}) drifted"
        seq.append(int(ref.argmax()))


def join(runner: ModelRunner, seqs: list[list[int]], ids: list[int]) -> None:
    pre = runner.prefill(ids)
    assert torch.allclose(pre.logits_NV[-1], alone(runner, ids), atol=TOL)
    runner.add(pre)
    seqs.append(ids + [int(pre.logits_NV[-1].argmax())])


def test_rows_join_and_leave_without_changing_any_row(runner: ModelRunner) -> None:
    runner.clear()
    seqs: list[list[int]] = []
    join(runner, seqs, prompt(1, 5))
    step(runner, seqs)
    join(runner, seqs, prompt(2, 23))  # longer than the running row
    join(runner, seqs, prompt(3, 2))  # shorter than both
    step(runner, seqs)
    runner.keep([0, 2])  # the middle row leaves
    seqs = [seqs[0], seqs[2]]
    step(runner, seqs)
    join(runner, seqs, prompt(4, 9))
    runner.keep([2, 0])  # reordered, the last one first
    seqs = [seqs[2], seqs[0]]
    step(runner, seqs)
    step(runner, seqs)
    assert runner.rows == 2


def test_buffers_grow_past_their_first_capacity(runner: ModelRunner) -> None:
    runner.clear()
    seqs: list[list[int]] = []
    join(runner, seqs, prompt(5, 62))
    for i in range(4):  # more rows than the first slot, and columns past the first 64
        join(runner, seqs, prompt(6 + i, 3 + i))
        step(runner, seqs)
    assert runner.cache.capacity_cols > 64 and runner.cache.capacity_rows >= 5


def test_prefix_kv_reused_from_a_row_computes_the_same(runner: ModelRunner) -> None:
    runner.clear()
    seqs: list[list[int]] = []
    join(runner, seqs, prompt(7, 12))
    join(runner, seqs, prompt(8, 20))
    step(runner, seqs)
    cached = [(k.clone(), v.clone()) for k, v in runner.row_kv(1)]  # covers seqs[1] minus its newest token
    turn2 = seqs[1] + prompt(9, 6)
    runner.keep([0])
    pre = runner.prefill(turn2, past=cached)
    assert torch.allclose(pre.logits_NV[-1], alone(runner, turn2), atol=TOL)
    runner.add(pre)
    seqs = [seqs[0], turn2 + [int(pre.logits_NV[-1].argmax())]]
    step(runner, seqs)


def test_prefill_keeps_prompt_logits_and_its_kv_until_the_next_change(runner: ModelRunner) -> None:
    runner.clear()
    seqs: list[list[int]] = []
    join(runner, seqs, prompt(10, 8))
    ids = prompt(11, 10)
    pre = runner.prefill(ids, keep_logits=4)
    with torch.no_grad():
        full = runner.model(torch.tensor([ids])).logits[0, -4:].float()
    assert torch.allclose(pre.logits_NV, full, atol=TOL)
    kv = runner.kv_of(pre)
    assert kv[0][0].shape[2] == len(ids)
    runner.keep([0])  # not added (say it finished at its first token): the batch moves on
    with pytest.raises(AssertionError):
        runner.add(pre)
    step(runner, seqs)


def test_prompts_prefilled_together_compute_what_each_computes_alone(runner: ModelRunner) -> None:
    """One padded pass over prompts of different lengths (one on a reused prefix, one keeping prompt logits) gives
    each the logits and KV of its own prefill alone; padding never reaches a row's columns, and rows that skip the
    batch (finished at their first token) leave the others' KV intact when these move down."""
    runner.clear()
    seqs: list[list[int]] = []
    join(runner, seqs, prompt(12, 7))
    step(runner, seqs)
    base = prompt(13, 11)
    alone_pre = runner.prefill(base)
    cached = [(k.clone(), v.clone()) for k, v in runner.kv_of(alone_pre)]
    prompts = [Prompt(prompt(14, 3)), Prompt(base + prompt(15, 4), past=cached), Prompt(prompt(16, 30)),
               Prompt(prompt(17, 9), keep_logits=5)]
    reference = []
    for p in prompts:  # each alone, from an empty batch: logits and KV
        runner.clear()
        pre = runner.prefill(p.ids, keep_logits=p.keep_logits)
        reference.append((pre.logits_NV.clone(), [(k.clone(), v.clone()) for k, v in runner.kv_of(pre)]))
    runner.clear()
    seqs = []
    join(runner, seqs, prompt(12, 7))
    step(runner, seqs)
    together = runner.prefill_batch(prompts)
    for pre, p, (logits, kv) in zip(together, prompts, reference):
        assert pre.length == len(p.ids) and pre.logits_NV.shape == logits.shape
        assert torch.allclose(pre.logits_NV, logits, atol=TOL)
        got = runner.kv_of(pre)
        for (k, v), (k_ref, v_ref) in zip(got, kv):
            assert k.shape == k_ref.shape and same_kv(k, k_ref) and same_kv(v, v_ref)
    for i in (1, 3):  # the first and third finished at their first token: the others join and move down
        runner.add(together[i])
        seqs.append(prompts[i].ids + [int(together[i].logits_NV[-1].argmax())])
    with pytest.raises(AssertionError):
        runner.add(together[2])  # skipped: its slot may now hold another row
    assert runner.rows == 3
    step(runner, seqs)
    step(runner, seqs)
