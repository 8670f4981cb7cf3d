"""The transformers model behind the reference server, and the KV cache of the running batch.

Continuous batching needs one forward pass over sequences of different lengths that join and leave at any step.
We keep one `DynamicCache` for the running batch, left-padded: every row ends at the same column, so a decode step
appends one column for all rows; a 2-D attention mask hides the padding and explicit position ids keep RoPE right.
A new sequence is prefilled alone (batch of one, no padding: exactly what `model.generate` computes) and then
merged into the batch cache; finished rows are cut out, and columns that became padding in every row are trimmed.

Legend: B = running rows, T = cache columns, L = prompt length, V = vocabulary, H = KV heads, D = head dim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Prefilled:
    """One sequence after its prefill: its own cache (B=1, T=L) and the logits it produced."""

    cache: DynamicCache
    length: int
    logits_NV: torch.Tensor
    """Logits of the last N prompt positions (N = 1 unless prompt logprobs were asked for)."""


class ModelRunner:
    """Owns the model, the tokenizer, and the batch KV cache. Not thread-safe: one scheduler thread drives it."""

    def __init__(self, model_dir: Path, *, device: str, dtype: torch.dtype) -> None:
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype, attn_implementation="sdpa")
        self.model.to(self.device).eval()
        self.config = self.model.config
        self.num_layers = int(self.config.num_hidden_layers)
        self.cache: DynamicCache | None = None
        self.mask_BT = torch.zeros((0, 0), dtype=torch.long, device=self.device)

    # ---- facts -----------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def eos_ids(self) -> set[int]:
        """The model's EOS token id(s), from generation_config when present (chat models list several)."""
        ids: set[int] = set()
        for source in (self.config, getattr(self.model, "generation_config", None)):
            eos = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    @property
    def rows(self) -> int:
        return int(self.mask_BT.shape[0])

    # ---- forward passes --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, ids: list[int], *, keep_logits: int = 1,
                past: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> Prefilled:
        """Run a sequence alone; keep the logits of its last `keep_logits` positions. With `past` (the KV of
        ids[:T], T = its length, from the prefix cache) only ids[T:] run."""
        cache = self._rebuild(past) if past else DynamicCache(config=self.config)
        done = int(past[0][0].shape[2]) if past else 0
        input_1L = torch.tensor([ids[done:]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_1L, cache=cache, use_cache=True, logits_to_keep=keep_logits)
        return Prefilled(cache=out.cache, length=len(ids), logits_NV=out.logits[0].float())

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One step for every row: feed each row's newest token at its position; returns logits (B, V)."""
        assert self.cache is not None and len(tokens) == self.rows, "decode() needs one token per running row"
        input_B1 = torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1)
        pos_B1 = torch.tensor(positions, dtype=torch.long, device=self.device).unsqueeze(1)
        ones_B1 = torch.ones((self.rows, 1), dtype=torch.long, device=self.device)
        mask_BT1 = torch.cat([self.mask_BT, ones_B1], dim=1)
        out = self.model(input_ids=input_B1, attention_mask=mask_BT1, position_ids=pos_B1,
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        self.mask_BT = mask_BT1
        return out.logits[:, -1].float()

    # ---- batch cache surgery ---------------------------------------------------------------------------------------

    def _layers(self, cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in cache.layers[: self.num_layers]]

    def _rebuild(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
        cache = DynamicCache(config=self.config)
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
        return cache

    def add(self, p: Prefilled) -> None:
        """Append a prefilled sequence as the last row of the batch."""
        if self.cache is None or self.rows == 0:
            self.cache, self.mask_BT = p.cache, torch.ones((1, p.length), dtype=torch.long, device=self.device)
            return
        width = max(self.mask_BT.shape[1], p.length)
        old_pad, new_pad = width - self.mask_BT.shape[1], width - p.length
        merged = []
        for (k_old, v_old), (k_new, v_new) in zip(self._layers(self.cache), self._layers(p.cache)):
            merged.append((torch.cat([_pad_left(k_old, old_pad), _pad_left(k_new, new_pad)], dim=0),
                           torch.cat([_pad_left(v_old, old_pad), _pad_left(v_new, new_pad)], dim=0)))
        mask_new = torch.cat([torch.zeros(new_pad, dtype=torch.long, device=self.device),
                              torch.ones(p.length, dtype=torch.long, device=self.device)]).unsqueeze(0)
        self.mask_BT = torch.cat([_pad_left_2d(self.mask_BT, old_pad), mask_new], dim=0)
        self.cache = self._rebuild(merged)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then drop columns that are padding in every row."""
        if not rows:
            self.clear()
            return
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask_BT = self.mask_BT.index_select(0, index)
        first = int(mask_BT.any(dim=0).nonzero()[0].item())
        self.mask_BT = mask_BT[:, first:]
        self.cache = self._rebuild([(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                                    for k, v in self._layers(self.cache)])  # type: ignore[arg-type]

    def row_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The KV of one running row without its padding (for the prefix cache)."""
        assert self.cache is not None
        first = int(self.mask_BT[row].nonzero()[0].item())
        return [(k[row:row + 1, :, first:], v[row:row + 1, :, first:]) for k, v in self._layers(self.cache)]

    def kv_of(self, p: Prefilled) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self._layers(p.cache)

    def clear(self) -> None:
        self.cache = None
        self.mask_BT = torch.zeros((0, 0), dtype=torch.long, device=self.device)

    # ---- weights ---------------------------------------------------------------------------------------------------

    def parameters_by_name(self) -> dict[str, torch.Tensor]:
        """Hugging Face name -> tensor (tied weights appear under both names and share storage)."""
        return dict(self.model.state_dict(keep_vars=False))


def _pad_left(x_BHTD: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return x_BHTD
    b, h, _, d = x_BHTD.shape
    return torch.cat([x_BHTD.new_zeros((b, h, n, d)), x_BHTD], dim=2)


def _pad_left_2d(mask_BT: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return mask_BT
    return torch.cat([mask_BT.new_zeros((mask_BT.shape[0], n)), mask_BT], dim=1)
