"""Metrics, tracing and the cost model."""
