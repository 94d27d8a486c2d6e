"""The one supervisor of the edge agent: owns the TaskGroup, names every task, restarts the
ones that crash and stops everything cleanly on SIGTERM/SIGINT.

    outbox (context manager) ─┬─ outbox.maintain  Outbox.maintenance_loop(): prune, budget, clock
                              ├─ uplink.mqtt      Uplink.run(): MQTT session, reconnecting
                              ├─ config.trial     ConfigTrial.run(): a remote config's health
                              │                   check and rollback (edge_agent/config/trial.py)
                              ├─ poll[<device>]   DevicePoller.run(), one per enabled Modbus device
                              ├─ hj212[<device>]  Hj212Station.run(), one per enabled HJ 212 station
                              ├─ rules.tick       AlarmRules.tick_loop(): stale and offline alarms
                              ├─ narrowband.<bearer> NarrowbandFallback.run(), with [narrowband]:
                              │                   `beidou` (BeidouTerminal) or `pdt` (PdtRadio)
                              ├─ terminal[<id>]   TerminalLink.run(), one per [[terminals]] entry
                              ├─ terminals.report TerminalService.report_loop(); terminals.local:
                              │                   LocalWarningRule.run(), with [local_warning]
                              ├─ status.writer    health snapshot into the outbox meta
                              ├─ control.socket   ControlServer.serve(): the technician's socket
                              └─ systemd.watchdog WATCHDOG=1 while the event loop is alive

Every task runs under the runtime's supervisor (`runtime.tasks.supervise`, through
`_supervised`), the only place that catches `Exception`: it logs `task_crashed` with the
traceback (or `task_exited`) and restarts the task after a jittered back-off that doubles from
`RESTART_MIN_S` up to `RESTART_MAX_S` (reset after a task has run for `STABLE_AFTER_S`),
counting restarts in `AgentRuntime.restarts`. systemd gets READY=1 once every task is
started (`Type=notify`).

The optional parts (HJ 212 stations, the narrowband radios, the 叫应 terminals, the metrics
endpoint) are imported by the functions that build them, only when the config has them: the
daemon lives for months and keeps whatever it imported resident, on a box with little memory
(tests/test_edge_daemon_entry.py checks what a plain Modbus gateway loads).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from device_profiles import Profile
from edge_agent import __version__
from edge_agent.alarms.rules import RuleEngine
from edge_agent.alarms.store import AlarmStore
from edge_agent.alarms.wiring import AlarmRules, build_rules
from edge_agent.commands.apply_config import ApplyConfigHandler
from edge_agent.commands.setup import build_executor, pinned_key
from edge_agent.config.remote import ConfigHistory
from edge_agent.config.site import (
    AgentConfig,
    ConfigError,
    Hj212TransportConfig,
    NarrowbandConfig,
    resolve_profiles,
)
from edge_agent.config.trial import ConfigTrial, HealthView, Reload
from edge_agent.control.server import ControlOps, ControlServer, device_health
from edge_agent.field.poller import DevicePoller, Health
from edge_agent.field.transports import TransportPool
from edge_agent.health.clock import ClockGuard
from edge_agent.outbox.disk import DiskWatch
from edge_agent.outbox.maintenance import MAINTENANCE_TASK
from edge_agent.outbox.store import Outbox, OutboxError, OutboxFullError
from edge_agent.uplink.birth import build_birth
from edge_agent.uplink.link import Uplink
from protocols.envelope import Birth
from runtime.systemd import SystemdNotifier, watchdog_loop  # sd_notify, shared with central
from runtime.tasks import Backoff, supervise

if TYPE_CHECKING:  # imported where the config uses them (see the module doc)
    from edge_agent.field.stations import Hj212Station
    from edge_agent.narrowband.downlink import RadioDownlink, WarningHandler
    from edge_agent.narrowband.fallback import Bearer, NarrowbandFallback
    from edge_agent.terminals.local_rule import LocalWarningRule
    from edge_agent.terminals.radio import RadioWarningPlayer
    from edge_agent.terminals.service import TerminalService

log = structlog.get_logger(__name__)

RESTART_MIN_S = 1.0
RESTART_MAX_S = 60.0
STABLE_AFTER_S = 60.0  # a task that ran this long before crashing restarts at the minimum delay
STATUS_META_KEY = "agent_status"
START_ROOM_BYTES = 1 << 20  # less free than this at start: spend the ballast to open the files


@dataclass(slots=True)
class AgentRuntime:
    """What the running agent exposes to its status writer (and later metrics/doctor)."""

    config: AgentConfig
    boot_id: str
    started_ms: int
    uplink: Uplink | None = None
    pollers: list[DevicePoller] = field(default_factory=list)
    stations: list[Hj212Station] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    pool: TransportPool | None = None
    outbox: Outbox | None = None
    alarms: AlarmRules | None = None
    narrowband: NarrowbandFallback | None = None
    disk: dict[str, Any] | None = None  # the outbox's last `disk_status()`, with unsaved alarms
    terminals: TerminalService | None = None  # 叫应 terminals ([[terminals]])
    local_warning: LocalWarningRule | None = None

    def health_view(self) -> HealthView:
        """Which devices answer now and whether the uplink is up (a config trial's check)."""
        answering = {d.device.id for d in self.devices
                     if d.health.state in (Health.OK, Health.DEGRADED)}
        if self.terminals is not None:  # 叫应 terminals: connected is answering
            answering |= {f"terminal:{tid}" for tid, link in self.terminals.links.items()
                          if link.connected}
        return HealthView(frozenset(answering), bool(self.uplink and self.uplink.connected))

    def count_restart(self, task: str) -> None:
        self.restarts[task] = self.restarts.get(task, 0) + 1

    @property
    def devices(self) -> list[DevicePoller | Hj212Station]:
        """Every running device, pollers first, in config order within each."""
        return [*self.pollers, *self.stations]

    def status(self) -> dict[str, Any]:
        """The snapshot for `edge-agent status`; `disk` as of the last `refresh_disk()`."""
        return {
            "pid": os.getpid(), "boot_id": self.boot_id, "version": __version__,
            "gateway": self.config.gateway.id, "started_ms": self.started_ms,
            "updated_ms": time.time_ns() // 1_000_000,
            "uplink": {"connected": bool(self.uplink and self.uplink.connected),
                       "refused": None if self.uplink is None or self.uplink.refused is None
                       else self.uplink.refused.to_jsonable(),
                       **({k: getattr(self.uplink.counters, k) for k in (
                           "acks", "acks_refused", "ack_records_unsent",
                           "ack_records_duplicate")} if self.uplink else {})},
            "devices": [device_health(d) for d in self.devices],
            "restarts": dict(self.restarts),
            "narrowband": self.narrowband.status() if self.narrowband else None,
            "terminals": self.terminals.status() if self.terminals else None,
            "disk": self.disk,
        }

    async def refresh_disk(self) -> dict[str, Any] | None:
        """Ask the outbox how its disk is (a full-disk episode, held records, free space)."""
        if self.outbox is None:
            return None
        try:
            disk = await self.outbox.disk_status()
        except OutboxError as exc:
            disk = {"error": str(exc)}
        disk["alarm_states_unsaved"] = self.alarms.unsaved if self.alarms else 0
        self.disk = disk
        return disk


def build_bearer(nb: NarrowbandConfig, downlink: RadioDownlink | None = None) -> Bearer:
    """The driver of the `[narrowband]` radio: a BeiDou terminal or a PDT radio; what it
    receives goes to `downlink` (warnings from central)."""
    if nb.bearer == "tiantong":  # alarms and acks up only: no warnings by SMS yet
        from edge_agent.bearers.tiantong import TiantongModem

        return TiantongModem(nb.port, baudrate=nb.baudrate, number=nb.number,
                             sms_parts=nb.sms_parts, interval_s=nb.interval_s)
    if nb.bearer == "pdt":
        from edge_agent.bearers.pdt import PdtRadio

        return PdtRadio(nb.port, baudrate=nb.baudrate, radio_id=nb.radio_id,
                        max_text_bytes=nb.max_text_bytes, interval_s=nb.interval_s,
                        on_message=downlink.on_pdt if downlink else None)
    from edge_agent.bearers.beidou import BeidouTerminal

    return BeidouTerminal(nb.port, baudrate=nb.baudrate, dialect=nb.dialect,
                          max_payload_bytes=nb.max_payload_bytes,
                          on_message=downlink.on_beidou if downlink else None)


async def run_agent(config: AgentConfig, *, stop: asyncio.Event | None = None,
                    notifier: SystemdNotifier | None = None,
                    install_signal_handlers: bool = True,
                    warning_handler: Callable[[Outbox], WarningHandler] | None = None) -> bool:
    """Run the agent until `stop` is set or SIGTERM/SIGINT arrives; returns after a clean stop,
    True when it stopped to run again on a new config file (`config.trial.run_with_trials`).
    `warning_handler` makes, from the outbox, what plays the warnings that come by radio
    (`edge_agent.narrowband.downlink`; default: the [[terminals]], else logged and counted)."""
    stop = stop or asyncio.Event()
    reload = Reload(stop)
    notifier = notifier or SystemdNotifier.from_env()
    boot_id = uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(gw=config.gateway.id)
    profiles = resolve_profiles(config)
    config.gateway.data_dir.mkdir(parents=True, exist_ok=True)
    handled = _handle_signals(stop) if install_signal_handlers else []
    runtime = AgentRuntime(config=config, boot_id=boot_id, started_ms=time.time_ns() // 1_000_000)
    pool = TransportPool()
    runtime.pool = pool
    try:
        _make_room_to_start(config)
        async with _open_outbox(config) as outbox, \
                AlarmStore.open(config.alarms_path) as alarm_store, \
                _open_terminals(config, outbox) as terminals:
            runtime.terminals = terminals
            runtime.local_warning = _local_rule(config, terminals, runtime)
            # The pollers write through the alarm rules, which append the alarm records
            # with the telemetry that caused them (edge_agent.alarms.wiring).
            alarms = AlarmRules(RuleEngine(build_rules(config, profiles)), alarm_store, outbox,
                                on_events=runtime.local_warning.on_alarm_events
                                if runtime.local_warning else None)
            await alarms.restore()
            runtime.outbox, runtime.alarms = outbox, alarms
            birth = build_birth(config, profiles, stream=outbox.stream, boot_id=boot_id,
                                version=__version__)
            _build_devices(runtime, profiles, alarms, pool)
            # --- remote configuration (edge_agent/config/trial.py): apply_config, rollback.
            history = ConfigHistory(config.source or config.gateway.data_dir / "site.toml")
            trial = ConfigTrial(history, config, settle=lambda r: commands.settle(r),
                                probe=runtime.health_view, reload=reload)
            apply_config = ApplyConfigHandler(config, history, trial, probe=runtime.health_view,
                                              reload=reload)
            # --- commands (DESIGN.md §6): the executor takes down/cmd payloads off the uplink.
            commands = build_executor(config, outbox, {p.device.id: p for p in runtime.pollers},
                                      runtime.status, warnings=terminals,
                                      handlers={"apply_config": apply_config})
            uplink = Uplink(gw=config.gateway.id, outbox=outbox, birth=birth, mqtt=config.mqtt,
                            backlog=config.outbox, boot_id=boot_id, version=__version__,
                            on_command=commands.handle)
            runtime.uplink = uplink
            runtime.narrowband = _build_narrowband(
                config, outbox, uplink, birth, alarms,
                warning_handler(outbox) if warning_handler else _radio_player(config, terminals))
            log.info("agent_starting", boot_id=boot_id, version=__version__,
                     stream=outbox.stream, devices=len(runtime.pollers),
                     stations=len(runtime.stations), outbox=str(config.outbox_path))
            tasks = _named_tasks(runtime, outbox, uplink, alarms, commands.run, notifier)
            tasks.insert(2, ("config.trial", trial.run))
            await _run_until_stopped(runtime, tasks, stop, notifier)
            reload.stopped()
            await _save_on_stop(runtime, outbox, alarms)
    finally:
        await pool.close()
        loop = asyncio.get_running_loop()
        for sig in handled:
            loop.remove_signal_handler(sig)
        structlog.contextvars.unbind_contextvars("gw")
    log.info("agent_stopped", boot_id=boot_id, reload=reload.requested)
    return reload.requested


Factory = Callable[[], Awaitable[None]]


def _handle_signals(stop: asyncio.Event) -> list[signal.Signals]:
    """SIGTERM and SIGINT set `stop`; returns the signals handled (to remove them after)."""
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, _on_signal, sig, stop)
            handled.append(sig)
    return handled


def _make_room_to_start(config: AgentConfig) -> None:
    ob = config.outbox
    ballast = DiskWatch(config.outbox_path, reserve_bytes=ob.disk_reserve_bytes,
                        ballast_bytes=ob.ballast_bytes)
    if ballast.usage().fs_free_bytes < START_ROOM_BYTES:
        # Both SQLite files need room for their `-shm` and `-wal` files to open at all.
        ballast.release_ballast("start on a full disk")


def _open_outbox(config: AgentConfig) -> contextlib.AbstractAsyncContextManager[Outbox]:
    """The outbox of `[outbox]`; its maintenance loop runs under the agent's supervisor."""
    ob = config.outbox
    return Outbox.open(config.outbox_path, keep_delivered_s=ob.keep_delivered_s,
                       live_window_s=ob.live_window_s, max_bytes=ob.max_bytes,
                       thin_at=ob.thin_at, thin_to=ob.thin_to,
                       thin_keep_every=ob.thin_keep_every, thin_max_rounds=ob.thin_max_rounds,
                       clock=ClockGuard(max_step_ms=int(ob.clock_max_step_s * 1000)),
                       disk_reserve_bytes=ob.disk_reserve_bytes,
                       ballast_bytes=ob.ballast_bytes, hold_records=ob.hold_records,
                       maintain=False)


def _open_terminals(config: AgentConfig, outbox: Outbox
                    ) -> contextlib.AbstractAsyncContextManager[TerminalService | None]:
    """The 叫应 terminals of `[[terminals]]` with their ledger open, or None without any."""
    if not any(t.enabled for t in config.terminals):
        return contextlib.nullcontext(None)
    from edge_agent.terminals.service import TerminalService

    return TerminalService(terminals=config.terminals, ledger_path=config.terminals_path,
                           outbox=outbox).open()


def _local_rule(config: AgentConfig, terminals: TerminalService | None,
                runtime: AgentRuntime) -> LocalWarningRule | None:
    """`[local_warning]`: played while the uplink is down (read when an alarm is raised)."""
    if terminals is None or config.local_warning is None:
        return None
    from edge_agent.terminals.local_rule import LocalWarningRule

    return LocalWarningRule(config.local_warning, terminals,
                            online=lambda: bool(runtime.uplink and runtime.uplink.connected))


def _radio_player(config: AgentConfig, terminals: TerminalService | None
                  ) -> RadioWarningPlayer | None:
    """The terminals play what comes down by the `[narrowband]` radio (None: logged only)."""
    if terminals is None or config.narrowband is None:
        return None
    from edge_agent.terminals.radio import RadioWarningPlayer

    return RadioWarningPlayer(terminals, config.narrowband.bearer)


def _build_narrowband(config: AgentConfig, outbox: Outbox, uplink: Uplink, birth: Birth,
                      alarms: AlarmRules, warning_handler: WarningHandler | None = None
                      ) -> NarrowbandFallback | None:
    """The narrowband fallback of `[narrowband]`, if there is one."""
    nb = config.narrowband
    if nb is None:
        return None
    from edge_agent.narrowband.downlink import RadioDownlink
    from edge_agent.narrowband.fallback import NarrowbandFallback

    try:
        key = nb.key_bytes()
    except ValueError as exc:  # checked at load; a key file gone since then
        raise ConfigError(config.source or "config", None, "narrowband.key_file",
                          str(exc)) from exc
    # --- narrowband downlink (§5): warnings central sends by radio; the 叫应 terminals play
    # them (`RadioWarningPlayer`; None without terminals: logged and counted).
    downlink = RadioDownlink(gw=config.gateway.id, public_key=pinned_key(config),
                             central=nb.recipient, outbox=outbox, handler=warning_handler)
    return NarrowbandFallback(outbox=outbox, link=uplink, birth=birth,
                              terminal=build_bearer(nb, downlink), config=nb, key=key,
                              active_alarms=lambda: len(alarms.engine.active()),
                              downlink=downlink)


def _build_devices(runtime: AgentRuntime, profiles: dict[str, Profile], alarms: AlarmRules,
                   pool: TransportPool) -> None:
    """A poller per enabled Modbus device and a station per enabled HJ 212 one, in order."""
    for dev in runtime.config.devices:
        if not dev.enabled:
            continue
        if isinstance(dev.transport, Hj212TransportConfig):
            # A station pushes its frames: it is listened to, not polled.
            from edge_agent.field.stations import Hj212Station

            runtime.stations.append(Hj212Station(dev, profiles[dev.id], alarms))
            continue
        transport = pool.get(dev.transport, timeout_s=dev.timeout_s)
        runtime.pollers.append(DevicePoller(dev, profiles[dev.id], transport, alarms))


def _named_tasks(runtime: AgentRuntime, outbox: Outbox, uplink: Uplink, alarms: AlarmRules,
                 commands: Factory, notifier: SystemdNotifier) -> list[tuple[str, Factory]]:
    """Every task the supervisor runs, by name, in start order."""
    config = runtime.config
    tasks: list[tuple[str, Factory]] = [
        (MAINTENANCE_TASK, outbox.maintenance_loop),
        ("uplink.mqtt", uplink.run),
        ("commands", commands),  # --- commands wiring (§6)
        *((f"poll[{p.device.id}]", p.run) for p in runtime.pollers),
        *((f"hj212[{s.device.id}]", s.run) for s in runtime.stations),
        ("rules.tick", lambda: alarms.tick_loop(runtime.devices)),
    ]
    if runtime.narrowband is not None:
        tasks.append((f"narrowband.{runtime.narrowband.config.bearer}", runtime.narrowband.run))
    if runtime.terminals is not None:
        tasks.extend(runtime.terminals.tasks())
    if runtime.local_warning is not None:
        tasks.append(("terminals.local", runtime.local_warning.run))
    tasks.append(("status.writer", lambda: _status_loop(outbox, runtime)))
    if config.control.enabled:
        control = ControlServer(config.control_socket_path, ControlOps(runtime))
        tasks.append(("control.socket", control.serve))
    if config.metrics.enabled:  # --- metrics (edge_agent/health/metrics.py)
        from edge_agent.health.metrics import AgentCollector, serve_metrics

        tasks.append(("metrics.http", lambda: serve_metrics(runtime, AgentCollector())))
    if notifier.watchdog_usec:
        tasks.append(("systemd.watchdog", lambda: watchdog_loop(notifier)))
    return tasks


async def _run_until_stopped(runtime: AgentRuntime, named: list[tuple[str, Factory]],
                             stop: asyncio.Event, notifier: SystemdNotifier) -> None:
    """Run every task in one TaskGroup, each supervised, until `stop`; then cancel them."""
    async with asyncio.TaskGroup() as tg:
        tasks: list[asyncio.Task[None]] = []
        for name, factory in named:
            runtime.restarts.setdefault(name, 0)
            tasks.append(tg.create_task(_supervised(name, factory, runtime), name=name))
        notifier.notify(f"READY=1\nSTATUS=polling {len(runtime.pollers)} device(s), "
                        f"listening to {len(runtime.stations)} station(s)")
        log.info("agent_ready", tasks=[t.get_name() for t in tasks])
        await stop.wait()
        log.info("agent_stopping")
        notifier.notify("STOPPING=1")
        for task in tasks:
            task.cancel()
        await _cancel_stragglers(tasks)


async def _save_on_stop(runtime: AgentRuntime, outbox: Outbox, alarms: AlarmRules) -> None:
    """On a full disk: first what the outbox holds (spending the ballast if need be), then the
    alarm states the alarm store refused, so a restart resumes both; then a last status."""
    if not await outbox.flush_held(spend_ballast=True):
        log.error("agent_stopping_with_held_records")
    if not await alarms.save_pending():
        log.error("agent_stopping_with_unsaved_alarm_states", alarms=alarms.unsaved)
    # Leave a last snapshot so that `edge-agent status` shows the agent stopped.
    await runtime.refresh_disk()
    final = runtime.status() | {"stopped_ms": time.time_ns() // 1_000_000}
    try:
        await outbox.set_meta(STATUS_META_KEY, json.dumps(final, ensure_ascii=False))
    except OutboxFullError as exc:
        log.warning("agent_status_not_saved", error=str(exc))


async def _cancel_stragglers(tasks: list[asyncio.Task[None]], *, grace_s: float = 2.0,
                             rounds: int = 10) -> None:
    """Cancel again each task still running `grace_s` after its cancel. Python 3.11's
    `asyncio.wait_for` (inside pymodbus) drops a cancel that races the reply it waits for, and
    the poller then polls on: a stop on a busy gateway (a full disk makes every append slow)
    would wait for ever."""
    pending = {t for t in tasks if not t.done()}
    for _ in range(rounds):
        if not pending:
            return
        _, pending = await asyncio.wait(pending, timeout=grace_s)
        for task in pending:
            log.warning("task_cancel_repeated", task=task.get_name())
            task.cancel()


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    log.info("signal_received", signal=sig.name)
    stop.set()


def _supervised(name: str, factory: Factory,
                runtime: AgentRuntime) -> Coroutine[Any, Any, None]:
    """Run `factory()` for ever under the runtime's supervisor: restarted with a growing,
    jittered delay when it crashes or returns, each restart counted in `runtime.restarts`."""
    backoff = Backoff(first_s=RESTART_MIN_S, max_s=RESTART_MAX_S,
                      healthy_after_s=STABLE_AFTER_S)
    return supervise(name, factory, backoff=backoff, on_restart=runtime.count_restart)


async def _status_loop(outbox: Outbox, runtime: AgentRuntime) -> None:
    full = False
    while True:
        disk = await runtime.refresh_disk() or {}
        try:
            await outbox.set_meta(STATUS_META_KEY, json.dumps(runtime.status(), ensure_ascii=False))
        except OutboxFullError as exc:
            # The live status (control socket) still tells; the file catches up when it can.
            if not full:
                log.warning("agent_status_not_saved", error=str(exc), held=disk.get("held"))
            full = True
        else:
            full = False
        await asyncio.sleep(runtime.config.status.interval_s)
