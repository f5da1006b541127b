"""iota-cli: contribute compute to a decentralized LLM pretraining swarm."""

__version__ = "0.1.0"
