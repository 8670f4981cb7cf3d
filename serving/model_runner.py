"""The transformers model behind the reference server, and the KV cache of the running batch.

Continuous batching needs one forward pass over sequences of different lengths that join and leave at any step.
The batch KV cache is a set of slots (`SlotCache`): per layer one preallocated buffer (R, H, C, D) that forward
passes write into in place. Row r holds its sequence at columns [0, len_r), so a decode step writes each row's new
token at its own column and never moves anything; a 4-D mask hides each row's columns past its length and explicit
position ids keep RoPE right. New sequences are prefilled straight into the next free slots, all those admitted
together in one pass (one matmul per weight for all of them, as `model.generate` prefills its prompts); a sequence
alone runs without a mask (transformers' own causal mask: what `model.generate` computes). Joining the batch is then
free (or one row copy when an earlier sequence of the same pass did not join), and finished rows are compacted out
with one copy of the rows after them.

Why not transformers' DynamicCache: it concatenates every layer's K/V on each step (a copy of the whole cache per
generated token), and joining or leaving the batch needs left-padding copies of every layer; on CPU those copies were
~30% of a batched step.

Legend: R = slot capacity, B = running rows, C = column capacity, W = columns a pass attends over, S = tokens fed per
row in a pass, L = prompt length, T = prefix-cached tokens, V = vocabulary, H = KV heads, D = head dim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, CacheLayerMixin

log = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer (keys, values), each (1, H, T, D)."""

COLUMN_ALIGN = 64
"""Column capacity grows in steps of this many (at least doubling), so growth copies are rare."""


@dataclass(slots=True)
class Prompt:
    """One sequence to prefill: run `ids[T:]` on top of `past` (the KV of ids[:T] from the prefix cache, or None)
    and keep the logits of its last `keep_logits` positions."""

    ids: list[int]
    keep_logits: int = 1
    past: KV | None = None

    @property
    def done(self) -> int:
        """T: the tokens `past` covers, which this prefill skips."""
        return int(self.past[0][0].shape[2]) if self.past else 0


@dataclass(slots=True)
class Prefilled:
    """One sequence after its prefill: its KV sits in slot `slot` of the batch cache, columns [0, length)."""

    slot: int
    length: int
    logits_NV: torch.Tensor
    """Logits of the last N prompt positions (N = 1 unless prompt logprobs were asked for)."""


class SlotLayer(CacheLayerMixin):
    """One layer's K/V buffers (R, H, C, D); `update` writes where the owner's current pass says and returns the
    columns that pass attends over."""

    is_sliding = False

    def __init__(self, owner: SlotCache) -> None:
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("SlotCache allocates its buffers itself")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states/value_states (n, H, S, D) of rows owner.rows go to columns owner.cols (n, S)."""
        o = self.owner
        assert self.keys is not None and self.values is not None
        keys, values = self.keys[o.rows], self.values[o.rows]
        keys[o.row_index, :, o.cols] = key_states.transpose(1, 2)
        values[o.row_index, :, o.cols] = value_states.transpose(1, 2)
        return keys[:, :, : o.width], values[:, :, : o.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.past + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.past

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """The batch KV cache as slots. Before each forward pass `plan()` says which rows it feeds and where their
    tokens go; transformers' layers then call `SlotLayer.update`."""

    def __init__(self, num_layers: int, *, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])
        self.shape_HD = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.capacity_rows = self.capacity_cols = 0
        self.rows = slice(0, 0)
        self.row_index = torch.zeros((0, 1), dtype=torch.long, device=device)
        self.cols = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.width = 0
        self.past = 0

    def slot_layers(self) -> list[SlotLayer]:
        return self.layers  # type: ignore[return-value]

    def reserve(self, rows: int, cols: int) -> None:
        """Make room for `rows` slots of `cols` columns, keeping what is there. Buffers start zeroed: masked
        columns must hold finite numbers, since attention multiplies them by a zero weight."""
        if rows <= self.capacity_rows and cols <= self.capacity_cols:
            return
        new_rows = _grown(self.capacity_rows, rows)
        new_cols = -(-_grown(self.capacity_cols, cols) // COLUMN_ALIGN) * COLUMN_ALIGN
        for layer in self.slot_layers():
            for name in ("keys", "values"):
                buf = torch.zeros((new_rows, self.shape_HD[0], new_cols, self.shape_HD[1]), dtype=self.dtype,
                                  device=self.device)
                old = getattr(layer, name)
                if old is not None:
                    buf[: self.capacity_rows, :, : self.capacity_cols] = old
                setattr(layer, name, buf)
        self.capacity_rows, self.capacity_cols = new_rows, new_cols

    def plan(self, rows: slice, cols_nS: torch.Tensor, *, width: int, past: int = 0) -> None:
        """The next pass feeds rows `rows` (n of them), row i's tokens going to columns cols_nS[i], and attends
        over columns [0, width). `past` is the prefix length transformers' own causal mask must assume (a pass
        without a 4-D mask)."""
        self.rows, self.cols, self.width, self.past = rows, cols_nS, width, past
        n = cols_nS.shape[0]
        if self.row_index.shape[0] != n:
            self.row_index = torch.arange(n, device=self.device).unsqueeze(1)

    def write(self, slot: int, kv: KV) -> None:
        """Copy a cached prefix (per layer (1, H, T, D)) into columns [0, T) of `slot`."""
        for layer, (k, v) in zip(self.slot_layers(), kv):
            assert layer.keys is not None and layer.values is not None
            layer.keys[slot, :, : k.shape[2]] = k[0]
            layer.values[slot, :, : v.shape[2]] = v[0]

    def read(self, slot: int, length: int) -> KV:
        """Views of columns [0, length) of `slot` (valid until the slot is overwritten)."""
        kv: KV = []
        for layer in self.slot_layers():
            assert layer.keys is not None and layer.values is not None
            kv.append((layer.keys[slot: slot + 1, :, :length], layer.values[slot: slot + 1, :, :length]))
        return kv

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy columns [0, length) of slot `src` to slot `dst`."""
        for layer in self.slot_layers():
            for buf in (layer.keys, layer.values):
                assert buf is not None
                buf[dst, :, :length] = buf[src, :, :length]

    def compact(self, rows: list[int], width: int) -> None:
        """Move slots `rows` to slots 0..len(rows)-1, in that order; only columns [0, width) matter."""
        first = next((i for i, r in enumerate(rows) if r != i), len(rows))
        if first == len(rows):
            return  # a prefix of the slots stays where it is
        index = torch.tensor(rows[first:], dtype=torch.long, device=self.device)
        for layer in self.slot_layers():
            for buf in (layer.keys, layer.values):
                assert buf is not None
                buf[first: len(rows), :, :width] = buf[index, :, :width]  # the gather copies first: overlap is safe


class ModelRunner:
    """Owns the model, the tokenizer, and the batch KV cache. Not thread-safe: one batcher thread drives it."""

    def __init__(self, model_dir: Path, *, device: str, dtype: torch.dtype) -> None:
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype, attn_implementation="sdpa")
        self.model.to(self.device).eval()
        self.config = self.model.config
        self.num_layers = int(self.config.num_hidden_layers)
        self.lens: list[int] = []
        """Tokens in the cache per running row (row i = slot i)."""
        self._pending: list[Prefilled] = []
        """The latest prefill's sequences that may still join, in slot order."""
        self.cache = self._new_cache()

    def _new_cache(self) -> SlotCache:
        heads = int(getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads)
        head_dim = int(getattr(self.config, "head_dim", None) or self.config.hidden_size
                       // self.config.num_attention_heads)
        return SlotCache(self.num_layers, kv_heads=heads, head_dim=head_dim, dtype=self.dtype, device=self.device)

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
        return len(self.lens)

    # ---- forward passes --------------------------------------------------------------------------------------------

    def prefill(self, ids: list[int], *, keep_logits: int = 1, past: KV | None = None) -> Prefilled:
        """Prefill one sequence alone (see `prefill_batch`)."""
        return self.prefill_batch([Prompt(ids, keep_logits, past)])[0]

    @torch.inference_mode()
    def prefill_batch(self, prompts: list[Prompt]) -> list[Prefilled]:
        """Run these sequences in one pass into the next free slots, in order. The results stay valid until the
        next prefill or batch change: `add` them (in order), or read their KV with `kv_of`, before that.

        Rows are left-padded to the longest uncached part (S tokens), so every row's last logits sit at the same
        positions and `logits_to_keep` keeps only those. A padded position's K/V go to columns past the row's end
        (L + j), never into [0, L): the column-space causal mask (a query at column c sees columns <= c) then hides
        them from every real token, and decode's mask hides them until decode overwrites them."""
        n, slot = len(prompts), self.rows
        self._pending = []
        runs = [len(p.ids) - p.done for p in prompts]
        assert min(runs) > 0, "every prompt must run at least one token"
        S, keep = max(runs), max(p.keep_logits for p in prompts)
        ids_nS = torch.zeros((n, S), dtype=torch.long)
        cols_nS = torch.empty((n, S), dtype=torch.long)
        for i, (p, run) in enumerate(zip(prompts, runs)):
            pad = S - run
            ids_nS[i, pad:] = torch.tensor(p.ids[p.done:], dtype=torch.long)
            cols_nS[i, :pad] = torch.arange(len(p.ids), len(p.ids) + pad)
            cols_nS[i, pad:] = torch.arange(p.done, len(p.ids))
        width = int(cols_nS.max()) + 1
        self.cache.reserve(slot + n, width)
        for i, p in enumerate(prompts):
            if p.past:
                self.cache.write(slot + i, p.past)
        ids_nS, cols_nS = ids_nS.to(self.device), cols_nS.to(self.device)
        if n == 1:
            # No mask: transformers builds the causal one (or none at all), exactly as `model.generate` runs a prompt.
            self.cache.plan(slice(slot, slot + 1), cols_nS, width=width, past=prompts[0].done)
            out = self.model(input_ids=ids_nS, position_ids=cols_nS, cache=self.cache, use_cache=True,
                             logits_to_keep=keep)
        else:
            self.cache.plan(slice(slot, slot + n), cols_nS, width=width)
            mask_n1SW = (torch.arange(width, device=self.device).view(1, 1, width) <= cols_nS.unsqueeze(2)).unsqueeze(1)
            out = self.model(input_ids=ids_nS, attention_mask=mask_n1SW, position_ids=cols_nS, cache=self.cache,
                             use_cache=True, logits_to_keep=keep)
        logits_nKV = out.logits
        self._pending = [Prefilled(slot=slot + i, length=len(p.ids),
                                   logits_NV=logits_nKV[i, keep - p.keep_logits:].float())
                         for i, p in enumerate(prompts)]
        return list(self._pending)

    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One step for every row: feed each row's newest token at its position; returns logits (B, V)."""
        assert len(tokens) == self.rows > 0, "decode() needs one token per running row"
        self._pending = []
        width = max(self.lens) + 1
        self.cache.reserve(self.rows, width)
        cols_B1 = torch.tensor(self.lens, dtype=torch.long, device=self.device).unsqueeze(1)
        self.cache.plan(slice(0, self.rows), cols_B1, width=width)
        # Row b attends to its own columns [0, len_b] (the new token included), nothing past them.
        mask_B11W = (torch.arange(width, device=self.device).unsqueeze(0) <= cols_B1).view(self.rows, 1, 1, width)
        out = self.model(input_ids=torch.tensor(tokens, dtype=torch.long, device=self.device).unsqueeze(1),
                         attention_mask=mask_B11W,
                         position_ids=torch.tensor(positions, dtype=torch.long, device=self.device).unsqueeze(1),
                         cache=self.cache, use_cache=True, logits_to_keep=1)
        self.lens = [n + 1 for n in self.lens]
        return out.logits[:, -1].float()

    # ---- batch membership ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, p: Prefilled) -> None:
        """Append a sequence of the latest prefill as the last row of the batch. It already sits in that slot unless
        an earlier one of the same prefill did not join; then one row copy moves it down, over slots whose sequences
        can no longer join (this one and those before it leave `_pending`)."""
        assert any(p is q for q in self._pending), "add() takes the latest prefill, before any batch change"
        row = self.rows
        if p.slot != row:
            self.cache.move(p.slot, row, p.length)
        self._pending = self._pending[[q is p for q in self._pending].index(True) + 1:]
        self.lens.append(p.length)

    @torch.inference_mode()
    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order). In inference mode like the passes: the buffers were made there."""
        self._pending = []
        if not rows:
            self.clear()
            return
        lens = [self.lens[i] for i in rows]
        self.cache.compact(rows, max(lens))
        self.lens = lens

    def row_kv(self, row: int) -> KV:
        """The KV of one running row (for the prefix cache): views, valid until the batch changes."""
        return self.cache.read(row, self.lens[row])

    def kv_of(self, p: Prefilled) -> KV:
        assert any(p is q for q in self._pending), "kv_of() takes the latest prefill, before any batch change"
        return self.cache.read(p.slot, p.length)

    def clear(self) -> None:
        """Empty the batch and free the buffers (they may have grown for one long request)."""
        self.lens, self._pending = [], []
        self.cache = self._new_cache()

    # ---- weights ---------------------------------------------------------------------------------------------------

    def parameters_by_name(self) -> dict[str, torch.Tensor]:
        """Hugging Face name -> tensor (tied weights appear under both names and share storage)."""
        return dict(self.model.state_dict(keep_vars=False))


def _grown(have: int, need: int) -> int:
    """A capacity that fits `need`: unchanged when it already does, else at least doubled (amortised copies)."""
    return have if need <= have else max(need, 2 * have)
