"""Fieldlink edge agent: polls field devices, buffers in SQLite, syncs over MQTT."""

__version__ = "0.1.0"


class EdgeError(Exception):
    """Base of every error the edge agent raises on purpose. Modules subclass it narrowly."""
