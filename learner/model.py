"""megatron-core GPTModel for Llama- and Qwen2-family Hugging Face checkpoints, and the parallel state it runs in.

What maps where (HF config -> megatron TransformerConfig): GQA heads -> num_query_groups, SwiGLU ->
gated_linear_unit + silu, RMSNorm -> normalization="RMSNorm", rope_theta -> rotary_base, Qwen2's q/k/v bias ->
add_qkv_bias, tie_word_embeddings -> share_embeddings_and_output_weights. The vocab is padded to a multiple of
`tp * vocab_divisor` so each TP rank holds an equal slice; logits of padded rows are masked (ssp.learner.logprobs).

The same code runs on a laptop CPU (gloo, fp32, local layers, `ssp.learner.megatron_cpu` stand-ins) and on GPUs (NCCL,
bf16, transformer-engine layers when installed): only `device`, `dtype` and the layer spec change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ssp.processes import free_port

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")


class ModelConfigError(ValueError):
    """A checkpoint's config.json describes a model this learner cannot build (the message says which key)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelShape:
    """The architecture facts the learner needs from a HF config.json (Llama / Qwen2 families)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelShape":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else ""
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(f"{source}: architectures = {archs!r}; the learner builds "
                                   f"{' or '.join(SUPPORTED_ARCHITECTURES)} only")
        # transformers 5 writes RoPE settings under rope_parameters, older versions under rope_scaling/rope_theta.
        scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ModelConfigError(f"{source}: rope_scaling = {scaling!r} is not supported by the learner's "
                                   "converter; use a checkpoint with plain RoPE")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(f"{source}: hidden_act = {cfg['hidden_act']!r}; only SwiGLU (silu) is supported")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope = cfg.get("rope_theta")
        if rope is None:  # transformers 5 nests it under rope_parameters
            rope = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            ffn_hidden_size=int(cfg["intermediate_size"]),
            rms_norm_eps=float(cfg["rms_norm_eps"]),
            rope_theta=float(rope),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelShape":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"{path} does not exist; point the learner at a Hugging Face model directory "
                                   "(e.g. the output of `ssp model prepare`)")
        return cls.from_hf_dict(json.loads(path.read_text()), str(path))

    def check_tp(self, tp: int) -> None:
        """Megatron splits heads, KV groups and the MLP evenly over TP ranks; say which one does not divide."""
        for name, value in (("num_attention_heads", self.num_heads), ("num_key_value_heads", self.num_kv_heads),
                            ("intermediate_size", self.ffn_hidden_size)):
            if value % tp:
                raise ModelConfigError(f"{name} = {value} is not divisible by tensor_parallel = {tp}; "
                                       f"choose a tensor_parallel size that divides it")

    def padded_vocab(self, tp: int, divisor: int) -> int:
        """Vocab rounded up to a multiple of tp * divisor (megatron's make-vocab-size-divisible-by rule)."""
        step = tp * divisor
        return -(-self.vocab_size // step) * step


@dataclass(frozen=True, kw_only=True, slots=True)
class Parallel:
    """Where this process sits: data-parallel and tensor-parallel rank/size, and the device and dtype it uses."""

    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype


def init_parallel(*, tp: int, pp: int = 1, device: str = "auto", dtype: str = "auto", seed: int = 0,
                  timeout_s: float = 600.0) -> Parallel:
    """Join the torchrun process group (or a single-process one) and build megatron's TP x DP groups.

    `device="auto"` picks CUDA with NCCL when available, else CPU with gloo; `dtype="auto"` is bf16 on GPU and
    fp32 on CPU. On CPU the `ssp.learner.megatron_cpu` stand-ins are installed here.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if pp != 1:
        raise ModelConfigError(f"pipeline_parallel = {pp}: this learner runs PP = 1 only (TP x DP); "
                               "set learner.pipeline_parallel = 1 and raise tensor_parallel instead")
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # a single process outside torchrun
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % tp:
        raise ModelConfigError(f"world size {world} is not a multiple of tensor_parallel = {tp}; "
                               "launch tp * dp ranks")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if use_cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        from ssp.learner import megatron_cpu

        megatron_cpu.install(seed)
        keep_freed_memory()
    torch.manual_seed(seed)
    resolved_dtype = {"auto": torch.bfloat16 if use_cuda else torch.float32, "float32": torch.float32,
                      "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return Parallel(
        tp=tp, dp=world // tp,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        rank=dist.get_rank(), world_size=world,
        device=torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu"),
        dtype=resolved_dtype,
    )


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel; returns whether it
    could (False off glibc, where nothing changes).

    Why: PyTorch's CPU allocator does not cache; every activation and gradient is a fresh malloc. glibc serves
    blocks above its mmap threshold (at most 32 MB) with a new mmap and unmaps them on free, and trims the heap
    top, so the next step's tensors land on fresh pages that the kernel must fault in and zero. A SmolLM2 micro-
    batch of 4096 positions has 50 MB MLP activations (gate and up fused): measured, a learner step took 1.0 M
    page faults and 12-20 s of kernel time out of 33-40 s; with mmap off and no trimming, 4 k faults and < 1 s.
    The price: the process keeps its peak heap (its working set, which every step reaches again anyway)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, -1))  # -1: never trim


def destroy_parallel() -> None:
    """Tear down megatron's groups and the default process group (safe to call twice)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def layer_spec(ffn_hidden_size: int, use_te: bool) -> Any:
    """transformer-engine layers (fused, fast; GPU only) or megatron's local layers (any device)."""
    import dataclasses

    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    # The MLP's width is passed explicitly (megatron warns when it has to fall back to the config's).
    mlp = dataclasses.replace(spec.submodules.mlp, params={**spec.submodules.mlp.params,
                                                            "ffn_hidden_size": ffn_hidden_size})
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=mlp))


def _have_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(shape: ModelShape, par: Parallel, *, vocab_divisor: int = 128, init_weights: bool = False,
                recompute: bool = False) -> Any:
    """A GPTModel holding this rank's TP shard, on `par.device` in `par.dtype`.

    `init_weights=False` skips random initialisation (weights come from the converter right after);
    `recompute=True` turns on full activation recomputation (memory for speed, for long sequences on GPU).
    """
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer import TransformerConfig

    shape.check_tp(par.tp)
    on_cpu = par.device.type == "cpu"
    use_te = not on_cpu and _have_te()
    log.info("building %s: %d layers, hidden %d, TP %d, %s layers, %s on %s", shape.architecture, shape.num_layers,
             shape.hidden_size, par.tp, "transformer-engine" if use_te else "local", par.dtype, par.device)
    config = TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=par.tp,
        params_dtype=par.dtype,
        bf16=par.dtype == torch.bfloat16,
        fp16=par.dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        perform_initialization=init_weights,
        # The fused kernels below exist only as CUDA extensions; their unfused forms are exact.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cuda_graph_scope=[],  # megatron's default "full" warns as deprecated; [] is its documented equivalent
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(shape.ffn_hidden_size, use_te),
        vocab_size=shape.padded_vocab(par.tp, vocab_divisor),
        max_sequence_length=shape.max_position_embeddings,
        share_embeddings_and_output_weights=shape.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta),
        parallel_output=True,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )
    # megatron's local norm layers create their weights in fp32 whatever params_dtype says; as megatron's own
    # Float16Module does, every parameter takes the model dtype (the fp32 masters live in ssp.learner.optimizer).
    model = model.to(device=par.device, dtype=par.dtype)
    if on_cpu:
        from ssp.learner import megatron_cpu

        megatron_cpu.install_cpu_rope(model)
        megatron_cpu.install_cpu_attention(model)
    return model


@contextlib.contextmanager
def logits_only_at(model: Any, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[None]:
    """While active, a forward of `model` (a GPTModel) returns logits (1, K, V/tp) for the K positions (rows[k],
    cols[k]) only, in that order, instead of (B, S, V/tp) for every position.

    Why: the loss needs logits only where the policy generated tokens, a small share of each row (the prompt, the
    search results and the padding are most of it), and the output layer and the log-softmax over the vocabulary
    are a fifth of a CPU step's FLOPs for SmolLM2 and grow with the vocabulary (152k for Qwen2.5). How: the output
    layer's input, hidden states (S, B, H), is cut down to (K, 1, H) before it runs; the transformer below is
    untouched, and so are gradients through the kept positions."""
    def select(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        hidden_sbh = args[0]
        return (hidden_sbh[cols, rows].unsqueeze(1), *args[1:]), kwargs

    handle = model.output_layer.register_forward_pre_hook(select, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
