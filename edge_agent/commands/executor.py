"""The gateway's command executor: verify, refuse or run each signed command once (DESIGN.md §6).

`handle(payload)` is the uplink's `on_command` hook: it only queues the bytes, so a slow Modbus
write never holds up the receive loop that carries central's acks. `run()` (task `commands`)
opens the ledger, settles what a crash left behind, then takes commands one at a time:

1. the envelope and the Ed25519 signature over the body bytes, with central's pinned key;
   a bad signature is reported `rejected`/`bad_signature` with `verified: false` (the cmd_id is
   only what the bytes claim), rate-limited so a flood cannot fill the outbox;
2. the body (canonical CBOR), that it names this gateway, that it has not expired
   (`expired` is reported) and that its cmd_id is new: `CommandLedger.claim` inserts it, and a
   second claim is a replay, reported `rejected`/`replay` once per cmd_id and run;
3. `received`, then kind-specific checks (device, point, `writable`, the value's encoding)
   that end in `rejected`, then `executing` is committed BEFORE acting, then the outcome.

Every state goes to the outbox as a `CMD_RESULT` record (lane `event`, attrs
`result_attrs`). After a crash, commands still `received`/`executing` are reported
`failed`/`interrupted`, never re-run; reports that did not reach the outbox go again.

`play_warning` plays the warning on the named terminals (`edge_agent.commands.warnings`).
`write_point` goes through `edge_agent.field.point_io.write_point` (the same path as the
technician's `edge-agent write`): encode with the point's `PointSpec`, write, read back,
compare. `set_poll_interval` changes a poller's interval until the agent restarts.
`request_diagnostics` puts health, backlog and versions in the result. `sync_time` measures
the offset to central's clock; it never sets it. Kinds in `handlers` (`outcomes.KindHandler`)
run in their own modules. Built by `commands.setup.build_executor`.
"""

from __future__ import annotations

import asyncio
import platform
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from device_profiles import Profile
from edge_agent.commands import outcomes
from edge_agent.commands.counters import CommandCounters
from edge_agent.commands.ledger import CommandLedger, CommandLedgerError
from edge_agent.commands.outcomes import Action, CommandDeferred, KindHandler
from edge_agent.commands.warnings import WarningPlayer, play_for_command
from edge_agent.config.site import DeviceConfig
from edge_agent.field import point_io
from edge_agent.field.point_io import readback_matches
from edge_agent.field.transports import ModbusTransport
from edge_agent.outbox.store import NewRecord, OutboxError
from protocols.callresp import PlayWarning
from protocols.command_keys import VerifyKey
from protocols.command_results import CommandResult, CommandState, Reason, result_attrs
from protocols.commands import (
    MAX_TTL_MS,
    BadSignatureError,
    Command,
    CommandError,
    RequestDiagnostics,
    SetPollInterval,
    SyncTime,
    UnknownCommandKindError,
    WritePoint,
    decode_envelope,
    peek_cmd_id,
    verify_command,
)
from protocols.envelope import RecordKind
from protocols.modbus_points import PointSpec, PointValue

log = structlog.get_logger(__name__)

# Executed cmd_ids are kept this long past their expiry (longer than any lifetime, §6).
RETENTION_MS = MAX_TTL_MS + 86_400_000
QUEUE_MAX = 64
UNVERIFIED_REPORTS_PER_MIN = 10
REPORT_RETRY_S = 30.0
PRUNE_EVERY_S = 3600.0
EXECUTE_TIMEOUT_S = 30.0
CLOCK_OFFSET_WARN_MS = 2000
# A command issued further ahead of the gateway's clock than this is refused while the clock is
# trusted (§8); with a suspect clock (a power cut reset it) it runs, flagged `clock_untrusted`.
FUTURE_SKEW_MS = 60_000
_Rejected, _Failed = outcomes.CommandRejected, outcomes.CommandFailed


class CommandTarget(Protocol):
    """What the executor needs of a device: `DevicePoller` provides it."""

    device: DeviceConfig
    profile: Profile
    transport: ModbusTransport

    @property
    def interval_s(self) -> float: ...

    def set_interval(self, seconds: float) -> None: ...


class ResultWriter(Protocol):
    async def append(self, records: list[NewRecord]) -> list[int]: ...


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class CommandExecutor:
    """Runs central's signed commands on this gateway at most once; see the module doc."""

    def __init__(self, *, gw: str, ledger_path: Path, outbox: ResultWriter,
                 public_key: VerifyKey | None, targets: Mapping[str, CommandTarget],
                 diagnostics: Callable[[], Awaitable[Mapping[str, Any]]] | None = None,
                 wall_ms: Callable[[], int] = _wall_ms, queue_max: int = QUEUE_MAX,
                 clock_trusted: Callable[[], bool] = lambda: True,
                 future_skew_ms: int = FUTURE_SKEW_MS,
                 warnings: WarningPlayer | None = None,
                 handlers: Mapping[str, KindHandler] | None = None) -> None:
        self.gw = gw
        self.ledger_path = Path(ledger_path)
        self.outbox = outbox
        self.public_key = public_key
        self.targets = dict(targets)
        self.diagnostics = diagnostics
        self.warnings = warnings  # the 叫应 terminals, if the gateway has any
        self.handlers = dict(handlers or {})  # by kind: kinds handled in their own module
        self.counters = CommandCounters()
        self._wall_ms = wall_ms
        self._clock_trusted = clock_trusted
        self.future_skew_ms = future_skew_ms
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=queue_max)
        self._ledger: CommandLedger | None = None
        self._replays_reported: set[str] = set()
        self._unverified_times: list[float] = []
        self.idle = asyncio.Event()  # set while nothing is queued or running (tests wait on it)
        self.idle.set()

    # --- the uplink's hook ---------------------------------------------------------------

    def handle(self, payload: bytes) -> None:
        """Queue one `down/cmd` payload; never blocks, never raises."""
        self.counters.received += 1
        try:
            self._queue.put_nowait(bytes(payload))
            self.idle.clear()
        except asyncio.QueueFull:
            # Not acted on and not claimed: central sends it again until it hears `received`.
            self.counters.dropped += 1
            log.warning("command_dropped", reason="queue full", size=len(payload))

    # --- the task ------------------------------------------------------------------------

    async def run(self) -> None:
        """Open the ledger, settle a crashed run, then execute queued commands until cancelled."""
        async with CommandLedger.open(self.ledger_path) as ledger:
            self._ledger = ledger
            try:
                await self.recover()
                await ledger.prune(self._wall_ms())
                last_prune = last_retry = time.monotonic()
                while True:
                    try:
                        async with asyncio.timeout(REPORT_RETRY_S):
                            payload = await self._queue.get()
                    except TimeoutError:
                        payload = None
                    if payload is not None:
                        try:
                            await self.process(payload)
                        finally:
                            if self._queue.empty():
                                self.idle.set()
                    now = time.monotonic()
                    if now - last_retry >= REPORT_RETRY_S:
                        last_retry = now
                        await self._report_unreported()
                    if now - last_prune >= PRUNE_EVERY_S:
                        last_prune = now
                        await ledger.prune(self._wall_ms())
            finally:
                self._ledger = None

    async def recover(self) -> None:
        """After a crash: unfinished commands become `failed`/`interrupted`; lost reports go
        again."""
        ledger = self._need_ledger()
        for entry in await ledger.unfinished():
            if (h := self.handlers.get(entry.kind)) is not None and h.resumes(entry.cmd_id):
                continue  # its handler reports the outcome (outcomes.CommandDeferred)
            log.warning("command_interrupted", cmd_id=entry.cmd_id, kind=entry.kind,
                        state=str(entry.state))
            result = CommandResult(cmd_id=entry.cmd_id, state=CommandState.FAILED,
                                   reason=Reason.INTERRUPTED, kind=entry.kind,
                                   detail=f"agent stopped while {entry.state}; not re-run")
            await ledger.set_state(entry.cmd_id, CommandState.FAILED, result_attrs(result),
                                   self._wall_ms())
            self.counters.failed += 1
        await self._report_unreported()

    async def _report_unreported(self) -> None:
        ledger = self._need_ledger()
        try:
            entries = await ledger.unreported()
        except CommandLedgerError as exc:
            log.warning("command_ledger_read_failed", error=str(exc))
            return
        for entry in entries:
            if entry.result is None:
                continue  # claimed, `received` not yet appended: its handler is still running
            if await self._append(entry.target if entry.kind == "write_point" else None,
                                  entry.state, dict(entry.result)):
                await ledger.mark_reported(entry.cmd_id, entry.state)

    # --- one command ---------------------------------------------------------------------

    async def process(self, payload: bytes) -> None:
        """Check and run one payload; every outcome is reported, none raises."""
        try:
            await self._process(payload)
        except (CommandLedgerError, OutboxError) as exc:
            # Nothing was run without its `executing` state on disk; central sends it again.
            log.error("command_storage_failed", error=str(exc))

    async def _process(self, payload: bytes) -> None:
        now = self._wall_ms()
        try:
            signed = decode_envelope(payload)
        except CommandError as exc:
            self.counters.malformed += 1
            log.warning("command_malformed", error=str(exc), size=len(payload))
            return
        if self.public_key is None:
            await self._report_unverified(peek_cmd_id(signed.body), Reason.NO_PUBLIC_KEY,
                                          "no central public key is pinned")
            return
        try:
            cmd = verify_command(self.public_key, signed)
        except BadSignatureError as exc:
            self.counters.bad_signature += 1
            log.warning("command_bad_signature", cmd_id=exc.cmd_id)
            await self._report_unverified(exc.cmd_id, Reason.BAD_SIGNATURE, str(exc))
            return
        except CommandError as exc:
            # Signed by central, yet not a command this agent understands (a newer central?).
            cmd_id = peek_cmd_id(signed.body)
            reason = (Reason.UNSUPPORTED_KIND if isinstance(exc, UnknownCommandKindError)
                      else Reason.MALFORMED)
            self.counters.rejected += 1
            log.warning("command_rejected", cmd_id=cmd_id, reason=str(reason), error=str(exc))
            if cmd_id is not None:
                await self._report(CommandResult(cmd_id, CommandState.REJECTED, reason,
                                                 detail=str(exc)), None)
            return
        lg = log.bind(cmd_id=cmd.cmd_id, kind=str(cmd.kind))
        if cmd.gw != self.gw:
            self.counters.rejected += 1
            lg.warning("command_rejected", reason="wrong_gateway", addressed_to=cmd.gw)
            await self._report(self._result(cmd, CommandState.REJECTED, Reason.WRONG_GATEWAY,
                                             f"addressed to {cmd.gw}"), None)
            return
        if cmd.expired(now):
            self.counters.expired += 1
            lg.warning("command_expired", expires_at_ms=cmd.expires_at_ms, now_ms=now)
            await self._report(self._result(cmd, CommandState.EXPIRED, Reason.EXPIRED,
                                            f"expired {now - cmd.expires_at_ms} ms ago",
                                            edge_ms=now), self._point(cmd))
            return
        ledger = self._need_ledger()
        claimed = await ledger.claim(cmd_id=cmd.cmd_id, kind=str(cmd.kind), target=cmd.target,
                                     expires_at_ms=cmd.expires_at_ms,
                                     keep_until_ms=max(now, cmd.expires_at_ms) + RETENTION_MS,
                                     now_ms=now)
        if not claimed:
            await self._replay(cmd)
            return
        flags: dict[str, Any] = {}
        ahead = cmd.issued_at_ms - now
        if ahead > self.future_skew_ms:
            if self._clock_trusted():
                # Claimed above, so this cmd_id can never run later either.
                self.counters.rejected += 1
                self.counters.future_refused += 1
                lg.warning("command_rejected", reason="issued_in_future", ahead_ms=ahead)
                await self._step(cmd, self._result(
                    cmd, CommandState.REJECTED, Reason.ISSUED_IN_FUTURE,
                    f"issued {ahead} ms ahead of this gateway's trusted clock", edge_ms=now))
                return
            self.counters.future_flagged += 1
            flags = {"clock_untrusted": True, "issued_ahead_ms": ahead}
            lg.warning("command_clock_untrusted", ahead_ms=ahead,
                       hint="the gateway's clock is suspect: obeyed, flagged")
        lg.info("command_received", target=cmd.target, expires_at_ms=cmd.expires_at_ms)
        await self._step(cmd, self._result(cmd, CommandState.RECEIVED, **flags))
        try:
            action = self._prepare(cmd)
        except _Rejected as rej:
            self.counters.rejected += 1
            lg.warning("command_rejected", reason=str(rej.reason), detail=rej.detail)
            await self._step(cmd, self._result(cmd, CommandState.REJECTED, rej.reason, rej.detail,
                                               **rej.data))
            return
        # On disk before acting: a crash from here on is reported `interrupted`, never re-run.
        await self._step(cmd, self._result(cmd, CommandState.EXECUTING))
        await self._execute(cmd, action, lg)

    async def _execute(self, cmd: Command, action: Action, lg: Any) -> None:
        self.counters.executed += 1
        try:
            async with asyncio.timeout(EXECUTE_TIMEOUT_S):
                data = await action()
            final = self._result(cmd, CommandState.SUCCEEDED, **data)
            self.counters.succeeded += 1
            lg.info("command_succeeded", **{k: v for k, v in data.items() if k != "diagnostics"})
        except _Failed as exc:
            final = self._result(cmd, CommandState.FAILED, exc.reason, exc.detail, **exc.data)
            self.counters.failed += 1
            lg.warning("command_failed", reason=str(exc.reason), detail=exc.detail)
        except CommandDeferred as exc:
            lg.info("command_deferred", detail=str(exc))
            return
        except TimeoutError:
            final = self._result(cmd, CommandState.FAILED, Reason.TRANSPORT_ERROR,
                                 f"no outcome within {EXECUTE_TIMEOUT_S} s")
            self.counters.failed += 1
            lg.warning("command_failed", reason="timeout")
        except Exception as exc:  # report it rather than leave the command `executing`
            final = self._result(cmd, CommandState.FAILED, Reason.INTERNAL_ERROR,
                                 f"{type(exc).__name__}: {exc}")
            self.counters.failed += 1
            lg.exception("command_crashed")
        await self._step(cmd, final)

    async def _replay(self, cmd: Command) -> None:
        self.counters.replays += 1
        entry = await self._need_ledger().get(cmd.cmd_id)
        state = str(entry.state) if entry else "unknown"
        log.warning("command_replay", cmd_id=cmd.cmd_id, state=state)
        # Redeliveries and replays look alike; one report per cmd_id per run is enough.
        if cmd.cmd_id in self._replays_reported:
            return
        self._replays_reported.add(cmd.cmd_id)
        await self._report(self._result(cmd, CommandState.REJECTED, Reason.REPLAY,
                                        f"cmd_id already {state} here", edge_state=state),
                           self._point(cmd))

    # --- reporting -----------------------------------------------------------------------

    @staticmethod
    def _result(cmd: Command, state: CommandState, reason: Reason | None = None,
                detail: str | None = None, **data: Any) -> CommandResult:
        return CommandResult(cmd_id=cmd.cmd_id, state=state, reason=reason, detail=detail,
                             kind=str(cmd.kind), data=data)

    @staticmethod
    def _point(cmd: Command) -> str | None:
        return cmd.target if isinstance(cmd.args, WritePoint) else None

    async def _step(self, cmd: Command, result: CommandResult) -> None:
        await self.settle(result, self._point(cmd))

    async def settle(self, result: CommandResult, point: str | None = None) -> None:
        """Save a claimed command's state, then report it (see command_ledger for the order);
        raises `CommandLedgerError` while the ledger is not open."""
        ledger = self._need_ledger()
        attrs = result_attrs(result)
        await ledger.set_state(result.cmd_id, result.state, attrs, self._wall_ms())
        if await self._append(point, result.state, attrs):
            await ledger.mark_reported(result.cmd_id, result.state)

    async def _report(self, result: CommandResult, point: str | None) -> None:
        """Report a command that is not in the ledger (refused before the claim)."""
        await self._append(point, result.state, result_attrs(result))

    async def _report_unverified(self, cmd_id: str | None, reason: Reason, detail: str) -> None:
        self.counters.rejected += 1
        now = time.monotonic()
        self._unverified_times = [t for t in self._unverified_times if now - t < 60.0]
        if cmd_id is None or len(self._unverified_times) >= UNVERIFIED_REPORTS_PER_MIN:
            self.counters.reports_suppressed += 1
            return
        self._unverified_times.append(now)
        await self._report(CommandResult(cmd_id=cmd_id, state=CommandState.REJECTED,
                                         reason=reason, detail=detail, verified=False), None)

    async def _append(self, point: str | None, state: CommandState,
                      attrs: Mapping[str, Any]) -> bool:
        record = NewRecord(kind=RecordKind.CMD_RESULT, ts_ms=self._wall_ms(), point=point,
                           value=str(state), attrs=dict(attrs))
        try:
            await self.outbox.append([record])
        except OutboxError as exc:
            log.warning("command_report_failed", cmd_id=attrs.get("cmd_id"), error=str(exc))
            return False
        return True

    def _need_ledger(self) -> CommandLedger:
        if self._ledger is None:
            raise CommandLedgerError(
                "command ledger is not open (the commands task is not running)")
        return self._ledger

    # --- the kinds -----------------------------------------------------------------------

    def _prepare(self, cmd: Command) -> Action:
        """Check the command against this gateway; return the action that carries it out."""
        args = cmd.args
        if (handler := self.handlers.get(str(cmd.kind))) is not None:
            return handler.prepare(cmd)
        if isinstance(args, WritePoint):
            target = self._target(args.device)
            try:
                point = point_io.writable_point(target.profile, args.device, args.point)
                point_io.check_value(point.spec, args.value)  # fits (checked again in the write)
            except point_io.UnknownPointError as exc:
                raise _Rejected(Reason.UNKNOWN_POINT, exc.message) from None
            except point_io.NotWritableError:
                raise _Rejected(Reason.NOT_WRITABLE, f"{args.target} is not writable") from None
            except point_io.BadValueError as exc:
                raise _Rejected(Reason.BAD_VALUE, exc.message) from exc
            return lambda: self._write_point(target, point.spec, args.value)
        if isinstance(args, SetPollInterval):
            target = self._target(args.device)
            return lambda: self._set_poll_interval(target, args.seconds)
        if isinstance(args, RequestDiagnostics):
            return self._diagnostics
        if isinstance(args, PlayWarning):
            if self.warnings is None:
                raise _Rejected(Reason.UNSUPPORTED_KIND, "no 叫应 terminals on this gateway")
            return lambda: self._play_warning(args, cmd.cmd_id)
        assert isinstance(args, SyncTime)
        return lambda: self._sync_time(args.central_ms)

    def _target(self, device: str) -> CommandTarget:
        target = self.targets.get(device)
        if target is None:
            raise _Rejected(Reason.UNKNOWN_DEVICE, f"no enabled device {device!r} on this gateway")
        return target

    async def _write_point(self, target: CommandTarget, spec: PointSpec,
                           value: PointValue) -> dict[str, Any]:
        try:
            outcome = await point_io.write_point(target.transport, target.device.device_id,
                                                 spec, value)
        except point_io.PointTransportError as exc:
            raise _Failed(Reason.TRANSPORT_ERROR, exc.message) from exc
        except point_io.ReadbackMismatchError as exc:
            data = {} if exc.readback is None else {"readback": exc.readback}
            raise _Failed(Reason.READBACK_MISMATCH, exc.message, data) from exc
        except point_io.PointIoError as exc:
            raise _Failed(Reason.BAD_VALUE, exc.message) from exc
        return {"readback": outcome.readback}

    async def _set_poll_interval(self, target: CommandTarget, seconds: float) -> dict[str, Any]:
        previous = target.interval_s
        try:
            target.set_interval(float(seconds))
        except ValueError as exc:
            raise _Failed(Reason.BAD_VALUE, str(exc)) from exc
        return {"seconds": float(seconds), "previous_s": previous, "persistent": False}

    async def _play_warning(self, args: PlayWarning, cmd_id: str) -> dict[str, Any]:
        assert self.warnings is not None
        data, played = await play_for_command(self.warnings, args, cmd_id)
        if not played:
            raise _Failed(Reason.TRANSPORT_ERROR, "no terminal took the warning", data)
        return data

    async def _diagnostics(self) -> dict[str, Any]:
        info: dict[str, Any] = {"commands": self.counters.to_dict(),
                                "platform": platform.platform(terse=True)}
        if self.diagnostics is not None:
            info.update(await self.diagnostics())
        return {"diagnostics": info}

    async def _sync_time(self, central_ms: int) -> dict[str, Any]:
        edge_ms = self._wall_ms()
        # Includes the time the command spent on the way, so it bounds the true offset.
        offset = edge_ms - central_ms
        level = log.warning if abs(offset) > CLOCK_OFFSET_WARN_MS else log.info
        level("clock_offset_measured", offset_ms=offset, central_ms=central_ms, edge_ms=edge_ms)
        return {"offset_ms": offset, "edge_ms": edge_ms, "central_ms": central_ms,
                "clock_set": False}

    # --- for tests and status ------------------------------------------------------------

    async def wait_idle(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self.idle.wait()


__all__ = ["CommandCounters", "CommandExecutor", "CommandTarget", "ResultWriter",
           "readback_matches"]
