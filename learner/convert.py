"""HF <-> megatron-core name and layout mapping, with tensor-parallel splitting and merging (our own converter).

Layouts (per decoder layer; `g` = query groups = KV heads, `hpg` = query heads per group, `d` = head_dim):

    HF q_proj (hpg*g*d, H), k_proj (g*d, H), v_proj (g*d, H)
      -> linear_qkv (g*(hpg+2)*d, H): for each group, its hpg query heads, then its k head, then its v head.
         TP rank r holds groups [r*g/tp, (r+1)*g/tp): a contiguous dim-0 chunk of the interleaved tensor.
    HF gate_proj (F, H), up_proj (F, H) -> linear_fc1 (2F/tp, H) per rank = [gate chunk r; up chunk r]
    HF o_proj (H, nq*d) -> linear_proj, HF down_proj (H, F) -> linear_fc2: split along dim 1 (row-parallel)
    HF embed_tokens / lm_head (V, H) -> padded to V' (zero rows) and split along dim 0 (vocab-parallel)
    norms: replicated on every TP rank

Names below are megatron's local-layer names; `model_param_names` maps them to transformer-engine names, where
each layer norm is fused into the following linear (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`).
Tied embeddings have no `output_layer.weight` (and no `lm_head.weight` on the way back).

Everything is a pure function of tensors except `load_hf_into_model` and `HfTensors` (I/O).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ssp.learner.model import ModelShape

TensorGetter = Callable[[str], torch.Tensor]

_LAYER = "decoder.layers.{i}."
_HF_LAYER = "model.layers.{i}."


def _qkv_interleave(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """Stack q/k/v rows (weights or biases) group by group: (g*(hpg+2)*d, ...)."""
    g, d = shape.num_kv_heads, shape.head_dim
    hpg = shape.num_heads // g
    rest = q.shape[1:]
    q_g = q.reshape(g, hpg * d, *rest)
    k_g = k.reshape(g, d, *rest)
    v_g = v.reshape(g, d, *rest)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(g * (hpg + 2) * d, *rest)


def _qkv_split(qkv: torch.Tensor, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `_qkv_interleave` on the full (TP-merged) tensor."""
    g, d = shape.num_kv_heads, shape.head_dim
    hpg = shape.num_heads // g
    rest = qkv.shape[1:]
    per_group = qkv.reshape(g, (hpg + 2) * d, *rest)
    q, k, v = torch.split(per_group, [hpg * d, d, d], dim=1)
    return (q.reshape(g * hpg * d, *rest).contiguous(), k.reshape(g * d, *rest).contiguous(),
            v.reshape(g * d, *rest).contiguous())


def _pad_vocab(w: torch.Tensor, padded: int) -> torch.Tensor:
    if w.shape[0] == padded:
        return w
    return torch.cat([w, w.new_zeros(padded - w.shape[0], *w.shape[1:])], dim=0)


def hf_to_megatron(get: TensorGetter, shape: ModelShape, *, tp: int, tp_rank: int,
                   vocab_divisor: int) -> dict[str, torch.Tensor]:
    """This TP rank's megatron (local-layer names) state from HF tensors fetched by name with `get`."""
    shape.check_tp(tp)

    def chunk(t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.chunk(t, tp, dim=dim)[tp_rank].clone()

    padded = shape.padded_vocab(tp, vocab_divisor)
    out: dict[str, torch.Tensor] = {
        "embedding.word_embeddings.weight": chunk(_pad_vocab(get("model.embed_tokens.weight"), padded), 0),
        "decoder.final_layernorm.weight": get("model.norm.weight").clone(),
    }
    if not shape.tie_word_embeddings:
        out["output_layer.weight"] = chunk(_pad_vocab(get("lm_head.weight"), padded), 0)
    for i in range(shape.num_layers):
        hf, mc = _HF_LAYER.format(i=i), _LAYER.format(i=i)
        out[mc + "input_layernorm.weight"] = get(hf + "input_layernorm.weight").clone()
        out[mc + "pre_mlp_layernorm.weight"] = get(hf + "post_attention_layernorm.weight").clone()
        qkv = _qkv_interleave(get(hf + "self_attn.q_proj.weight"), get(hf + "self_attn.k_proj.weight"),
                              get(hf + "self_attn.v_proj.weight"), shape)
        out[mc + "self_attention.linear_qkv.weight"] = chunk(qkv, 0)
        if shape.qkv_bias:
            qkv_b = _qkv_interleave(get(hf + "self_attn.q_proj.bias"), get(hf + "self_attn.k_proj.bias"),
                                    get(hf + "self_attn.v_proj.bias"), shape)
            out[mc + "self_attention.linear_qkv.bias"] = chunk(qkv_b, 0)
        out[mc + "self_attention.linear_proj.weight"] = chunk(get(hf + "self_attn.o_proj.weight"), 1)
        out[mc + "mlp.linear_fc1.weight"] = torch.cat(
            [chunk(get(hf + "mlp.gate_proj.weight"), 0), chunk(get(hf + "mlp.up_proj.weight"), 0)], dim=0)
        out[mc + "mlp.linear_fc2.weight"] = chunk(get(hf + "mlp.down_proj.weight"), 1)
    return out


def megatron_to_hf(name: str, shards: list[torch.Tensor], shape: ModelShape) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs for one megatron parameter given its shards from every TP rank, in rank order."""
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        full = torch.cat(shards, dim=0)[: shape.vocab_size]
        return [("model.embed_tokens.weight" if name.startswith("embedding") else "lm_head.weight", full)]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", shards[0])]
    prefix, sep, rest = name.partition(".layers.")
    if prefix != "decoder" or not sep:
        raise KeyError(f"megatron parameter {name!r} has no HF counterpart in the Llama/Qwen2 mapping")
    layer, _, local = rest.partition(".")
    hf = _HF_LAYER.format(i=layer)
    if local == "input_layernorm.weight":
        return [(hf + "input_layernorm.weight", shards[0])]
    if local == "pre_mlp_layernorm.weight":
        return [(hf + "post_attention_layernorm.weight", shards[0])]
    if local in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = local.rsplit(".", 1)[1]
        q, k, v = _qkv_split(torch.cat(shards, dim=0), shape)
        return [(f"{hf}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v))]
    if local == "self_attention.linear_proj.weight":
        return [(hf + "self_attn.o_proj.weight", torch.cat(shards, dim=1))]
    if local == "mlp.linear_fc1.weight":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        gate = torch.cat([h[0] for h in halves], dim=0)
        up = torch.cat([h[1] for h in halves], dim=0)
        return [(hf + "mlp.gate_proj.weight", gate), (hf + "mlp.up_proj.weight", up)]
    if local == "mlp.linear_fc2.weight":
        return [(hf + "mlp.down_proj.weight", torch.cat(shards, dim=1))]
    raise KeyError(f"megatron parameter {name!r} has no HF counterpart in the Llama/Qwen2 mapping")


def megatron_state_to_hf(rank_states: Sequence[Mapping[str, torch.Tensor]],
                         shape: ModelShape) -> Iterator[tuple[str, torch.Tensor]]:
    """HF (name, full tensor) pairs from the megatron states (local-layer names) of every TP rank, in rank order.

    The inverse of `hf_to_megatron` over all ranks at once, for states already in one process (saved checkpoints):
    the same merge `ssp.learner.gather.iter_hf_weights` does with collectives on a live model, so an exported model and
    a pushed one are the same weights. Replicated parameters (norms) are taken from rank 0, as the gather does.
    Raises ValueError naming the parameter whose shards do not fit `shape` (e.g. a checkpoint of another model).
    """
    for name in rank_states[0]:
        absent = [rank for rank, state in enumerate(rank_states) if name not in state]
        if absent:
            raise ValueError(f"{name} is in TP rank 0's state but not in TP rank(s) {absent}'s")
        shards = [state[name] for state in rank_states] if is_tp_sharded(name) else [rank_states[0][name]]
        try:
            yield from megatron_to_hf(name, shards, shape)
        except RuntimeError as e:  # a reshape or split that the shard sizes do not allow
            sizes = [tuple(s.shape) for s in shards]
            raise ValueError(f"{name}: TP shards of shapes {sizes} do not fit a {shape.architecture} with "
                             f"{shape.num_heads} heads, {shape.num_kv_heads} KV heads, head_dim {shape.head_dim}, "
                             f"hidden {shape.hidden_size}, ffn {shape.ffn_hidden_size} ({e})") from None


# transformer-engine fuses each pre-norm into the linear after it; everything else keeps its local name.
_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def canonical_name(model_name: str) -> str:
    """The local-layer name of a model parameter (identity for local layers, un-fuses TE's norm names)."""
    for local, te in _TE_NAMES.items():
        if model_name.endswith(te):
            return model_name[: -len(te)] + local
    return model_name


def is_tp_sharded(name: str) -> bool:
    """Whether a parameter (local-layer name) is split over TP ranks: all but the norms, which are replicated.

    NOTE: decided by name because megatron marks split parameters (`tensor_model_parallel`) only when it
    initialises them, and the learner builds with `perform_initialization=False` before loading a checkpoint.
    """
    return not name.endswith("layernorm.weight")


def canonical_params(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(local-layer name, parameter) for every parameter of a GPTModel, in module order."""
    for name, param in model.named_parameters():
        yield canonical_name(name.removeprefix("module.")), param


@torch.no_grad()
def load_hf_into_model(model: torch.nn.Module, model_dir: Path, shape: ModelShape, *, tp: int, tp_rank: int,
                       vocab_divisor: int) -> None:
    """Copy a HF checkpoint into this rank's shard of `model`; every parameter must be covered exactly once."""
    with HfTensors(model_dir) as hf:
        state = hf_to_megatron(hf.get, shape, tp=tp, tp_rank=tp_rank, vocab_divisor=vocab_divisor)
    params = dict(canonical_params(model))
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise KeyError(f"converter and model disagree: model parameters not converted {missing[:4]}, "
                       f"converted tensors with no parameter {extra[:4]}")
    for name, param in params.items():
        src = state[name]
        if src.shape != param.shape:
            raise ValueError(f"{name}: converted shape {tuple(src.shape)} != model shape {tuple(param.shape)}")
        param.copy_(src.to(param.dtype))


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
"""The safetensors dtype tags of the dtypes a learner model can have."""


class HfTensors:
    """Lazy, by-name access to the tensors of a HF safetensors checkpoint (single file or sharded index)."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
            weight_map = {}
        else:
            raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json; "
                                    "the learner reads HF safetensors checkpoints (see `ssp model prepare`)")
        self._handles = {f: safe_open(str(model_dir / f), framework="pt") for f in files}
        if not weight_map:
            weight_map = {k: files[0] for k in self._handles[files[0]].keys()}
        self._where = weight_map
        self.model_dir = model_dir

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape from the file header, without reading its data."""
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's stored dtype from the file header, without reading its data."""
        stored = self._slice(name).get_dtype()
        if stored not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{self.model_dir}: {name} is stored as {stored}; the learner reads "
                             f"{', '.join(_SAFETENSORS_DTYPES)} checkpoints")
        return _SAFETENSORS_DTYPES[stored]

    def _slice(self, name: str) -> Any:
        if name not in self._where:
            raise KeyError(f"{self.model_dir}: checkpoint has no tensor {name!r}")
        return self._handles[self._where[name]].get_slice(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{self.model_dir}: checkpoint has no tensor {name!r}")
        return self._handles[self._where[name]].get_tensor(name)

    def __enter__(self) -> "HfTensors":
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.clear()
