"""Fieldlink edge agent: polls field devices, buffers in SQLite, syncs over MQTT."""

__version__ = "0.1.0"
