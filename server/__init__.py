"""stepserve's server: the gRPC API (``api``), the batching engine (``engine``) and config."""
