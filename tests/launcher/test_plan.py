"""Placement plans: valid 32B and 7B layouts, and each impossible one rejected with the constraint named."""

import pytest

from ssp.launcher.config import ClusterConfig, ClusterModelConfig
from ssp.launcher.plan import PlanError, make_plan, render_plan

QWEN_7B = ClusterModelConfig(name="Qwen2.5-7B-Instruct", num_layers=28, hidden_size=3584, num_attention_heads=28,
                     num_key_value_heads=4, intermediate_size=18944)


def test_parameter_counts_match_the_published_checkpoints() -> None:
    assert ClusterModelConfig().param_count == 32_763_876_352  # Qwen2.5-32B-Instruct
    assert QWEN_7B.param_count == 7_615_616_512  # Qwen2.5-7B-Instruct


def test_32b_on_4_nodes_of_8_gpus() -> None:
    cfg = ClusterConfig()
    plan = make_plan(cfg)
    roles = [p.role for p in plan.processes]
    assert roles.count("sglang") == 4 and roles.count("learner") == 2 and roles.count("retriever") == 1
    assert plan.train_dp == 2
    used = {(p.node, g) for p in plan.processes for g in p.gpus}
    assert len(used) == 32, "every GPU is used exactly once"
    assert 0 < plan.trainer_memory_gib < cfg.gpu_memory_gib
    assert plan.servers == ("http://node0:30000", "http://node0:30001", "http://node1:30000", "http://node1:30001")
    text = render_plan(cfg, plan)
    assert "TP 8 x PP 1 x DP 2" in text and text.endswith("plan OK")


def test_7b_on_2_nodes_with_a_cpu_node_and_hosts() -> None:
    cfg = ClusterConfig(model=QWEN_7B, gpu_nodes=2, rollout_nodes=1, cpu_nodes=1, sglang_tp=1, train_tp=4,
                        train_pp=1, launcher="hosts", hosts=("g1", "g2", "c1"))
    plan = make_plan(cfg)
    assert plan.train_dp == 2 and len(plan.servers) == 8
    retriever = next(p for p in plan.processes if p.role == "retriever")
    assert retriever.node == "c1"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rollout_nodes": 4}, "leaves no GPU node for training"),
        ({"sglang_tp": 3}, "sglang_tp = 3 does not divide gpus_per_node = 8"),
        ({"train_tp": 16, "gpus_per_node": 8}, "train_tp = 16 exceeds gpus_per_node = 8"),
        ({"train_pp": 3}, "train_pp = 3 does not divide the 64 layers"),
        ({"gpu_nodes": 3, "rollout_nodes": 1, "train_tp": 8, "train_pp": 4}, "16 training GPUs are not a multiple"),
        ({"gpu_nodes": 3, "rollout_nodes": 2, "train_tp": 2, "train_pp": 4}, r"trainer needs ~\d+\.\d GiB per GPU"),
        ({"sglang_tp": 1}, r"leaving -?\d+\.\d GiB of KV cache"),
        ({"launcher": "hosts", "hosts": ("a", "b")}, "needs gpu_nodes \\+ cpu_nodes = 4 hosts, got 2"),
    ],
)
def test_impossible_plans_name_the_constraint(changes: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        make_plan(ClusterConfig(**changes))  # type: ignore[arg-type]


def test_7b_rejects_tp_8_because_of_its_4_kv_heads() -> None:
    with pytest.raises(PlanError, match="must divide both the 28 attention heads and the 4 KV heads"):
        make_plan(ClusterConfig(model=QWEN_7B))


def test_32b_fits_only_with_the_optimizer_state_sharded_over_two_training_nodes() -> None:
    """ZeRO-1 (learner/optimizer.py): at DP 2 each GPU keeps half the fp32 masters and moments, 10 bytes per bf16
    parameter instead of 18; one training node (DP 1) cannot hold 32B at TP 8."""
    two = make_plan(ClusterConfig())
    with pytest.raises(PlanError, match=r"trainer needs ~\d+\.\d GiB per GPU at TP 8 x PP 1 x DP 1"):
        make_plan(ClusterConfig(gpu_nodes=3, rollout_nodes=2))
    p = ClusterModelConfig().param_count / 8  # about the per-GPU parameter count at TP 8
    one_node_gib = two.trainer_memory_gib + p * (12 / 1 - 12 / 2 + 4 - 2) / 2**30
    assert one_node_gib > ClusterConfig().gpu_memory_gib > two.trainer_memory_gib
