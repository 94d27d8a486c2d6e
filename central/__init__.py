"""Fieldlink central: MQTT ingest, storage, alarms, commands and the duty officers' console."""

__version__ = "0.1.0"


class CentralError(Exception):
    """Base of every error central raises on purpose. Modules subclass it narrowly."""
