"""Wiring of the command executor into the agent: the pinned key and the diagnostics provider.

`build_executor(config, outbox, pollers, status)` is what the supervisor calls. Central's public
key comes from `[commands] central_public_key` (DESIGN.md §6: pinned at enrolment); without a
usable key the executor still runs and rejects every command with `no_public_key`, so central
sees why nothing executes. The key is read and checked at start, and loads `cryptography` only
when a first command is verified (`protocols.command_keys.PinnedKey`).
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from edge_agent import EdgeError
from edge_agent.commands.executor import CommandExecutor, CommandTarget
from edge_agent.commands.outcomes import KindHandler
from edge_agent.commands.warnings import WarningPlayer
from edge_agent.config.site import AgentConfig
from edge_agent.outbox.store import OutboxError
from protocols.command_keys import BadKeyError, PinnedKey

log = structlog.get_logger(__name__)


class CommandConfigError(EdgeError):
    """The pinned central public key cannot be read or parsed."""


def load_public_key(setting: str | None, base_dir: Path | None = None) -> PinnedKey | None:
    """Central's key from `[commands] central_public_key`: base64 of the raw 32 bytes, inline
    PEM, or a path (relative to the config file's folder) to a PEM or base64 file."""
    if not setting:
        return None
    text = setting.strip()
    looks_inline = text.startswith("-----BEGIN") or (len(text) == 44 and text.endswith("="))
    if not looks_inline:
        path = Path(text).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandConfigError(f"central_public_key: cannot read {path}: {exc}") from exc
    try:
        return PinnedKey(text)
    except BadKeyError as exc:
        raise CommandConfigError(f"central_public_key: {exc}") from exc


class _Stats(Protocol):
    async def stats(self) -> Any: ...


def diagnostics_from(status: Callable[[], Mapping[str, Any]],
                     outbox: _Stats) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A `request_diagnostics` provider: the agent's status snapshot, outbox figures, versions."""

    async def collect() -> dict[str, Any]:
        info: dict[str, Any] = {"agent": dict(status()), "versions": _versions()}
        try:
            st = await outbox.stats()
            info["outbox"] = {"stream": st.stream, "backlog": st.backlog,
                              "oldest_undelivered_ts_ms": st.oldest_undelivered_ts_ms,
                              "last_seq": st.last_seq, "db_bytes": st.db_bytes}
        except OutboxError as exc:
            info["outbox"] = {"error": str(exc)}
        return info

    return collect


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("pymodbus", "aiomqtt", "cryptography"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def pinned_key(config: AgentConfig) -> PinnedKey | None:
    """Central's pinned command key (`[commands] central_public_key`), None (logged) when it
    is missing or unusable: what verifies commands and the warnings that come by radio."""
    base = config.source.parent if config.source is not None else None
    try:
        key = load_public_key(config.commands.central_public_key, base)
    except CommandConfigError as exc:
        log.error("commands_key_invalid", error=str(exc))
        key = None
    if key is None:
        log.warning("commands_unverifiable", hint="set [commands] central_public_key")
    return key


def build_executor(config: AgentConfig, outbox: Any, targets: Mapping[str, CommandTarget],
                   status: Callable[[], Mapping[str, Any]],
                   warnings: WarningPlayer | None = None,
                   handlers: Mapping[str, KindHandler] | None = None) -> CommandExecutor:
    """The executor for a running agent; without a usable pinned key it rejects everything."""
    key = pinned_key(config)
    return CommandExecutor(gw=config.gateway.id, ledger_path=config.commands_path, outbox=outbox,
                           public_key=key, targets=targets,
                           diagnostics=diagnostics_from(status, outbox),
                           # a suspect wall clock (§4.7) obeys future-issued commands, flagged
                           clock_trusted=lambda: not outbox.clock.suspect,
                           warnings=warnings, handlers=handlers)
