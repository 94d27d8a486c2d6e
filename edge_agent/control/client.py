"""The CLI's side of the control socket (`edge_agent.control.server`): one JSON-lines request,
blocking.

    reply = request(cfg.control_socket_path, "read", device="gas-1", point="gas_lel")

returns the response body (without `ok`), or raises:
- `AgentNotRunningError`: nothing answers on the socket (no file, connection refused);
- `ControlAccessError`: the socket exists but this user may not use it (not in the group);
- `ControlRequestError`: the agent refused the request (`type` and `message` from it).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from edge_agent import EdgeError
from edge_agent.control import ControlError
from protocols.errors import DetailedError

DEFAULT_TIMEOUT_S = 40.0  # longer than the agent's own REQUEST_TIMEOUT_S, so it answers first


class ControlClientError(EdgeError):
    """Base of the control client's errors."""


class AgentNotRunningError(ControlClientError, DetailedError):
    template = "the agent is not running (nothing answers on {path}: {reason})"
    path: Path
    reason: str


class ControlAccessError(ControlClientError, DetailedError):
    template = ("permission denied on {path}: run as the agent's user or add yourself "
                "to its group (sudo usermod -aG <group> $USER, then log in again)")
    path: Path


class ControlRequestError(ControlClientError, ControlError):
    """The agent refused the request: its `ControlError` (`type`, `message`), come back."""


def request(path: Path | str, op: str, *, timeout: float = DEFAULT_TIMEOUT_S,
            **fields: Any) -> dict[str, Any]:
    """Send `{"op": op, **fields}` and return the agent's answer (without `ok`)."""
    path = Path(path)
    line = json.dumps({"op": op, **fields}, ensure_ascii=False).encode() + b"\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentNotRunningError(path, exc.strerror or str(exc)) from exc
        except PermissionError as exc:
            raise ControlAccessError(path) from exc
        except OSError as exc:
            raise AgentNotRunningError(path, str(exc)) from exc
        try:
            sock.sendall(line)
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError as exc:
            raise ControlClientError(
                f"the agent did not answer {op!r} within {timeout:g} s") from exc
        except OSError as exc:
            raise ControlClientError(f"control socket {path}: {exc}") from exc
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise ControlClientError(f"unreadable answer from the agent: {data[:200]!r}") from exc
    if not isinstance(reply, dict):
        raise ControlClientError(f"unexpected answer from the agent: {reply!r}")
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise ControlRequestError(str(error.get("type", "error")),
                                  str(error.get("message", "request failed")))
    reply.pop("ok", None)
    return reply


__all__ = ["AgentNotRunningError", "ControlAccessError", "ControlClientError",
           "ControlRequestError", "request"]
