"""Central's Prometheus metrics."""
