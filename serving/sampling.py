"""Next-token sampling and SGLang's logprob semantics for the reference server.

The logprob of a sampled token is log_softmax(logits / T) at that token, computed over the full vocabulary
*before* top-k / top-p / min-p truncation (T = 1 for greedy), as SGLang returns it. This is
what the learner recomputes, so the two must agree to ~1e-5 in fp32.

Shapes: V = vocabulary size. Functions take one row (V,) at a time: batches are small on CPU and per-request
options (temperature, top-k, seeds) differ, so a per-row loop is the readable choice.
"""

from __future__ import annotations

import torch

from ssp.serving.backend import SamplingOptions


def make_generator(seed: int | None) -> torch.Generator:
    """A per-request RNG: seeded by sampling_seed (reproducible), else from the global RNG."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
    return gen


def suppress(logits_V: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Logits with `token_ids` made impossible (min_new_tokens keeps EOS/stop ids out until reached)."""
    out = logits_V.clone()
    out[token_ids] = float("-inf")
    return out


def sample(logits_V: torch.Tensor, opts: SamplingOptions, gen: torch.Generator) -> tuple[int, float, torch.Tensor]:
    """Pick the next token. Returns (token id, its logprob, the full log-softmax row (V,) for top-logprobs)."""
    logits_V = logits_V.float()
    if opts.temperature == 0.0:
        logprobs_V = torch.log_softmax(logits_V, dim=-1)
        token = int(torch.argmax(logits_V).item())
        return token, float(logprobs_V[token].item()), logprobs_V
    logprobs_V = torch.log_softmax(logits_V / opts.temperature, dim=-1)
    probs_V = logprobs_V.exp()
    if opts.top_k > 0 and opts.top_k < probs_V.numel():
        kth = torch.topk(probs_V, opts.top_k).values[-1]
        probs_V = torch.where(probs_V >= kth, probs_V, torch.zeros_like(probs_V))
    if opts.top_p < 1.0:
        sorted_p, order = torch.sort(probs_V, descending=True)
        cum = torch.cumsum(sorted_p, dim=0)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop_sorted = (cum - sorted_p) > opts.top_p * cum[-1]
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        probs_V = probs_V.masked_fill(drop, 0.0)
    if opts.min_p > 0.0:
        probs_V = probs_V.masked_fill(probs_V < opts.min_p * probs_V.max(), 0.0)
    token = int(torch.multinomial(probs_V, 1, generator=gen).item())
    return token, float(logprobs_V[token].item()), logprobs_V


def top_logprobs(logprobs_V: torch.Tensor, k: int) -> list[tuple[float, int]]:
    """The k most likely (logprob, token id) pairs at one position, most likely first."""
    values, ids = torch.topk(logprobs_V, k)
    return [(float(v), int(i)) for v, i in zip(values.tolist(), ids.tolist())]


def clamp_logprob(x: float) -> float:
    """SGLang clamps to the dtype minimum so -inf never reaches JSON."""
    return max(x, torch.finfo(torch.float32).min)
