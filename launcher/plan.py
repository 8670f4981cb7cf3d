"""The placement plan of a multi-node run: which process runs on which node and GPUs, on which port, and whether
it fits in memory. Pure arithmetic on the [cluster] section, so `--dry-run` checks a 32-GPU plan on a laptop.

Memory model (per GPU, bytes; P = parameters of the worst pipeline stage on one tensor-parallel rank, b = bytes of
the learner's parameter dtype):
- trainer, as learner/trainer.py and learner/optimizer.py train (ZeRO-1 over the d data-parallel ranks): weights
  bP (+ a frozen reference bP when the KL term is on) on every rank; fp32 master weights 4P (only when b < 4: fp32
  parameters are their own masters) and two fp32 AdamW moments 8P, each rank keeping those of 1/d of the
  parameters; gradients at the step's peak max(b, 4/d)·P (the b-byte gradients are freed as each rank's own fp32
  ones appear); + activations + logits + headroom. bf16 at d = 2: 2 + 6 + 2 = 10 bytes per parameter.
  Activations follow Korthikanti et al. (2022) with selective recomputation and sequence parallelism:
  34·s·h bytes per layer / TP, for `pp` micro-batches in flight on the first stage under the 1F1B schedule.
- SGLang server: bf16 weights 2·params/TP inside `mem_fraction_static` of the GPU; the rest of that share is KV
  cache, 2·layers·kv_heads_per_gpu·head_dim·2 bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssp.launcher.config import ClusterConfig

GIB = 1024**3


class PlanError(ValueError):
    """The plan violates a constraint; the message lists every violation with the numbers and the key to change."""


@dataclass(frozen=True, slots=True)
class LearnerFootprint:
    """What the learner's own config ([learner]) contributes to its memory; the launcher derives it."""

    param_bytes: int = 2
    """Bytes per parameter of the training dtype (bf16 on GPU)."""
    micro_batch_tokens: int = 8192
    """learner.micro_batch_tokens: tokens per micro-batch, which set the activation memory."""
    kl_reference: bool = True
    """Whether a frozen reference copy is kept for the KL term (learner.loss.kl_coef > 0)."""


@dataclass(frozen=True, slots=True)
class Process:
    """One process (or one torchrun launch per node) of the run."""

    role: str
    node: str
    gpus: tuple[int, ...]
    port: int | None
    memory_gib_per_gpu: float | None
    detail: str


@dataclass(frozen=True, slots=True)
class Plan:
    processes: tuple[Process, ...]
    train_dp: int
    servers: tuple[str, ...]
    """Base URLs of the SGLang servers, in placement order."""
    trainer_memory_gib: float
    server_kv_cache_gib: float
    server_kv_tokens: int
    notes: tuple[str, ...] = field(default=())


def node_names(cfg: ClusterConfig) -> list[str]:
    """GPU nodes first, then CPU nodes: the hosts list, or node0, node1, ... when SLURM assigns them at run time."""
    total = cfg.gpu_nodes + cfg.cpu_nodes
    if cfg.hosts:
        return list(cfg.hosts)
    return [f"node{i}" for i in range(total)]


def trainer_memory_bytes(cfg: ClusterConfig, learner: LearnerFootprint, dp: int) -> float:
    m, tp, pp = cfg.model, cfg.train_tp, cfg.train_pp
    per_layer = (m.param_count - m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)) / m.num_layers
    embedding_share = m.vocab_size * m.hidden_size * (2 if pp == 1 and not m.tie_word_embeddings else 1)
    stage_params = (m.num_layers // pp * per_layer + embedding_share) / tp
    b = learner.param_bytes
    replicated = b * (2 if learner.kl_reference else 1)  # weights (+ the KL reference)
    optimizer = ((4 if b < 4 else 0) + 8) / dp  # fp32 masters and two fp32 moments, sharded over DP
    gradients = max(b, 4 / dp)
    weights = stage_params * (replicated + optimizer + gradients)
    activations = 34 * learner.micro_batch_tokens * m.hidden_size * (m.num_layers // pp) / tp * pp
    logits = learner.micro_batch_tokens * m.vocab_size / tp * 4
    return weights + activations + logits + cfg.memory_headroom_gib * GIB


def server_memory(cfg: ClusterConfig) -> tuple[float, float, int]:
    """(weights GiB, KV cache GiB, KV tokens) per GPU of one SGLang server."""
    m, tp = cfg.model, cfg.sglang_tp
    weights = 2 * m.param_count / tp
    kv_cache = cfg.sglang_mem_fraction * cfg.gpu_memory_gib * GIB - weights
    kv_heads_per_gpu = max(1, m.num_key_value_heads // tp)
    bytes_per_token = 2 * m.num_layers * kv_heads_per_gpu * m.head_dim * 2
    return weights / GIB, kv_cache / GIB, max(0, int(kv_cache // bytes_per_token))


def make_plan(cfg: ClusterConfig, learner: LearnerFootprint = LearnerFootprint()) -> Plan:
    """Place every process and check every constraint; raise PlanError listing all violations."""
    m = cfg.model
    errors: list[str] = []
    train_nodes = cfg.gpu_nodes - cfg.rollout_nodes
    train_gpus = train_nodes * cfg.gpus_per_node
    model_parallel = cfg.train_tp * cfg.train_pp

    if train_nodes < 1:
        errors.append(f"rollout_nodes = {cfg.rollout_nodes} leaves no GPU node for training out of gpu_nodes = "
                      f"{cfg.gpu_nodes}; lower cluster.rollout_nodes or add GPU nodes")
    if cfg.gpus_per_node % cfg.sglang_tp:
        errors.append(f"sglang_tp = {cfg.sglang_tp} does not divide gpus_per_node = {cfg.gpus_per_node}; a server "
                      "must fit whole GPUs of one node")
    if m.num_attention_heads % cfg.sglang_tp:
        errors.append(f"sglang_tp = {cfg.sglang_tp} does not divide the {m.num_attention_heads} attention heads of "
                      f"{m.name}")
    if cfg.train_tp > cfg.gpus_per_node:
        errors.append(f"train_tp = {cfg.train_tp} exceeds gpus_per_node = {cfg.gpus_per_node}; tensor parallelism "
                      "must stay inside one node (use train_pp across nodes)")
    if m.num_attention_heads % cfg.train_tp or m.num_key_value_heads % cfg.train_tp:
        errors.append(f"train_tp = {cfg.train_tp} must divide both the {m.num_attention_heads} attention heads and "
                      f"the {m.num_key_value_heads} KV heads of {m.name} (Megatron splits whole query groups)")
    if m.num_layers % cfg.train_pp:
        errors.append(f"train_pp = {cfg.train_pp} does not divide the {m.num_layers} layers of {m.name}")
    if train_gpus > 0 and train_gpus % model_parallel:
        errors.append(f"{train_gpus} training GPUs are not a multiple of train_tp x train_pp = {model_parallel}")
    if cfg.launcher == "hosts" and len(cfg.hosts) != cfg.gpu_nodes + cfg.cpu_nodes:
        errors.append(f"launcher = 'hosts' needs gpu_nodes + cpu_nodes = {cfg.gpu_nodes + cfg.cpu_nodes} hosts, "
                      f"got {len(cfg.hosts)} in cluster.hosts")
    if errors:
        raise PlanError("invalid cluster plan:\n  - " + "\n  - ".join(errors))

    train_dp = train_gpus // model_parallel
    trainer_gib = trainer_memory_bytes(cfg, learner, train_dp) / GIB
    weights_gib, kv_gib, kv_tokens = server_memory(cfg)
    if trainer_gib > cfg.gpu_memory_gib:
        errors.append(f"trainer needs ~{trainer_gib:.1f} GiB per GPU at TP {cfg.train_tp} x PP {cfg.train_pp} x DP "
                      f"{train_dp}, more than gpu_memory_gib = {cfg.gpu_memory_gib:g}; raise train_tp/train_pp, "
                      "or lower learner.micro_batch_tokens")
    if kv_gib < cfg.min_kv_cache_gib:
        errors.append(f"SGLang TP {cfg.sglang_tp} holds {weights_gib:.1f} GiB of weights per GPU, leaving "
                      f"{kv_gib:.1f} GiB of KV cache inside sglang_mem_fraction = {cfg.sglang_mem_fraction} "
                      f"(min_kv_cache_gib = {cfg.min_kv_cache_gib:g}); raise sglang_tp or sglang_mem_fraction")
    if errors:
        raise PlanError("invalid cluster plan:\n  - " + "\n  - ".join(errors))

    nodes = node_names(cfg)
    rollout, training = nodes[: cfg.rollout_nodes], nodes[cfg.rollout_nodes : cfg.gpu_nodes]
    cpu_home = nodes[cfg.gpu_nodes] if cfg.cpu_nodes else rollout[0]
    processes = [
        Process("retriever", cpu_home, (), cfg.retriever_port, None, "ssp retriever serve (CPU)"),
    ]
    servers = []
    per_node = cfg.gpus_per_node // cfg.sglang_tp
    for node in rollout:
        for s in range(per_node):
            port = cfg.base_port + s
            gpus = tuple(range(s * cfg.sglang_tp, (s + 1) * cfg.sglang_tp))
            servers.append(f"http://{node}:{port}")
            processes.append(Process(
                "sglang", node, gpus, port, cfg.sglang_mem_fraction * cfg.gpu_memory_gib,
                f"SGLang TP {cfg.sglang_tp}: {weights_gib:.1f} GiB weights + {kv_gib:.1f} GiB KV "
                f"({kv_tokens:,} tokens) per GPU",
            ))
    processes.append(Process("engine", cpu_home, (), None, None,
                             f"ssp engine: {len(servers)} servers, streams to {training[0]}:{cfg.trajectory_port}"))
    for rank, node in enumerate(training):
        processes.append(Process(
            "learner", node, tuple(range(cfg.gpus_per_node)),
            cfg.rendezvous_port if rank == 0 else None, trainer_gib,
            f"torchrun node_rank {rank}/{train_nodes}: Megatron TP {cfg.train_tp} x PP {cfg.train_pp} x DP {train_dp}",
        ))
    return Plan(tuple(processes), train_dp, tuple(servers), trainer_gib, kv_gib, kv_tokens)


def render_plan(cfg: ClusterConfig, plan: Plan) -> str:
    """A table a person can check before spending cluster hours."""
    m = cfg.model
    lines = [
        f"model {m.name}: {m.param_count / 1e9:.2f} B parameters, {m.num_layers} layers, "
        f"{m.num_attention_heads} heads / {m.num_key_value_heads} KV heads",
        f"cluster: {cfg.gpu_nodes} GPU nodes x {cfg.gpus_per_node} GPUs ({cfg.gpu_memory_gib:g} GiB each)"
        + (f" + {cfg.cpu_nodes} CPU nodes" if cfg.cpu_nodes else "") + f", launcher {cfg.launcher}",
        f"rollout: {len(plan.servers)} SGLang servers x TP {cfg.sglang_tp} on {cfg.rollout_nodes} nodes; "
        f"training: TP {cfg.train_tp} x PP {cfg.train_pp} x DP {plan.train_dp} on "
        f"{cfg.gpu_nodes - cfg.rollout_nodes} nodes",
        "",
        f"{'role':<10} {'node':<10} {'gpus':<16} {'port':>6} {'GiB/GPU':>8}  detail",
    ]
    for p in plan.processes:
        gpus = ",".join(map(str, p.gpus)) if p.gpus else "-"
        mem = f"{p.memory_gib_per_gpu:.1f}" if p.memory_gib_per_gpu is not None else "-"
        port = str(p.port) if p.port is not None else "-"
        lines.append(f"{p.role:<10} {p.node:<10} {gpus:<16} {port:>6} {mem:>8}  {p.detail}")
    lines += [
        "",
        f"trainer memory per GPU ~{plan.trainer_memory_gib:.1f} of {cfg.gpu_memory_gib:g} GiB; "
        f"server KV cache {plan.server_kv_cache_gib:.1f} GiB per GPU ({plan.server_kv_tokens:,} tokens)",
        "plan OK",
    ]
    return "\n".join(lines)
