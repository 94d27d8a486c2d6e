"""Commands from central (DESIGN.md §6): the executor that verifies and runs each signed command
once, its ledger, and its wiring."""
