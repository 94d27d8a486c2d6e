"""Central's one base exception; modules subclass it narrowly."""


class CentralError(Exception):
    """Base of every error central raises on purpose."""
