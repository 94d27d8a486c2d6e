"""The gateway's one TOML config file: the validated model and the line index that lets errors
name the line."""
