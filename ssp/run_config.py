"""The root config: one table per component. Each component is handed its own section, never this root."""

from dataclasses import dataclass, field

from retriever.config import RetrieverConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class SSPConfig:
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    """Search: which retriever, its index or URL, and top-k."""
