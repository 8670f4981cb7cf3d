"""The command line of every process in a cluster plan, and how each is started on its node.

Kept apart from the plan (pure placement arithmetic) because the commands depend on the tools a cluster has:
SLURM's `srun`, or `ssh` to a host list. Each process becomes one `Launch`: the node, the environment (which GPUs it
sees) and the argv to run there. The learner's ranks start with torchrun's static rendezvous on the first training
node; SGLang servers are started with sglang's own launcher (the `gpu` extra).

Every server binds its node's name (the address the other nodes reach it at), never 0.0.0.0, and every process gets
the run key (ssp/run_key.py) from a file in the run folder, never on its command line (`ps` shows those to every
user of a node): ours through their `api_key_file` keys, SGLang through `--config <run>/sglang-auth.yaml`, the YAML
config file that `sglang.launch_server` merges with its command line (sglang/srt/server_args_config_parser.py), which
holds `api-key` and `admin-api-key`, both the run key (SGLang 0.5.23 checked: with both set, admin routes accept
only the admin key and the rest only the API key, and some admin routes refuse to run on a server without an admin
key; the merged options never reach /proc/PID/cmdline). `Launch.key_via` names that path for the dry run's listing.
A node name must resolve, on its own node, to the address the others reach (not to 127.0.1.1, as a Debian-style
/etc/hosts maps a machine's own name); where it does, use launcher = "hosts" with addresses in cluster.hosts.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from ssp.launcher.config import ClusterConfig
from ssp.launcher.plan import Plan, Process


@dataclass(frozen=True, slots=True)
class Launch:
    name: str
    node: str
    env: dict[str, str]
    argv: list[str]
    key_via: str
    """How the process reads the run key (a config key or option naming a file), shown by `ssp launch --dry-run`."""

    def shell(self) -> str:
        """The process as one shell line (environment assignments, then the command)."""
        assignments = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join(assignments + [shlex.quote(a) for a in self.argv])

    def wrapped(self, cfg: ClusterConfig, workdir: Path) -> list[str]:
        """The argv that starts this process on its node from the launching host."""
        remote = f"cd {shlex.quote(str(workdir))} && exec env {self.shell()}"
        if cfg.launcher == "slurm":
            return ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={self.node}", "--kill-on-bad-exit=1",
                    "bash", "-c", remote]
        return ["ssh", "-o", "BatchMode=yes", self.node, remote]


def render_launches(cfg: ClusterConfig, plan: Plan, *, index_dir: Path, learner_config_json: Path,
                    stream_config_json: Path, key_file: Path, sglang_auth: Path,
                    engine_argv: list[str]) -> list[Launch]:
    """Every process of the plan, in start order: retriever, SGLang servers, learner ranks, then the engine.
    `key_file` holds the run key, `sglang_auth` the SGLang config file with it (both written by launch_run);
    the learner ranks and the engine name `key_file` in their own configs."""
    launches = []
    for process in plan.processes:
        if process.role == "retriever":
            argv = ["ssp", "retriever", "serve", "--index", str(index_dir), "--host", process.node,
                    "--port", str(process.port), "--set", f"retrieval_server.api_key_file={json.dumps(str(key_file))}"]
            launches.append(Launch("retriever", process.node, {}, argv, "retrieval_server.api_key_file"))
    for i, process in enumerate(p for p in plan.processes if p.role == "sglang"):
        argv = ["python", "-m", "sglang.launch_server", "--model-path", cfg.model_path,
                "--tp-size", str(cfg.sglang_tp), "--host", process.node, "--port", str(process.port),
                "--mem-fraction-static", str(cfg.sglang_mem_fraction), "--config", str(sglang_auth)]
        launches.append(Launch(f"sglang-{i}", process.node, _gpu_env(process), argv,
                               f"--config {sglang_auth.name} (api-key, admin-api-key)"))
    training = [p for p in plan.processes if p.role == "learner"]
    for rank, process in enumerate(training):
        argv = [
            "python", "-m", "torch.distributed.run",
            f"--nnodes={len(training)}", f"--node-rank={rank}", f"--nproc-per-node={cfg.gpus_per_node}",
            f"--master-addr={training[0].node}", f"--master-port={cfg.rendezvous_port}",
            "-m", "ssp.learner.trainer", "--config-json", str(learner_config_json),
            "--stream-json", str(stream_config_json),
            "--trajectories", f"tcp://{training[0].node}:{cfg.trajectory_port}",
        ]
        for url in plan.servers:
            argv += ["--server", url]
        launches.append(Launch(f"learner-{rank}", process.node, _gpu_env(process), argv,
                               "stream.key_file, learner.push_api_key_file"))
    engine = next(p for p in plan.processes if p.role == "engine")
    launches.append(Launch("engine", engine.node, {}, engine_argv,
                           "stream.key_file, inference.api_key_file, retriever.api_key_file"))
    return launches


def _gpu_env(process: Process) -> dict[str, str]:
    return {"CUDA_VISIBLE_DEVICES": ",".join(map(str, process.gpus))} if process.gpus else {}
