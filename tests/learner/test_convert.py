"""HF <-> Megatron conversion: bit-exact round trips at TP=1 and TP=2 (pure tensors), and logits parity with
transformers at TP=1 (in process; TP=2 runs in test_tensor_parallel.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssp.learner.convert import HfTensors, hf_to_megatron, megatron_to_hf
from ssp.learner.model import ModelConfigError, ModelShape


def _hf_state(model_dir: Path) -> dict[str, torch.Tensor]:
    with HfTensors(model_dir) as hf:
        return {n: hf.get(n) for n in hf.names()}


def _round_trip(model_dir: Path, tp: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    shape = ModelShape.from_dir(model_dir)
    hf = _hf_state(model_dir)
    shards = [hf_to_megatron(hf.__getitem__, shape, tp=tp, tp_rank=r, vocab_divisor=8) for r in range(tp)]
    back: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        for hf_name, t in megatron_to_hf(name, [s[name] for s in shards], shape):
            assert hf_name not in back, f"{hf_name} produced twice"
            back[hf_name] = t
    return hf, back


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen"])
def test_round_trip_is_bit_exact(family: str, tp: int, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(family)
    hf, back = _round_trip(model_dir, tp)
    shape = ModelShape.from_dir(model_dir)
    expected = {n for n in hf if not (shape.tie_word_embeddings and n == "lm_head.weight")}
    assert set(back) == expected
    for name in expected:
        assert back[name].dtype == hf[name].dtype and back[name].shape == hf[name].shape, name
        assert torch.equal(back[name], hf[name]), name


def test_tp_shards_are_interleaved_per_query_group(tiny_llama: Path) -> None:
    shape = ModelShape.from_dir(tiny_llama)
    hf = _hf_state(tiny_llama)
    d = shape.head_dim
    rank1 = hf_to_megatron(hf.__getitem__, shape, tp=2, tp_rank=1, vocab_divisor=8)
    qkv = rank1["decoder.layers.0.self_attention.linear_qkv.weight"]
    # rank 1 holds KV group 1: query heads 2 and 3, then k head 1, then v head 1
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(qkv[: 2 * d], q[2 * d: 4 * d])
    assert torch.equal(qkv[2 * d: 3 * d], hf["model.layers.0.self_attn.k_proj.weight"][d: 2 * d])
    assert torch.equal(qkv[3 * d:], hf["model.layers.0.self_attn.v_proj.weight"][d: 2 * d])
    fc1 = rank1["decoder.layers.0.mlp.linear_fc1.weight"]
    half = shape.ffn_hidden_size // 2
    assert torch.equal(fc1[:half], hf["model.layers.0.mlp.gate_proj.weight"][half:])
    assert torch.equal(fc1[half:], hf["model.layers.0.mlp.up_proj.weight"][half:])
    emb = rank1["embedding.word_embeddings.weight"]  # vocab 250 padded to 256, rows 128..255
    assert emb.shape[0] == 128 and torch.equal(emb[:122], hf["model.embed_tokens.weight"][128:])
    assert not emb[122:].any()


def test_unsupported_configs_are_named() -> None:
    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 8, "rms_norm_eps": 1e-6}
    with pytest.raises(ModelConfigError, match="GPT2LMHeadModel"):
        ModelShape.from_hf_dict({**base, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ModelConfigError, match="rope_scaling"):
        ModelShape.from_hf_dict({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    shape = ModelShape.from_hf_dict({**base, "num_attention_heads": 3, "num_key_value_heads": 3, "hidden_size": 9})
    with pytest.raises(ModelConfigError, match="num_attention_heads = 3 is not divisible by tensor_parallel = 2"):
        shape.check_tp(2)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_qwen"])
def test_logits_match_transformers_tp1(family: str, request: pytest.FixtureRequest, par1: object) -> None:
    from transformers import AutoModelForCausalLM

    from ssp.learner.convert import load_hf_into_model
    from ssp.learner.model import build_model

    model_dir = request.getfixturevalue(family)
    shape = ModelShape.from_dir(model_dir)
    model = build_model(shape, par1, vocab_divisor=8)  # type: ignore[arg-type]
    load_hf_into_model(model, model_dir, shape, tp=1, tp_rank=0, vocab_divisor=8)
    ids = torch.randint(0, shape.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(19).expand(2, -1)
    with torch.no_grad():
        ours = model(ids, pos, None)[..., : shape.vocab_size]
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits
    assert (ours - ref).abs().max().item() < 1e-4


def test_smollm2_round_trip_and_logits_tp1(model_dir: Path, par1: object) -> None:
    """The real model: HF -> Megatron -> HF bit-exact, and logits equal transformers' within 1e-4 (fp32)."""
    from transformers import AutoModelForCausalLM

    from ssp.learner.convert import load_hf_into_model
    from ssp.learner.gather import iter_hf_weights
    from ssp.learner.model import build_model

    shape = ModelShape.from_dir(model_dir)
    assert shape.tie_word_embeddings and shape.rope_theta == 100000.0
    model = build_model(shape, par1)  # type: ignore[arg-type]
    load_hf_into_model(model, model_dir, shape, tp=1, tp_rank=0, vocab_divisor=128)
    with HfTensors(model_dir) as hf:
        back = dict(iter_hf_weights(model, shape, tp_group=None, keep=True))
        assert set(back) == set(hf.names()) - {"lm_head.weight"}
        for name, t in back.items():
            assert torch.equal(t, hf.get(name)), name
    ids = torch.randint(0, shape.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids, torch.arange(24)[None], None)
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits
    assert (ours[..., : shape.vocab_size] - ref).abs().max().item() < 1e-4
