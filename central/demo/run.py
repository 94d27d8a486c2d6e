"""`central demo`: the whole system on one machine with nothing installed but the venv.

Starts an embedded broker (or uses `--broker`), central on HTTP, and a simulated fleet:
every gateway is its own edge-agent process polling its own Modbus TCP simulator process on
loopback. Central never imports the edge agent: the fleet runs as child processes, as real
gateways would.

Two scripted scenarios give the duty officers something to see: a gas leak at the Qingshan
plant every few minutes, and 三断 at Xinzhou: its link is cut (`central.demo.link`), a leak
follows, the alarm comes by BeiDou (a simulated terminal pair in one child process, central's
and the gateway's), and when the link returns the full record merges into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
import uvicorn

from central.app import create_app
from central.areas.tree import SEED_DIR, AreaNode, area_tree, seed_areas
from central.config.settings import NarrowbandGateway, Settings
from central.console.geo import Position, set_area_position, set_gateway_position
from central.demo import callresp
from central.demo.broker import embedded_broker
from central.demo.children import Children, ready_child, wait_file
from central.demo.link import LinkSwitch
from central.demo.shutdown import Shutdown
from central.health.service import begin_stop, make_server
from central.storage import Storage, open_storage

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class DemoGateway:
    id: str
    devices: tuple[tuple[str, str], ...]  # (device id, profile id)
    beidou_card: str | None = None  # has a BeiDou terminal: the narrowband fallback (§5)


@dataclass(frozen=True, slots=True)
class Narrowband:
    """A gateway's side of the BeiDou link: its terminal's pty and its frame key."""

    port: str
    key: str
    central_card: str
    after_s: float = 10.0  # a real site would wait minutes; the demo shows it in seconds


FLEET: tuple[DemoGateway, ...] = (
    DemoGateway("wh-jiangan-01", (("gas-1", "gas-detector-v1"), ("tank-1", "storage-tank-v1"))),
    DemoGateway("wh-qingshan-02", (("gas-1", "gas-detector-v1"), ("gas-2", "gas-detector-v1"),
                                   ("tank-1", "storage-tank-v1"))),
    DemoGateway("wh-hongshan-03", (("tank-1", "storage-tank-v1"), ("tank-2", "storage-tank-v1"))),
    DemoGateway("wh-xinzhou-04", (("gas-1", "gas-detector-v1"), ("tank-1", "storage-tank-v1")),
                beidou_card="4238473"),
)
CENTRAL_CARD = "0242407"
# Where the demo's gateways stand on the 一张图 map (lat, lon; inside their districts, in the
# frame of the vendored boundaries), and the forest station that has no gateway yet.
POSITIONS: dict[str, tuple[float, float]] = {
    "wh-jiangan-01": (30.6150, 114.3120),  # 江岸区 二七街道
    "wh-qingshan-02": (30.6400, 114.3850),  # 青山区 红卫路街道
    "wh-hongshan-03": (30.5050, 114.4100),  # 洪山区 关山街道
    "wh-xinzhou-04": (30.6900, 114.5800),  # 新洲区 阳逻街道
}
SITE_POSITIONS: dict[str, tuple[float, float]] = {"420116-site-01": (31.0850, 114.3900)}
DEMO_SEND_INTERVAL_S = 10.0  # BeiDou cards allow one message a minute; the demo, one per 10 s


def gateway_config(gw: DemoGateway, *, data_dir: Path, sim_port: int, broker_host: str,
                   broker_port: int, central_public_key: str | None = None,
                   narrowband: Narrowband | None = None) -> str:
    """The TOML an operator would write for this gateway."""
    lines = [
        "[gateway]",
        f'id = "{gw.id}"',
        f'data_dir = "{data_dir}"',
        "",
        "[mqtt]",
        f'host = "{broker_host}"',
        f"port = {broker_port}",
        "ack_timeout_s = 5",
        "",
    ]
    if central_public_key:  # pinned at enrolment: the gateway runs commands signed by central
        lines += ["[commands]", f'central_public_key = "{central_public_key}"', ""]
    if narrowband is not None:
        lines += ["[narrowband]", f'port = "{narrowband.port}"',
                  f'central_card = "{narrowband.central_card}"', f'key = "{narrowband.key}"',
                  f"after_s = {narrowband.after_s}", "heartbeat_s = 60", ""]
    for unit, (dev_id, profile) in enumerate(gw.devices, start=1):
        lines += [
            "[[devices]]",
            f'id = "{dev_id}"',
            f'profile = "{profile}"',
            f'transport = {{ kind = "tcp", host = "127.0.0.1", port = {sim_port} }}',
            f"device_id = {unit}",
            "poll_interval_s = 1.0",
            "",
        ]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Enrol:
    """How the demo's gateways enrol: central's URL and a token issuer (DESIGN.md §8)."""

    central_url: str
    issue_token: Callable[[str], Awaitable[str]]
    mqtt_tls: bool = False  # the embedded broker is plain MQTT


async def enrol_gateway(enrol: Enrol, gw: str, conf: Path, children: Children) -> None:
    """`edge-agent enroll` as an installer runs it on a new gateway (token in the environment,
    not on the command line where `ps` shows it)."""
    token = await enrol.issue_token(gw)
    args = ["enroll", "-c", str(conf), "--central", enrol.central_url] + (
        [] if enrol.mqtt_tls else ["--no-mqtt-tls"])
    proc = await children.spawn("edge_agent", args, conf.parent / "enrol.log",
                                env={"FIELDLINK_ENROL_TOKEN": token})
    try:
        rc = await proc.wait()
    except asyncio.CancelledError:
        await children.stop([proc])  # the demo is stopping: leave no child behind
        raise
    if rc != 0:
        raise RuntimeError(f"{gw}: enrolment failed, see {conf.parent / 'enrol.log'}")
    log.info("demo_gateway_enrolled", gw=gw)


@contextlib.asynccontextmanager
async def fleet(children: Children, root: Path, broker_host: str, broker_port: int,
                gateways: tuple[DemoGateway, ...] = FLEET, *,
                central_public_key: str | None = None, links: dict[str, int] | None = None,
                narrowband: dict[str, Narrowband] | None = None,
                enrol: Enrol | None = None,
                extra: dict[str, str] | None = None) -> AsyncIterator[dict[str, int]]:
    """Start one simulator and one edge agent process per gateway; stop them all on exit.
    Yields each gateway's simulator control port (to script values). `links` routes a
    gateway's MQTT through a local relay port; `narrowband` gives it a BeiDou terminal;
    `enrol` has each gateway run `edge-agent enroll` with a fresh token first (DESIGN.md §8),
    which pins central's key instead of `central_public_key`; `extra` is more of a gateway's
    TOML (its 叫应 terminals). On exit the agents stop first, then the simulators they poll."""
    sims: list[asyncio.subprocess.Process] = []
    agents: list[asyncio.subprocess.Process] = []
    controls: dict[str, int] = {}
    confs: list[tuple[DemoGateway, Path]] = []
    enrolling: list[asyncio.Task[None]] = []
    try:
        for gw in gateways:
            gdir = root / gw.id
            gdir.mkdir(parents=True, exist_ok=True)
            ready, control_ready = gdir / "sim.port", gdir / "sim.control"
            ready.unlink(missing_ok=True)
            control_ready.unlink(missing_ok=True)
            args = ["--port", "0", "--ready-file", str(ready), "--control-port", "0",
                    "--control-ready-file", str(control_ready)]
            for _dev, profile in gw.devices:
                args += ["--profile", profile]
            sim = await children.spawn("firmware_stubs.modbus_sim", args, gdir / "sim.log")
            sims.append(sim)
            sim_port = int((await wait_file(ready, sim)).split("=")[-1])
            controls[gw.id] = int((await wait_file(control_ready, sim)).split("=")[-1])
            conf = gdir / "site.toml"
            relay = (links or {}).get(gw.id)
            conf.write_text(gateway_config(
                gw, data_dir=gdir, sim_port=sim_port,
                broker_host="127.0.0.1" if relay else broker_host, broker_port=relay or broker_port,
                central_public_key=central_public_key, narrowband=(narrowband or {}).get(gw.id))
                + "\n" + (extra or {}).get(gw.id, ""))
            confs.append((gw, conf))
            if enrol is not None:  # a process start each: overlap them with the simulators'
                enrolling.append(asyncio.create_task(enrol_gateway(enrol, gw.id, conf, children),
                                                     name=f"demo.enrol[{gw.id}]"))
        await asyncio.gather(*enrolling)
        for gw, conf in confs:
            agents.append(await children.spawn("edge_agent", ["run", "--config", str(conf)],
                                               conf.parent / "agent.log"))
            log.info("demo_gateway_started", gw=gw.id, devices=len(gw.devices))
        yield controls
    finally:
        await cancel_all(enrolling)
        await children.stop(agents)
        await children.stop(sims)


DEMO_ADMIN = "admin"
DEMO_LOGIN_FILE = "console-login.txt"


async def place_on_map(storage: Storage) -> None:
    """The demo's gateways and the forest station on the 一张图 map."""
    for gw, (lat, lon) in POSITIONS.items():
        await set_gateway_position(storage, gw, Position(lat, lon))
    for area in await area_tree(storage):
        for code, (lat, lon) in SITE_POSITIONS.items():
            found = _find(area, code)
            if found is not None:
                await set_area_position(storage, found, Position(lat, lon))


def _find(node: AreaNode, code: str) -> int | None:
    if node.area.code == code:
        return node.area.id
    return next((i for c in node.children if (i := _find(c, code)) is not None), None)


async def demo_login(storage: Storage, data_dir: Path) -> tuple[str, str]:
    """The demo's admin and its password: made with a random password on the first run and
    kept in `data_dir/console-login.txt` (0600) for the next."""
    from central.identity.accounts import Accounts
    from central.identity.audit import AuditLog
    from central.identity.users import UnknownUserError

    path = data_dir / DEMO_LOGIN_FILE
    accounts = Accounts(storage, AuditLog(storage))
    try:
        await accounts.get_user(DEMO_ADMIN)
        if path.exists():
            return DEMO_ADMIN, path.read_text(encoding="utf-8").strip()
        password = secrets.token_urlsafe(12)  # the file is gone: set a new one
        await accounts.set_password("demo", DEMO_ADMIN, password)
    except UnknownUserError:
        password = secrets.token_urlsafe(12)
        await accounts.add_user("demo", DEMO_ADMIN, "admin", password)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(password + "\n")
    return DEMO_ADMIN, password


async def run_demo(*, data_dir: Path, http_host: str, http_port: int, broker: str | None,
                   callresp_deadline_s: float = callresp.DEADLINE_S) -> None:
    """Run broker, central and the fleet until Ctrl-C or SIGTERM (a 叫应 round whose deadlines
    are `callresp_deadline_s`: `central.demo.callresp`), stop them in order
    (`central.demo.shutdown`) and say so."""
    data_dir.mkdir(parents=True, exist_ok=True)
    main = asyncio.current_task()
    assert main is not None, "run_demo runs in a task"
    shutdown, children = Shutdown(main), Children()
    with shutdown.signals():
        try:
            await _run(shutdown, children, data_dir=data_dir, http_host=http_host,
                       http_port=http_port, broker=broker, callresp_deadline_s=callresp_deadline_s)
        except asyncio.CancelledError:
            if not shutdown.requested:
                raise
            main.uncancel()  # the stop the user asked for, done: not an error
    print(shutdown.summary(children), flush=True)


async def _run(shutdown: Shutdown, children: Children, *, data_dir: Path, http_host: str,
               http_port: int, broker: str | None, callresp_deadline_s: float) -> None:
    """Start everything, each thing after what it uses and on one stack (so that a stop
    signal, which cancels this, stops them in the reverse order), then serve."""
    async with contextlib.AsyncExitStack() as stack:
        if broker:
            url = urlsplit(broker if "://" in broker else f"mqtt://{broker}")
            host, port = url.hostname or "127.0.0.1", url.port or 1883
        else:
            addr = await stack.enter_async_context(embedded_broker())
            host, port = addr.host, addr.port
        street = await stack.enter_async_context(  # 叫应: the street's terminals, starting
            callresp.street_terminals(children, data_dir / "terminals", callresp_deadline_s))
        # 三断: the BeiDou-equipped gateways reach the broker through a switchable relay, and
        # each has a frame key that central knows (enrolment would hand it out).
        remote = [gw for gw in FLEET if gw.beidou_card]
        cards = {CENTRAL_CARD: 0.0} | {gw.beidou_card: DEMO_SEND_INTERVAL_S
                                       for gw in remote if gw.beidou_card}
        terminals = await stack.enter_async_context(
            beidou_terminals(children, data_dir / "beidou", cards))
        keys = {gw.id: secrets.token_hex(32) for gw in remote}
        links = {gw.id: await stack.enter_async_context(LinkSwitch(host, port)) for gw in remote}
        settings = Settings(
            db_url=f"sqlite:///{(data_dir / 'central.db').resolve()}", mqtt_host=host,
            mqtt_port=port, http_host=http_host, http_port=http_port,
            narrowband_port=terminals[CENTRAL_CARD],
            narrowband_gateways=[NarrowbandGateway(gw=gw.id, card=gw.beidou_card, key=keys[gw.id])
                                 for gw in remote if gw.beidou_card],
            callresp=callresp.demo_settings(callresp_deadline_s))
        async with open_storage(settings.db_url) as st:  # Wuhan's areas and the fleet's sites
            await seed_areas(st, SEED_DIR / "wuhan.yaml")
            await place_on_map(st)
            login = await demo_login(st, data_dir)  # the console's first admin (DESIGN.md §8)
        app = create_app(settings)
        server = make_server(app, http_host, http_port)
        shutdown.serving(app, server)  # a stop signal now also begins central's clean stop
        serve = await stack.enter_async_context(central_server(app, server))
        identity = app.state.identity.service
        street_id = await callresp.seed_directory(app.state.callresp.storage)  # 叫应 directory

        async def issue_token(gw: str) -> str:
            return (await identity.issue_token(gw, ttl_s=600)).token

        local = "127.0.0.1" if http_host in ("0.0.0.0", "::", "") else http_host
        controls = await stack.enter_async_context(fleet(
            children, data_dir / "fleet", host, port,
            enrol=Enrol(f"http://{local}:{http_port}", issue_token),
            links={gw: link.port for gw, link in links.items()},
            narrowband={gw.id: Narrowband(port=terminals[gw.beidou_card], key=keys[gw.id],
                                          central_card=CENTRAL_CARD)
                        for gw in remote if gw.beidou_card},
            extra={callresp.GW: callresp.terminals_toml(await street())}))
        scenarios = [asyncio.create_task(gas_leak_scenario(controls), name="demo.scenario"),
                     asyncio.create_task(callresp.callresp_round(
                         app.state.callresp, street_id, user=login[0]), name="demo.callresp")]
        scenarios += [asyncio.create_task(sanduan_scenario(link, controls, gw=gw),
                                          name=f"demo.sanduan[{gw}]")
                      for gw, link in links.items()]
        stack.push_async_callback(cancel_all, scenarios)
        print(f"Fieldlink demo: console http://{http_host}:{http_port}/  "
              f"broker mqtt://{host}:{port}  "
              f"({len(FLEET)} gateways). Ctrl-C stops everything.", flush=True)
        print(f"叫应: a red warning to 二七街道's terminals once {callresp.GW} is online; "
              f"deadlines {callresp_deadline_s:g} s, 3 re-sends, then the district.", flush=True)
        print("The gateways enrolled with one-time tokens and hold certificates from central's "
              "CA, but this broker is plain MQTT (amqtt cannot enforce per-gateway ACLs): use "
              "Mosquitto from `central broker-config` in production (README).", flush=True)
        print(f"Console login: user {login[0]}  password {login[1]}  (kept in "
              f"{data_dir / DEMO_LOGIN_FILE}, mode 0600)", flush=True)
        await asyncio.shield(serve)  # a stop signal cancels this wait, not the server
        raise RuntimeError("central's server stopped on its own (see the log)")


@contextlib.asynccontextmanager
async def central_server(app: Any, server: uvicorn.Server) -> AsyncIterator[asyncio.Task[None]]:
    """Serve `app` (its lifespan opens storage, MQTT ingest and the narrowband receiver) until
    the context ends, then stop it cleanly: `begin_stop`, bounded by uvicorn's graceful
    timeout. Yields the server's task."""
    serve = asyncio.create_task(server.serve(), name="http")
    try:
        async with asyncio.timeout(30):
            while not server.started:
                if serve.done():
                    await serve  # raises the startup error
                    raise RuntimeError("central did not start (see the log)")
                await asyncio.sleep(0.05)
        yield serve
    finally:
        begin_stop(app, server)
        await asyncio.wait([serve])


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel `tasks` and wait until they have ended."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _sim_control(port: int, request: dict[str, object]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        await reader.readline()
    finally:
        writer.close()


async def gas_leak_scenario(controls: dict[str, int], *, gw: str = "wh-qingshan-02",
                            first_after_s: float = 20.0, every_s: float = 180.0,
                            lasts_s: float = 40.0) -> None:
    """Something for the duty officers to see: every few minutes a leak at the Qingshan plant
    drives gas-1 past level 2 (50 %LEL), then it is brought under control and the alarm
    clears."""
    port = controls.get(gw)
    if port is None:
        return
    await asyncio.sleep(first_after_s)
    while True:
        try:
            for value in (28.0, 41.0, 57.5):
                await _sim_control(
                    port, {"set": {"device_id": 1, "point": "gas_lel", "value": value}})
                await asyncio.sleep(lasts_s / 4)
            await asyncio.sleep(lasts_s / 4)
            await _sim_control(port, {"clear": {"device_id": 1, "point": "gas_lel"}})
            log.info("demo_leak_cleared", gw=gw)
        except OSError as exc:  # the simulator is restarting or gone: try next round
            log.warning("demo_scenario_failed", error=str(exc))
        await asyncio.sleep(every_s)


@contextlib.asynccontextmanager
async def beidou_terminals(children: Children, root: Path,
                           cards: dict[str, float]) -> AsyncIterator[dict[str, str]]:
    """The BeiDou terminals (card → send interval) as one child process sharing one sky;
    yields card → pty path."""
    args = [f"--terminal={card}:{interval}" for card, interval in cards.items()]
    async with ready_child(children, "firmware_stubs.beidou_cli", args, root, "beidou") as ready:
        paths: dict[str, str] = json.loads(await ready)
        yield paths


async def sanduan_scenario(link: LinkSwitch, controls: dict[str, int], *, gw: str,
                           first_after_s: float = 45.0, every_s: float = 300.0) -> None:
    """三断 at one gateway: the link is cut, gas leaks (level 2) while it is down, so the alarm
    goes by BeiDou; the leak is brought under control, then the link comes back and the full
    records follow over IP."""
    port = controls.get(gw)
    if port is None:
        return
    await asyncio.sleep(first_after_s)
    while True:
        link.set_cut(True)
        try:
            await asyncio.sleep(15)
            await _sim_control(port, {"set": {"device_id": 1, "point": "gas_lel", "value": 57.5}})
            await asyncio.sleep(60)
            await _sim_control(port, {"clear": {"device_id": 1, "point": "gas_lel"}})
            await asyncio.sleep(30)
        except OSError as exc:  # the simulator is restarting or gone: try next round
            log.warning("demo_scenario_failed", error=str(exc))
        finally:
            link.set_cut(False)
        await asyncio.sleep(every_s)
