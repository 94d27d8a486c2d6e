"""Fieldlink edge agent: polls field devices, buffers in SQLite, syncs over MQTT."""

__version__ = "0.1.0"


class EdgeError(Exception):
    """Base of every error the edge agent raises on purpose. Modules subclass it narrowly."""


class SchemaTooNewError(EdgeError):
    """A file was written by a newer agent: its schema version is unknown here.

    Each SQLite store subclasses it with its own base error and `store` naming the file.
    """

    store = "database"

    def __init__(self, found: int, known: int) -> None:
        super().__init__(f"{self.store} schema version {found} is newer than this agent's {known}")
        self.found = found
        self.known = known
