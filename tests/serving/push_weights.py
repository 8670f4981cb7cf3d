"""A stand-in trainer (rank 0) that pushes modified weights to one server with SGLang's update sequence
(pause, begin, buckets, end, continue).

Run as its own process by test_weight_update.py: `python push_weights.py URL MODEL_DIR VERSION`. It joins the
weight-update group exactly as a trainer would (TCP rendezvous it hosts -> PrefixStore(group_name) -> a separate
gloo group), sends one per-tensor call and one flattened_bucket call with mixed dtypes, then tears the group down.
`modified_weights()` is imported by the test to compute the expected outputs.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from ssp.serving.weight_sync import init_custom_process_group

GROUP = "ssp_test_group"


def modified_weights(model_dir: Path) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(per-tensor call, flattened-bucket call): deterministic edits big enough to change greedy outputs."""
    state = load_file(str(model_dir / "model.safetensors"))
    first = [("model.norm.weight", state["model.norm.weight"] * 1.5)]
    second = [
        ("model.layers.0.self_attn.o_proj.weight", state["model.layers.0.self_attn.o_proj.weight"] * -1.0),
        ("model.layers.1.input_layernorm.weight", (state["model.layers.1.input_layernorm.weight"] * 0.5)
         .to(torch.bfloat16)),
    ]
    return first, second


def post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"{}")


def in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    """Start an HTTP call that blocks until our broadcast/join happens."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    return t, out


def checked(reply: dict[str, Any], what: str) -> None:
    if not reply.get("success", True):
        raise SystemExit(f"{what} failed: {reply}")


def main(url: str, model_dir: Path, version: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t, reply = in_thread(post, url, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
        "group_name": GROUP, "backend": "gloo"})
    group = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=0,
                                      group_name=GROUP)
    t.join()
    checked(reply[0], "init_weights_update_group")

    first, second = modified_weights(model_dir)
    checked(post(url, "/pause_generation", {"mode": "retract"}), "pause")
    checked(post(url, "/begin_weight_update", {}), "begin_weight_update")
    # Per-tensor format: one broadcast per tensor, in names order.
    t, reply = in_thread(post, url, "/update_weights_from_distributed", {
        "names": [n for n, _ in first], "dtypes": [str(w.dtype).removeprefix("torch.") for _, w in first],
        "shapes": [list(w.shape) for _, w in first], "group_name": GROUP, "flush_cache": False})
    for _, w in first:
        dist.broadcast(w.contiguous(), src=0, group=group)
    t.join()
    checked(reply[0], "update_weights_from_distributed (per tensor)")
    # flattened_bucket: the raw bytes of every tensor, concatenated, in one broadcast.
    flat = torch.cat([w.contiguous().view(-1).view(torch.uint8) for _, w in second])
    t, reply = in_thread(post, url, "/update_weights_from_distributed", {
        "names": [n for n, _ in second], "dtypes": [str(w.dtype).removeprefix("torch.") for _, w in second],
        "shapes": [list(w.shape) for _, w in second], "group_name": GROUP, "load_format": "flattened_bucket",
        "flush_cache": True, "weight_version": version})
    dist.broadcast(flat, src=0, group=group)
    t.join()
    checked(reply[0], "update_weights_from_distributed (flattened bucket)")
    checked(post(url, "/end_weight_update", {}), "end_weight_update")
    checked(post(url, "/continue_generation", {}), "continue_generation")
    checked(post(url, "/destroy_weights_update_group", {"group_name": GROUP}), "destroy_weights_update_group")
    dist.destroy_process_group(group)
    print("pushed", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
