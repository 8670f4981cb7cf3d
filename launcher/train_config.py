"""Config section [train]: what `ssp train` starts itself and what it attaches to, and how long the run is.

`ssp train` puts the retriever, the inference servers, the learner and the engine together. Each piece is either
started by `ssp train` on this machine or attached to (already running elsewhere, e.g. on cluster nodes):

    piece              started by ssp train when                 attached to when
    inference servers  train.server_urls is empty: train.servers  train.server_urls lists their base URLs
                       reference servers (`ssp model serve`)
    retriever          retriever.kind = "tantivy" (in-process);   retriever.kind = "http" with retriever.url
                       kind = "http" with train.start_retriever   (start_retriever = false)
                       (`ssp retriever serve` on a free port)
    learner            train.learner_address is unset: torchrun   train.learner_address = "HOST:PORT" (its
                       via `ssp learner train` on this machine    trajectory listener)
    engine             always (in the `ssp train` process)        -
"""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    name: str = "run"
    """Run name; the run folder is artifacts/runs/<name> unless run_dir is set. `--resume` continues the run of
    this name."""
    run_dir: Path | None = None
    """Run folder (metrics, checkpoints, logs, samples, plots). Unset = artifacts/runs/<name>."""
    steps: int = 3
    """Optimizer steps of the whole run, resumed steps included (the learner's max_steps). Each step consumes
    scheduler.episodes_per_step trajectory groups (= learner.groups_per_step)."""
    servers: int = 1
    """Reference servers (`ssp model serve`) to start on free local ports when server_urls is empty."""
    server_urls: tuple[str, ...] = ()
    """Attach mode: base URLs of running inference servers (SGLang or `ssp model serve`); none are started. They
    replace inference.server_urls, and the learner pushes its weights to them."""
    max_server_restarts: int = 3
    """Restarts of the servers this run started, all of them together: a server that dies is started again on its
    port while the others serve, and rejoins once the learner's next push brought it the current weights. The run
    stops, naming the server and its log, when this budget is spent or no server is left running. 0 = stop at the
    first death (as with one server)."""
    server_start_timeout_s: float = 300.0
    """How long a started reference server may take to answer /health (model load included)."""
    start_retriever: bool = False
    """With retriever.kind = "http": start `ssp retriever serve` (over retrieval_server.index_dir) on a free port
    and search it, instead of attaching to retriever.url. Ignored for other kinds."""
    learner_address: str | None = None
    """Attach mode: "HOST:PORT" where a learner started elsewhere (`python -m ssp.learner.trainer ... --trajectories
    tcp://0.0.0.0:PORT`) listens for trajectories. Unset = start the learner here with torchrun (`ssp learner
    train`), learner.tensor_parallel x learner.data_parallel ranks, listening on a free local port."""
    learner_start_timeout_s: float = 600.0
    """How long the learner may take to start listening (model load, checkpoint restore) before the run fails."""
    eval_datasets: tuple[Path, ...] = ()
    """QA files ({id, question, golden_answers} JSONL) scored before the first step and after the last one with
    `ssp eval`'s protocol ([eval]; eval.limit questions per file) on the run's servers. Empty = no evaluation."""
    export_policy: bool = True
    """After the last step, write the trained policy as a Hugging Face directory, <run>/policy (what `ssp export`
    writes), so `ssp eval --model <run>/policy` and transformers load it. Only when ssp train started the learner: an
    attached learner's checkpoints are on its machine (run `ssp export` there)."""
    eval_seeds: tuple[Path, ...] = ()
    """A file of held-out seed answers (data/seeds schema), in a one-element list, on which the proposer is evaluated
    before the first step and after the last one (`ssp eval --seeds`: valid-question rate by stage, verification
    pass rate, searches, solver accuracy on the valid questions, with 95% intervals; eval.seeds_limit of them). It
    must share no answer with scheduler.seeds_file (checked at start). Empty = no proposer evaluation (a list, like
    eval_datasets, so that `--set train.eval_seeds=[]` turns it off)."""
    eval_before: bool = True
    """Evaluate the initial policy too (with eval_datasets / eval_seeds), for the before/after table. Off when
    only the final policy's scores are wanted, e.g. in each arm of `ssp bench learning`."""
    sample_every: int = 1
    """Keep a copy of every N-th trajectory group sent to the learner in <run>/samples.frames (read it with
    `ssp inspect`). 0 = keep none."""
    poll_interval_s: float = 0.5
    """How often the run checks its processes, the servers' weight version and the learner's metrics."""
    stop_timeout_s: float = 120.0
    """At the end, how long in-flight work may take to stop, and the learner to write its last checkpoint and
    exit (SmolLM2-135M's with AdamW state is 1.6 GB); a learner still running then fails the run."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name = {self.name!r}: must be a non-empty folder name without '/' "
                             "(it names artifacts/runs/<name>)")
        if self.steps < 1:
            raise ValueError(f"steps = {self.steps}: must be >= 1")
        if self.max_server_restarts < 0:
            raise ValueError(f"max_server_restarts = {self.max_server_restarts}: must be >= 0 (0 = never restart)")
        if self.servers < 1:
            raise ValueError(f"servers = {self.servers}: must be >= 1 (or list running ones in server_urls)")
        for url in self.server_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"server_urls entry {url!r}: must be a base URL like http://host:30000")
        if self.learner_address is not None:
            host, _, port = self.learner_address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"learner_address = {self.learner_address!r}: must be HOST:PORT, e.g. "
                                 "trainer-0:29600 (or unset to start the learner here)")
        if len(self.eval_seeds) > 1:
            raise ValueError(f"eval_seeds = {[str(p) for p in self.eval_seeds]}: give at most one seed file (join "
                             "them into one file to evaluate on all)")
        if self.sample_every < 0:
            raise ValueError(f"sample_every = {self.sample_every}: must be >= 0 (0 = keep no samples)")
        for name in ("server_start_timeout_s", "learner_start_timeout_s", "poll_interval_s", "stop_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} = {getattr(self, name)}: must be > 0 seconds")
