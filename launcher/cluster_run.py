"""Start a placed multi-node run: resolve the nodes, write the learner's config, start every process in order,
watch them, and stop them all when the engine ends or any process dies.

Start order and why: the retriever and the SGLang servers first (the learner's weight-update group and the
engine both need the servers up), then the learner ranks (they listen for trajectories), then the engine, which is
`ssp train` attached to all of the above and waits for the learner's listener itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ssp.config import to_dict
from ssp.launcher.commands import Launch, render_launches
from ssp.launcher.config import ClusterConfig
from ssp.launcher.plan import LearnerFootprint, Plan, PlanError, make_plan
from ssp.paths import artifacts_dir, default_index_dir
from ssp.processes import ProcessFailed, ProcessSet
from ssp.run_config import SSPConfig, learner_staleness_bound
from ssp.run_key import new_run_key, write_run_key, write_secret

SGLANG_AUTH = "sglang-auth.yaml"
"""The SGLang servers' `--config` file in the run folder: their API and admin keys (mode 0600)."""


@dataclass(frozen=True, slots=True)
class PreparedLaunch:
    cluster: ClusterConfig
    plan: Plan
    launches: list[Launch]
    run_dir: Path
    learner_config: dict[str, object]
    stream_config: dict[str, object]
    """The [stream] section both ends read: the learner from <run>/stream_config.json, the engine from --set."""
    run_key: str = field(repr=False)
    """The run's one secret, made here so that the dry run can show it (masked) and launch_run writes this one."""


def slurm_allocation_nodes() -> list[str]:
    """The node names of the current SLURM allocation, in order."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise PlanError("not inside a SLURM allocation (SLURM_JOB_NODELIST is unset): start one with "
                        "`salloc --nodes=N` or `sbatch --nodes=N --wrap 'just train-32b'`, or check with --dry-run")
    if shutil.which("scontrol") is None:
        raise PlanError("SLURM_JOB_NODELIST is set but `scontrol` is not on PATH; load the SLURM module")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def prepare_launch(root: SSPConfig, *, config_path: Path | None, overrides: list[str],
                   use_allocation: bool) -> PreparedLaunch:
    """Place the run and render every command; raises PlanError for any violated constraint."""
    cluster = root.cluster
    if use_allocation and cluster.launcher == "slurm":
        nodes = slurm_allocation_nodes()
        need = cluster.gpu_nodes + cluster.cpu_nodes
        if len(nodes) < need:
            raise PlanError(f"the allocation has {len(nodes)} nodes, the plan needs gpu_nodes + cpu_nodes = {need}")
        cluster = dataclasses.replace(cluster, hosts=tuple(nodes[:need]))
    footprint = LearnerFootprint(
        param_bytes=4 if root.learner.dtype == "float32" else 2,  # "auto" is bf16 on GPUs
        micro_batch_tokens=root.learner.micro_batch_tokens,
        kl_reference=root.learner.loss.kl_coef > 0,
    )
    plan = make_plan(cluster, footprint)
    run_dir = root.train.run_dir or artifacts_dir() / "runs" / root.train.name
    # One key per run, written by launch_run into the run folder every node reads: the trajectory stream's key and
    # every server's API key (admin routes included); each process gets the file's path, never the key.
    key_file = run_dir / "stream.key"
    try:
        learner = dataclasses.replace(
            root.learner, model_dir=Path(cluster.model_path), out_dir=run_dir / "learner",
            tensor_parallel=cluster.train_tp, pipeline_parallel=cluster.train_pp, data_parallel=plan.train_dp,
            max_steps=root.train.steps, push_master_address=_trainer0(plan),
            max_staleness=learner_staleness_bound(root),
            push_master_port=cluster.weight_update_port, push_api_key_file=key_file,
        )
    except ValueError as e:
        raise PlanError(f"the learner cannot run this plan: {e}") from None

    stream = dataclasses.replace(root.stream, run_id=root.stream.run_id or run_dir.name, key_file=key_file)
    retriever = next(p for p in plan.processes if p.role == "retriever")
    engine_argv = ["ssp", "train"] + (["--config", str(config_path)] if config_path else [])
    for override in [
        *overrides,
        f"train.server_urls={json.dumps(list(plan.servers))}",
        f'train.learner_address="{_trainer0(plan)}:{cluster.trajectory_port}"',
        f"stream.run_id={json.dumps(stream.run_id)}",
        f"stream.key_file={json.dumps(str(key_file))}",
        f"inference.api_key_file={json.dumps(str(key_file))}",
        f"retriever.api_key_file={json.dumps(str(key_file))}",
        f'learner.out_dir="{run_dir / "learner"}"',
        f'rollout.tokenizer_dir="{cluster.model_path}"',  # the servers' model, not the demo's SmolLM2
        'retriever.kind="http"',
        f'retriever.url="http://{retriever.node}:{retriever.port}"',
    ]:
        engine_argv += ["--set", override]
    index_dir = root.retrieval_server.index_dir or root.retriever.index_dir or default_index_dir()
    launches = render_launches(cluster, plan, index_dir=index_dir,
                               learner_config_json=run_dir / "learner_config.json",
                               stream_config_json=run_dir / "stream_config.json", key_file=key_file,
                               sglang_auth=run_dir / SGLANG_AUTH, engine_argv=engine_argv)
    return PreparedLaunch(cluster, plan, launches, run_dir, to_dict(learner), to_dict(stream), new_run_key())


def _trainer0(plan: Plan) -> str:
    """The node of learner rank 0: it listens for trajectories and hosts the weight-update group."""
    return next(p.node for p in plan.processes if p.role == "learner")


def write_run_secrets(run_dir: Path, key: str) -> None:
    """The run key for our processes (<run>/stream.key) and for the SGLang servers (SGLANG_AUTH), both mode 0600."""
    write_run_key(run_dir / "stream.key", key)
    # JSON is YAML: the key's hex digits stay a string whatever they look like.
    write_secret(run_dir / SGLANG_AUTH, json.dumps({"api-key": key, "admin-api-key": key}) + "\n")


def launch_run(prepared: PreparedLaunch, *, server_timeout_s: float = 1800.0) -> int:
    """Start everything, wait for the engine to finish; any process dying first ends the run with its log."""
    run_dir, cluster = prepared.run_dir, prepared.cluster
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "learner_config.json").write_text(json.dumps(prepared.learner_config, indent=1))
    (run_dir / "stream_config.json").write_text(json.dumps(prepared.stream_config, indent=1))
    write_run_secrets(run_dir, prepared.run_key)
    workdir = Path.cwd()
    by_name = {launch.name: launch for launch in prepared.launches}
    with ProcessSet() as processes:
        try:
            started = {}
            for launch in prepared.launches:
                if launch.name.startswith(("retriever", "sglang")):
                    started[launch.name] = processes.start(
                        launch.name, launch.wrapped(cluster, workdir), log_path=run_dir / "logs" / f"{launch.name}.log")
            retriever = next(p for p in prepared.plan.processes if p.role == "retriever")
            started["retriever"].wait_ready(url=f"http://{retriever.node}:{retriever.port}/health",
                                            timeout_s=server_timeout_s)
            for i, url in enumerate(prepared.plan.servers):
                started[f"sglang-{i}"].wait_ready(url=f"{url}/health", timeout_s=server_timeout_s)
            for launch in prepared.launches:
                if launch.name.startswith("learner"):
                    processes.start(launch.name, launch.wrapped(cluster, workdir),
                                    log_path=run_dir / "logs" / f"{launch.name}.log")
            engine = processes.start("engine", by_name["engine"].wrapped(cluster, workdir),
                                     log_path=run_dir / "logs" / "engine.log")
            print(f"ssp launch: all {len(prepared.launches)} processes started; logs in {run_dir / 'logs'}")
            while engine.alive():
                processes.check()
                time.sleep(5.0)
            code = engine.proc.returncode
            print(f"ssp launch: the engine finished with code {code}; stopping the other processes")
            return int(code)
        except ProcessFailed as e:
            print(f"ssp launch: {e}", file=sys.stderr)
            return 1
