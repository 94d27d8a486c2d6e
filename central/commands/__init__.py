"""Central's side of commands (DESIGN.md §6): issue, check, sign, dispatch and follow; the
durable tables, the signing key and the HTTP API."""
