"""Weight updates reach the reference server: a second process joins /init_weights_update_group (gloo), pushes
modified weights with /update_weights_from_distributed (per-tensor and flattened_bucket, mixed dtypes), and the
server's next outputs equal transformers' greedy decode under the same modified weights, with the new version.
The original weights are restored with /update_weights_from_disk (which is tested by that, too)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from push_weights import modified_weights  # noqa: E402

PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]
NEW_TOKENS = 6


def post(url: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def get(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=60) as r:
        return json.loads(r.read())


def greedy_server(url: str) -> dict[str, Any]:
    return post(url, "/generate", {"input_ids": PROMPT, "return_logprob": True,
                                   "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS}})


def greedy_hf(model: Any) -> list[int]:
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(PROMPT):].tolist()


def test_distributed_push_changes_outputs_and_version(ref_server: str, model_dir: Path) -> None:
    before = greedy_server(ref_server)
    old_version = get(ref_server, "/model_info")["weight_version"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the server: multi-threaded small matmuls crawl on a busy shared CPU
    try:
        push = subprocess.run([sys.executable, str(Path(__file__).parent / "push_weights.py"), ref_server,
                               str(model_dir), "7"], capture_output=True, text=True, timeout=300)
        assert push.returncode == 0, push.stdout + push.stderr
        assert get(ref_server, "/model_info")["weight_version"] == "7"

        first, second = modified_weights(model_dir)
        params = dict(model.state_dict())
        with torch.no_grad():
            for name, w in first + second:
                params[name].copy_(w)
        norm = post(ref_server, "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 576})
        assert torch.equal(torch.tensor(norm), first[0][1])
        after = greedy_server(ref_server)
        assert after["output_ids"] == greedy_hf(model)
        assert after["output_ids"] != before["output_ids"], "the pushed weights must change the greedy answer"
        assert after["meta_info"]["weight_version"] == "7"
        assert after["meta_info"]["weight_versions"] == [{"version": "7", "start": 0,
                                                         "end": len(after["output_ids"])}]
    finally:
        torch.set_num_threads(threads)
        restored = post(ref_server, "/update_weights_from_disk", {"model_path": str(model_dir),
                                                                   "weight_version": old_version})
    assert restored["success"], restored
    again = greedy_server(ref_server)
    assert again["output_ids"] == before["output_ids"]
    assert again["meta_info"]["weight_version"] == old_version


def test_bad_push_is_refused_without_changing_weights(ref_server: str) -> None:
    """A call naming an unknown group fails cleanly (no receive was posted, so no trainer could hang on it)."""
    post(ref_server, "/begin_weight_update", {})
    try:
        req = urllib.request.Request(ref_server + "/update_weights_from_distributed", method="POST",
                                     data=json.dumps({"names": ["model.norm.weight"], "dtypes": ["float32"],
                                                      "shapes": [[576]], "group_name": "nope"}).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 400
        reply = json.loads(err.value.read())
        assert reply["success"] is False and "no weight-update group 'nope'" in reply["message"]
    finally:
        post(ref_server, "/end_weight_update", {})


def test_update_from_tensor_is_refused_on_cpu(ref_server: str) -> None:
    """CUDA-IPC tensor passing has no CPU meaning: success false with a message naming the alternatives."""
    post(ref_server, "/begin_weight_update", {})
    try:
        req = urllib.request.Request(ref_server + "/update_weights_from_tensor", method="POST",
                                     data=json.dumps({"serialized_named_tensors": ["AAAA"]}).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        reply = json.loads(err.value.read())
        assert err.value.code == 400 and reply["success"] is False
        assert "update_weights_from_distributed" in reply["message"]
    finally:
        post(ref_server, "/end_weight_update", {})


def test_repeated_flattened_pushes_land_in_place(ref_server: str, model_dir: Path) -> None:
    """WeightPusher's flattened buckets: the first push re-homes the parameters into the received buffers, the next
    push with the same layout is broadcast straight into them, and a new layout (other bucket size) re-homes again;
    every push's values are what the server then holds (checked on tensors at both ends of the layouts)."""
    from safetensors.torch import load_file

    from ssp.learner.push import WeightPusher

    state = load_file(str(model_dir / "model.safetensors"))
    names = [n for n in state if n.startswith(("model.layers.0.", "model.layers.1.", "model.layers.2."))]
    probes = [names[0], names[len(names) // 2], names[-1]]
    old_version = get(ref_server, "/model_info")["weight_version"]
    try:
        for versions, bucket_bytes in ((("a", 0.5), ("b", -2.0)), 8 << 20), ((("c", 3.0),), 2 << 20):
            pusher = WeightPusher([ref_server], backend="gloo", bytes_per_bucket=bucket_bytes, timeout_s=120)
            try:
                pusher.connect()
                for version, scale in versions:
                    stats = pusher.push(((n, state[n] * scale) for n in names), version)
                    assert stats.tensors == len(names) and stats.buckets > 1
                    assert get(ref_server, "/model_info")["weight_version"] == version
                    for name in probes:
                        rows = post(ref_server, "/get_weights_by_name", {"name": name, "truncate_size": 4})
                        assert torch.equal(torch.tensor(rows), (state[name] * scale)[:4]), (version, name)
            finally:
                pusher.close()
        after = greedy_server(ref_server)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            for name, w in model.state_dict().items():
                if name in names:
                    w.copy_(state[name] * 3.0)
        assert after["output_ids"] == greedy_hf(model)  # the forward pass reads the re-homed parameters
    finally:
        restored = post(ref_server, "/update_weights_from_disk", {"model_path": str(model_dir),
                                                                   "weight_version": old_version})
    assert restored["success"], restored


def test_pushes_pause_in_place_but_every_kth_retracts(ref_server: str, model_dir: Path) -> None:
    """learner.push_kv_refresh_every = 2: push 1 pauses in place (a running request keeps its KV and decodes on),
    push 2 retracts it (it re-prefills on the new weights). The request's versions show both switches."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file

    from ssp.learner.push import WeightPusher

    state = load_file(str(model_dir / "model.safetensors"))
    names = [n for n in state if n.startswith("model.layers.0.")]  # the same values: the model does not change
    old_version = get(ref_server, "/model_info")["weight_version"]
    pusher = WeightPusher([ref_server], backend="gloo", timeout_s=120, kv_refresh_every=2)
    try:
        pusher.connect()
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(post, ref_server, "/generate", {"input_ids": PROMPT, "sampling_params": {
                "temperature": 0, "max_new_tokens": 400, "ignore_eos": True}})
            deadline = time.monotonic() + 60
            while get(ref_server, "/get_load")[0]["num_reqs"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            modes = [pusher.push(((n, state[n]) for n in names), v).pause_mode for v in ("kv-1", "kv-2")]
            out = running.result(timeout=300)
    finally:
        pusher.close()
        post(ref_server, "/update_weight_version", {"new_version": old_version, "abort_all_requests": False})
    assert modes == ["in_place", "retract"]
    meta = out["meta_info"]
    assert meta["num_retractions"] == 1 and len(out["output_ids"]) == 400
    assert [span["version"] for span in meta["weight_versions"]] == [old_version, "kv-1", "kv-2"]
