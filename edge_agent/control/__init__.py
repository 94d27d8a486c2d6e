"""The local control socket: the running agent's server side and the CLI's client side."""
