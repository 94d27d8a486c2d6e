"""Fieldlink edge agent: polls field devices, buffers in SQLite, syncs over MQTT."""

from protocols.errors import DetailedError

__version__ = "0.1.0"


class EdgeError(Exception):
    """Base of every error the edge agent raises on purpose. Modules subclass it narrowly."""


class SchemaTooNewError(EdgeError, DetailedError):
    """A file was written by a newer agent: its schema version is unknown here.

    Each SQLite store subclasses it with its own base error and `store` naming the file.
    """

    store = "database"

    template = "{store} schema version {found} is newer than this agent's {known}"
    found: int
    known: int
