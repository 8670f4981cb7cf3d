"""The root config: one table per component. Each component is handed its own section, never this root."""

from dataclasses import dataclass, field

from engine.inference_config import InferenceConfig
from retriever.config import RetrievalServerConfig, RetrieverConfig
from serving.config import ServingConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class SSPConfig:
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    """Search: which retriever, its index or URL, and top-k."""
    retrieval_server: RetrievalServerConfig = field(default_factory=RetrievalServerConfig)
    """`ssp retriever serve`: the Search-R1 /retrieve server, its index and request limits."""
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    """Generation: the inference servers (or router) the engine calls, slots per server, timeouts, health checks."""
    serving: ServingConfig = field(default_factory=ServingConfig)
    """Inference server (`ssp model serve`): model, device, batch capacity, keys."""
