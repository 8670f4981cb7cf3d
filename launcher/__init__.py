"""launcher/: where every process of a run goes (nodes, GPUs, ports), checked before anything starts."""
