"""Central's settings: one validated model from TOML, environment and command-line flags."""
