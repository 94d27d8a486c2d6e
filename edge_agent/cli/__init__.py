"""`edge-agent`, the technician's command line (typer + rich): `app` is the entry point, one
module per group of commands."""
