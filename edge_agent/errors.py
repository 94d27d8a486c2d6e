"""The edge agent's one base exception; modules subclass it narrowly."""


class EdgeError(Exception):
    """Base of every error the edge agent raises on purpose."""
