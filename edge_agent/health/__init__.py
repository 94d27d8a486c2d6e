"""The agent's own health: wall-clock sanity (DESIGN.md §4.7) and the Prometheus metrics
endpoint."""
