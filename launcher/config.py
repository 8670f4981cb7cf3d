"""Config section [cluster]: the machines of a multi-node run and how the model is split across them."""

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterModelConfig:
    """The architecture numbers that placement and memory depend on (a Llama/Qwen2-family decoder).

    They are in the config, not read from the checkpoint, so a plan can be checked on a laptop before the weights
    are on the cluster; at launch they are compared with the checkpoint's config.json.
    """

    name: str = "Qwen2.5-32B-Instruct"
    """Model name, for display."""
    num_layers: int = 64
    """Transformer layers (HF num_hidden_layers)."""
    hidden_size: int = 5120
    """Model width (HF hidden_size)."""
    num_attention_heads: int = 40
    """Query heads (HF num_attention_heads)."""
    num_key_value_heads: int = 8
    """Key/value heads, i.e. GQA query groups (HF num_key_value_heads)."""
    intermediate_size: int = 27648
    """SwiGLU inner width (HF intermediate_size)."""
    vocab_size: int = 152064
    """Vocabulary size (HF vocab_size)."""
    tie_word_embeddings: bool = False
    """Whether the output layer shares the input embedding (HF tie_word_embeddings)."""
    qkv_bias: bool = True
    """Qwen2 has a bias on q/k/v; Llama does not."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def param_count(self) -> int:
        """Exact parameter count of the HF checkpoint implied by the shape."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attn = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterConfig:
    model: ClusterModelConfig = field(default_factory=ClusterModelConfig)
    """The model's architecture numbers (see [cluster.model])."""
    model_path: str = "/models/Qwen2.5-32B-Instruct"
    """Hugging Face checkpoint directory, readable from every node."""
    launcher: Literal["slurm", "hosts"] = "slurm"
    """How processes are started: "slurm" (srun inside an allocation) or "hosts" (ssh to the `hosts` list)."""
    hosts: tuple[str, ...] = ()
    """Host names for launcher = "hosts" (GPU nodes first, then CPU nodes); with SLURM the allocation's nodes are
    used and this may stay empty (the dry run then names nodes node0, node1, ...)."""
    gpu_nodes: int = 4
    """Nodes with GPUs in the allocation."""
    gpus_per_node: int = 8
    """GPUs per GPU node."""
    gpu_memory_gib: float = 80.0
    """Usable memory of one GPU (H100 SXM: 80)."""
    cpu_nodes: int = 0
    """Extra CPU-only nodes; the retriever runs on the first one. With 0 it runs on the CPUs of rollout node 0."""
    rollout_nodes: int = 2
    """GPU nodes given to SGLang inference servers; the remaining GPU nodes train."""
    sglang_tp: int = 4
    """Tensor-parallel size of each SGLang server (servers per rollout node = gpus_per_node / sglang_tp)."""
    sglang_mem_fraction: float = 0.7
    """SGLang --mem-fraction-static: share of GPU memory for weights + KV cache; the KV cache gets what the
    weights leave of it."""
    min_kv_cache_gib: float = 8.0
    """Smallest KV cache per GPU that makes a server worth running; below it the plan is rejected."""
    train_tp: int = 8
    """Megatron tensor-parallel size (must divide attention heads and KV heads; keep it within a node)."""
    train_pp: int = 1
    """Megatron pipeline-parallel size (must divide the layer count). DP is derived: train GPUs / (TP x PP)."""
    memory_headroom_gib: float = 6.0
    """Per-GPU allowance for CUDA context, NCCL buffers and fragmentation, added to every estimate."""
    base_port: int = 30000
    """First SGLang server port on each rollout node (servers take consecutive ports)."""
    retriever_port: int = 8000
    """Port of the retrieval server."""
    trajectory_port: int = 29600
    """Port on trainer rank 0 where the engine streams trajectories."""
    weight_update_port: int = 29700
    """Port of the weight-update process group (trainer rank 0 is its master)."""
    rendezvous_port: int = 29500
    """torchrun rendezvous port on the first training node."""

    def __post_init__(self) -> None:
        for name in ("gpu_nodes", "gpus_per_node", "rollout_nodes", "sglang_tp", "train_tp", "train_pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} = {getattr(self, name)}: must be >= 1")
        if not 0.0 < self.sglang_mem_fraction < 1.0:
            raise ValueError(f"sglang_mem_fraction = {self.sglang_mem_fraction}: must be in (0, 1)")
