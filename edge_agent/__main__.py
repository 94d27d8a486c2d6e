"""`python -m edge_agent` runs the CLI (same as the `edge-agent` console script)."""

from edge_agent.cli import main

main()
