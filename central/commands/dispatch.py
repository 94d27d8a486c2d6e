"""Central's side of commands (DESIGN.md §6): issue, sign, dispatch, and follow their state.

`CommandService.issue()` checks a command (gateway known, kind and args valid, lifetime within
`MAX_TTL_MS`; a point write also against the device profile: point, writable, value in range,
`central.commands.check`) and stores it `pending`, naming the user who issued it. A write to a
safety-critical point waits, unsigned, until a second operator approves it (`approve`). Issuing,
approving, every signing and every result the gateway reports go to the audit log. The
dispatcher (`run()`, task `commands.dispatch`) publishes due commands on
`fieldlink/v1/{gw}/down/cmd` (QoS 1), each signed with central's Ed25519 key at publish time (so
`sync_time` carries central's clock at that moment). A command is due while it is `pending` or
`sent` and unexpired, and goes out:

- as soon as its gateway is online (state online and heard within `offline_after_s`);
- again on every birth of the gateway (a reconnect: what was in flight may be lost);
- again after central restarts, and every `resend_s` while the gateway stays silent about it,

until the gateway reports `received`. Past `expires_at` central marks it `expired` itself.
Just before it goes (`_still_due`) the dispatcher looks once more that it is still open and its
gateway not retired: a retire cancels what it listed a moment ago.

A `play_warning` for a gateway that is not on IP (its state offline, or online only on a radio
bearer by a narrowband heartbeat) goes instead to the narrowband downlink when central has a
radio that reaches the gateway (`radio`, a `central.narrowband.downlink.RadioRoute`): signed
with the same key as a radio warning (`protocols.narrowband_down`), once per cmd_id, audited
as `command.signed` with `via: radio`. It still goes over IP when the gateway returns, until
the gateway reports it (the gateway refuses a second copy by its cmd_id).

The dispatcher has its own MQTT connection (client id `{mqtt_client_id}-cmd`), used only to
publish; the ingest worker tells it about births (`gateway_up`) and hands it every committed
batch (`apply_batch`), whose CMD_RESULT records move the commands' states
(`CommandStore.apply_reports`, idempotent, forward only).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiomqtt
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from central import CentralError
from central.commands.check import WritePolicy, check_site_config
from central.commands.keys import signing_key
from central.commands.store import (
    APPROVAL_REQUIRED,
    ORIGIN_CENTRAL,
    SOURCE_CENTRAL,
    CommandStore,
    CommandStoreError,
    Report,
    StoredCommand,
)
from central.config.settings import Settings
from central.identity.audit import SYSTEM, AuditLog
from central.ingest import broker
from central.narrowband.downlink import RADIO_BEARERS, RadioRoute
from central.storage import Storage, UnknownDeviceError
from device_profiles.loader import ProfilePoint
from protocols import topics
from protocols.command_keys import public_key_b64, public_key_pem
from protocols.command_results import CommandState, parse_result_attrs
from protocols.commands import (
    Command,
    CommandError,
    CommandKind,
    MalformedCommandError,
    SyncTime,
    WritePoint,
    args_from_mapping,
    encode_body,
    make_command,
    sign_command,
)
from protocols.envelope import DataBatch, RecordKind
from protocols.errors import DetailedError
from protocols.narrowband import NarrowbandError
from protocols.narrowband_down import sign_warning
from protocols.remote_config import ApplyConfig
from runtime import clock, tasks
from runtime.counters import Counters
from runtime.mqtt import MqttSession, until_disconnected
from runtime.tasks import Backoff

log = structlog.get_logger(__name__)

RESEND_S = 60.0
TICK_S = 1.0
PUBLISH_TIMEOUT_S = 5.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0


class CommandRequestError(CentralError, DetailedError):
    """An issue request that central refuses (unknown point, bad args for the kind)."""

    template = "{field}: {reason}"
    field: str
    reason: str


@dataclass(slots=True)
class CommandCounters(Counters):
    issued: int = 0
    published: int = 0
    publish_failures: int = 0
    withheld: int = 0  # listed as due, then cancelled or its gateway retired before it went
    expired: int = 0
    reports: int = 0
    reports_applied: int = 0
    reports_malformed: int = 0
    audit_failures: int = 0


class CommandService:
    """Issues, dispatches and tracks commands; one per central process."""

    def __init__(self, settings: Settings, storage: Storage, store: CommandStore,
                 key: Ed25519PrivateKey, *, audit: AuditLog, policy: WritePolicy,
                 resend_s: float = RESEND_S, tick_s: float = TICK_S,
                 radio: RadioRoute | None = None) -> None:
        self.settings = settings
        self.storage = storage
        self.store = store
        self.key = key
        self.audit = audit
        self.policy = policy
        self.radio = radio
        self.resend_ms = int(resend_s * 1000)
        self.tick_s = tick_s
        self.counters = CommandCounters()
        self.connected = False
        self.session = MqttSession(
            broker.endpoint(settings, client_id=f"{settings.mqtt_client_id}-cmd",
                            clean_session=True),
            name="commands",
            backoff=Backoff(BACKOFF_FIRST_S, BACKOFF_MAX_S, healthy_after_s=0))
        self._wake = asyncio.Event()
        self._births: dict[str, int] = {}  # gw -> ms of its last birth seen by this process
        self._started_ms = clock.now_ms()

    @property
    def public_key_b64(self) -> str:
        return public_key_b64(self.key.public_key())

    @property
    def public_key_pem(self) -> str:
        return public_key_pem(self.key.public_key())

    # --- issuing ------------------------------------------------------------------------

    async def issue(self, gw: str, kind: str, args: Mapping[str, Any], ttl_s: float, *,
                    user: str = SYSTEM, now_ms: int | None = None,
                    cmd_id: str | None = None) -> StoredCommand:
        """Check and store a command for `gw` issued by `user`; the dispatcher signs and sends
        it when the gw is online (and, for a safety-critical write, once it is approved).

        `cmd_id` (default: a new uuid) lets a caller that records its intent first issue it
        idempotently: a second issue of the same id raises `DuplicateCommandError`.

        Raises `UnknownGatewayError`, `CommandRequestError`, `WriteRefusedError` or a
        `CommandError`; `ConfigRefusedError` for a site config central will not sign.
        """
        now = clock.now_ms() if now_ms is None else now_ms
        await self.storage.get_gateway(gw)
        wire_args = dict(args)
        if kind == CommandKind.SYNC_TIME:
            if wire_args:
                raise MalformedCommandError("args", "sync_time takes no args (central's clock "
                                                    "is added when it is sent)")
            typed = args_from_mapping(kind, {"central_ms": now})
        else:
            typed = args_from_mapping(kind, wire_args)
        approval = None
        if isinstance(typed, WritePoint):
            if (await self._check_point(gw, typed)).safety_critical:
                approval = APPROVAL_REQUIRED
        if isinstance(typed, ApplyConfig):
            check_site_config(gw, typed)
        cmd = make_command(cmd_id or uuid.uuid4().hex, gw=gw, args=typed, issued_at_ms=now,
                           ttl_ms=int(round(ttl_s * 1000)))
        encode_body(cmd)  # too large for the body limit (a big config): refused now, not later
        stored = StoredCommand(cmd_id=cmd.cmd_id, gw=gw, kind=str(cmd.kind), target=cmd.target,
                               args=wire_args, issued_at_ms=cmd.issued_at_ms,
                               expires_at_ms=cmd.expires_at_ms, state=CommandState.PENDING,
                               state_source=SOURCE_CENTRAL, origin=ORIGIN_CENTRAL,
                               created_ms=now, updated_ms=now, issued_by=user,
                               approval=approval)
        await self.store.insert(stored, now_ms=now)
        self.counters.issued += 1
        log.info("command_issued", cmd_id=cmd.cmd_id, gw=gw, kind=str(cmd.kind),
                 target=cmd.target, expires_at_ms=cmd.expires_at_ms, user=user,
                 approval=approval)
        await self.audit.append(user, "command.issued", f"command:{cmd.cmd_id}",
                                {"gw": gw, "kind": str(cmd.kind), "target": cmd.target,
                                 "args": wire_args, "approval": approval})
        self._wake.set()
        return await self.store.get(cmd.cmd_id)

    async def approve(self, cmd_id: str, user: str) -> StoredCommand:
        """A second operator approves a safety-critical write; it is signed and sent next.

        Raises `UnknownCommandError` or `ApprovalError`."""
        cmd = await self.store.approve(cmd_id, user)
        await self.audit.append(user, "command.approved", f"command:{cmd_id}",
                                {"gw": cmd.gw, "target": cmd.target, "issued_by": cmd.issued_by})
        log.info("command_approved", cmd_id=cmd_id, gw=cmd.gw, user=user)
        self._wake.set()
        return cmd

    async def _check_point(self, gw: str, wp: WritePoint) -> ProfilePoint:
        """The profile's point, if the device reported it and the profile lets it be written
        with this value; `CommandRequestError` / `WriteRefusedError` (422) otherwise."""
        try:
            points = await self.storage.device_points(f"{gw}:{wp.device}")
        except UnknownDeviceError:
            raise CommandRequestError("args.device",
                                      f"gateway {gw} has no device {wp.device!r}") from None
        found = [p for p in points if p.point == wp.point]
        if not found:
            raise CommandRequestError("args.point", f"device {wp.device} has no point {wp.point!r}")
        return self.policy.check(found[0].profile, wp)

    # --- hooks called by ingest -----------------------------------------------------------

    def gateway_up(self, gw: str) -> None:
        """A birth: the gateway has (re)connected and subscribed; send what it may have missed."""
        self._births[gw] = clock.now_ms()
        self._wake.set()

    async def apply_batch(self, batch: DataBatch) -> None:
        """Move command states from the batch's CMD_RESULT records (after its commit).

        Raises `CommandStoreError`; the caller then withholds the ack, so the gateway sends the
        batch again and the reports are applied then.
        """
        reports = []
        for r in batch.non_telemetry():
            if r.kind is not RecordKind.CMD_RESULT:
                continue
            self.counters.reports += 1
            try:
                result = parse_result_attrs(r.attrs or {})
            except CommandError as exc:
                self.counters.reports_malformed += 1
                log.warning("command_report_malformed", gw=batch.gw, seq=r.seq, error=str(exc))
                continue
            reports.append(Report(seq=r.seq, ts_ms=r.ts_ms, result=result,
                                  attrs=dict(r.attrs or {})))
        if reports:
            moved = await self.store.apply_reports_detailed(batch.gw, batch.stream, reports)
            self.counters.reports_applied += len(moved)
            for m in moved:
                await self._audit_quietly(f"gateway:{batch.gw}", "command.result",
                                          f"command:{m.cmd_id}",
                                          {"gw": batch.gw, "state": m.state, "reason": m.reason})

    async def _audit_quietly(self, actor: str, action: str, target: str,
                             detail: Mapping[str, Any]) -> bool:
        """Audit from a background path: a failure is logged and counted, not raised."""
        try:
            await self.audit.append(actor, action, target, detail)
            return True
        except CentralError as exc:
            self.counters.audit_failures += 1
            log.error("audit_append_failed", action=action, target=target, error=str(exc))
            return False

    # --- the dispatcher -------------------------------------------------------------------

    async def run(self) -> None:
        """Publish due commands and expire stale ones, for ever (reconnecting to the broker)."""
        await self.session.run(self._serve, on_down=self._down)

    async def _serve(self, client: aiomqtt.Client) -> None:
        self.connected = True
        try:
            async with asyncio.TaskGroup() as tg:
                # Publishes alone would notice a lost link only at the next due command.
                tg.create_task(until_disconnected(client), name="commands.link")
                tg.create_task(self._dispatch_loop(client), name="commands.publish")
        finally:
            self.connected = False

    async def _dispatch_loop(self, client: aiomqtt.Client) -> None:
        while True:
            await self._tick(client)
            await self._sleep()

    async def _down(self, exc: aiomqtt.MqttError, first: bool) -> None:
        # Still expire while the broker is away: that needs only the database.
        await self._expire()

    async def _sleep(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.tick_s):
                await self._wake.wait()
        self._wake.clear()

    async def _expire(self) -> None:
        try:
            for cmd in await self.store.expire_due():
                self.counters.expired += 1
                log.info("command_expired", cmd_id=cmd.cmd_id, gw=cmd.gw, state=str(cmd.state))
        except CommandStoreError as exc:
            log.warning("command_expire_failed", error=str(exc))

    async def _tick(self, client: aiomqtt.Client) -> None:
        await self._expire()
        now = clock.now_ms()
        try:
            due = await self.store.due(now_ms=now)
        except CommandStoreError as exc:
            log.warning("command_due_failed", error=str(exc))
            return
        online: dict[str, bool] = {}
        for cmd in due:
            if cmd.gw not in online:
                online[cmd.gw] = await self._online(cmd.gw, now)
            if online[cmd.gw] and self._should_send(cmd, now):
                await self._publish(client, cmd, now)
            elif not online[cmd.gw] and cmd.kind == CommandKind.PLAY_WARNING:
                await self._by_radio(cmd, now)

    def _should_send(self, cmd: StoredCommand, now: int) -> bool:
        last = cmd.last_sent_ms
        if last is None or last < self._started_ms:
            return True  # never sent, or sent by an earlier run of central
        birth = self._births.get(cmd.gw)
        if birth is not None and last < birth:
            return True  # the gateway reconnected since
        return now - last >= self.resend_ms

    async def _online(self, gw: str, now: int) -> bool:
        try:
            g = await self.storage.get_gateway(gw)
        except Exception as exc:  # unknown gateway or a storage error: try again next tick
            log.debug("command_gateway_unknown", gw=gw, error=str(exc))
            return False
        heard = g.last_seen_ms if g.last_seen_ms is not None else g.state_ts_ms
        return (g.online and heard is not None and g.bearer not in RADIO_BEARERS
                and now - heard <= self.settings.offline_after_s * 1000)

    def signed_payload(self, cmd: StoredCommand, now_ms: int) -> bytes:
        """The `down/cmd` payload for a stored command, signed now."""
        return sign_command(self.key, self._wire(cmd, now_ms))

    def _wire(self, cmd: StoredCommand, now_ms: int) -> Command:
        args = dict(cmd.args)
        typed = (SyncTime(central_ms=now_ms) if cmd.kind == CommandKind.SYNC_TIME
                 else args_from_mapping(cmd.kind, args))
        if cmd.issued_at_ms is None or cmd.expires_at_ms is None:
            raise MalformedCommandError("expires_at", "not a command central issued")
        return Command(cmd_id=cmd.cmd_id, issued_at_ms=cmd.issued_at_ms,
                       expires_at_ms=cmd.expires_at_ms, gw=cmd.gw, args=typed)

    async def _by_radio(self, cmd: StoredCommand, now: int) -> None:
        """Queue a warning on the narrowband downlink, once per cmd_id, if a radio reaches
        the gateway."""
        radio = self.radio
        if radio is None or not radio.reaches(cmd.gw) or radio.holds(cmd.cmd_id):
            return
        try:
            signed = sign_warning(self.key, self._wire(cmd, now), limit=radio.limit,
                                  max_segments=radio.max_segments)
        except (CommandError, NarrowbandError, ValueError) as exc:
            log.error("command_unsignable", cmd_id=cmd.cmd_id, error=str(exc), via="radio")
            return
        if not await self._still_due(cmd) or not radio.offer(cmd.cmd_id, cmd.gw, signed):
            return  # queued already
        await self._audit_quietly(SYSTEM, "command.signed", f"command:{cmd.cmd_id}",
                                  {"gw": cmd.gw, "target": cmd.target, "via": "radio",
                                   "bearer": radio.bearer, "signed_ms": now})

    async def _still_due(self, cmd: StoredCommand) -> bool:
        """The last look before a command leaves: not cancelled, nor its gateway retired,
        since `due` listed it (Mosquitto checks a revoked certificate only at connect)."""
        try:
            if await self.store.still_due(cmd.cmd_id):
                return True
            self.counters.withheld += 1
            log.info("command_withheld", cmd_id=cmd.cmd_id, gw=cmd.gw)
        except CommandStoreError as exc:
            log.warning("command_due_failed", cmd_id=cmd.cmd_id, error=str(exc))
        return False

    async def _publish(self, client: aiomqtt.Client, cmd: StoredCommand, now: int) -> None:
        try:
            payload = self.signed_payload(cmd, now)
        except CommandError as exc:
            log.error("command_unsignable", cmd_id=cmd.cmd_id, error=str(exc))
            return
        # No signature leaves central unaudited: if the log cannot take the row, wait.
        if not await self._audit_quietly(SYSTEM, "command.signed", f"command:{cmd.cmd_id}",
                                         {"gw": cmd.gw, "target": cmd.target,
                                          "attempt": cmd.sent_count + 1, "signed_ms": now}):
            return
        if not await self._still_due(cmd):
            return
        # A short timeout: aiomqtt does not wake a pending publish when the link drops.
        await client.publish(topics.down(cmd.gw, "cmd"), payload, qos=1,
                             timeout=PUBLISH_TIMEOUT_S)
        self.counters.published += 1
        log.info("command_published", cmd_id=cmd.cmd_id, gw=cmd.gw, kind=cmd.kind,
                 attempt=cmd.sent_count + 1)
        try:
            await self.store.mark_sent(cmd.cmd_id, now_ms=now)
        except CommandStoreError as exc:
            self.counters.publish_failures += 1
            log.warning("command_mark_sent_failed", cmd_id=cmd.cmd_id, error=str(exc))


# --- wiring into the app ---------------------------------------------------------------------


@dataclass(slots=True)
class CommandsRuntime:
    service: CommandService
    store: CommandStore
    task: asyncio.Task[None] | None

    async def stop(self) -> None:
        await tasks.stop(self.task)
        await self.store.close()


async def start_commands(settings: Settings, storage: Storage, *, audit: AuditLog,
                         dispatch: bool = True, radio: RadioRoute | None = None
                         ) -> CommandsRuntime:
    """Load (or make) the signing key, open the command tables, start the dispatcher task."""
    key, path = await signing_key(settings)  # refuses a lost or a different key
    policy = await asyncio.to_thread(WritePolicy.from_dirs, settings.profile_dirs)
    store = CommandStore(settings.db_url)
    await store.open()
    service = CommandService(settings, storage, store, key, audit=audit, policy=policy,
                             radio=radio)
    log.info("commands_ready", key_path=str(path) if path else None,
             public_key=service.public_key_b64)
    task = (tasks.start("commands.dispatch", service.run) if dispatch
            else None)
    return CommandsRuntime(service=service, store=store, task=task)


