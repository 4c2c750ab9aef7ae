"""Tracing and metrics hooks (observability issue)."""
