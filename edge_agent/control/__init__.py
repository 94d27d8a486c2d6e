"""The local control socket: the running agent's server side and the CLI's client side."""

from edge_agent import EdgeError


class ControlError(EdgeError):
    """A request was refused; `type` is the stable name clients switch on.

    The server raises it and sends `type` and `message` back; the client raises them again as
    `edge_agent.control.client.ControlRequestError`, a subclass.
    """

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message
