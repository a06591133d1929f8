"""An auto-batching proxy that speaks Hugging Face text-embeddings-inference's HTTP API."""

__version__ = "0.1.0"
