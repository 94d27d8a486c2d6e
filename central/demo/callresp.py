"""The demo's 叫应 round (DESIGN.md §7, issue 11): a red warning to one street's terminals.

二七街道 in 江岸区 has four 叫应 terminals on the demo gateway `wh-jiangan-01`; the person at
three of them presses the button a few seconds after each warning, the fourth never does. The
district's person in charge answers on the terminal of the district's duty room. The demo
seeds that directory (terminals on the map, persons, who is in charge), runs the terminals as
one child process (`firmware_stubs.terminal_street`, loopback TCP) and, once the gateway is online,
issues a red warning to the street as the demo's admin. With the demo's short deadlines the
round plays out in about a minute: three answered, the fourth re-sent three times and then
escalated to the district, who answers. It repeats every `every_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from central import CentralError
from central.areas.tree import AreaNode, area_tree
from central.callresp.directory import (
    Person,
    PersonRole,
    Terminal,
    upsert_person_program,
    upsert_terminal_program,
)
from central.callresp.service import CallRespService
from central.callresp.settings import CallRespSettings
from central.demo.children import Children, ready_child
from central.identity.audit import AuditLog
from central.storage import Storage
from runtime.clock import now_ms

log = structlog.get_logger(__name__)

GW = "wh-jiangan-01"
STREET, DISTRICT = "420102-erqi", "420102"  # 二七街道, 江岸区 (central/seed/wuhan.yaml)
DEADLINE_S = 10.0  # per send; the real default for red is 5 minutes
TEXT = "暴雨红色预警：二七街道请立即组织低洼地带人员转移，收到请按应答键"


@dataclass(frozen=True, slots=True)
class DemoTerminal:
    id: str
    name: str
    lat: float
    lon: float
    person: str  # who answers on it
    person_id: str
    presses: float | None  # the person presses this share of the deadline after a warning
    area: str = STREET


TERMINALS: tuple[DemoTerminal, ...] = (
    DemoTerminal("JY-JA-0101", "二七街道办事处", 30.6164, 114.3098, "王建国", "p-erqi-wang", 0.3),
    DemoTerminal("JY-JA-0102", "长江社区广场", 30.6131, 114.3151, "李秀英", "p-erqi-li", 0.5),
    DemoTerminal("JY-JA-0103", "二七路地下通道口", 30.6189, 114.3164, "张伟", "p-erqi-zhang", 0.7),
    DemoTerminal("JY-JA-0104", "沿江低洼小区", 30.6112, 114.3072, "刘洋", "p-erqi-liu", None),
    DemoTerminal("JY-JA-0001", "江岸区应急管理局值班室", 30.6066, 114.3019, "陈志强",
                 "p-jiangan-chen", 0.4, area=DISTRICT),
)
IN_CHARGE = "p-jiangan-chen"  # the district's person in charge: escalations reach them


def demo_settings(deadline_s: float = DEADLINE_S) -> CallRespSettings:
    """The workflow with the demo's short deadlines (every level, so any warning shows it)."""
    return CallRespSettings(deadline_red_s=deadline_s, deadline_orange_s=deadline_s,
                            deadline_yellow_s=deadline_s, deadline_blue_s=deadline_s,
                            resends=3, tick_s=0.2)


def _area_ids(nodes: list[AreaNode], codes: set[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for node in nodes:
        if node.area.code in codes:
            found[node.area.code] = node.area.id
        found |= _area_ids(list(node.children), codes)
    return found


async def seed_directory(storage: Storage) -> int:
    """The street's terminals and persons and the district's person in charge (idempotent,
    audited as `demo`); returns the street's area id."""
    areas = _area_ids(await area_tree(storage), {STREET, DISTRICT})
    audit = AuditLog(storage)
    for t in TERMINALS:
        term = Terminal(id=t.id, gw=GW, area_id=areas[t.area], kind="audio", name=t.name,
                        lat=t.lat, lon=t.lon)
        person = Person(id=t.person_id, name=t.person, area_id=areas[t.area],
                        role=str(PersonRole.IN_CHARGE if t.person_id == IN_CHARGE
                                 else PersonRole.MEMBER),
                        phone="", terminals=(t.id,))
        now = now_ms()
        await storage.run(lambda term=term, now=now: upsert_terminal_program(term, now))  # type: ignore[misc]
        await storage.run(lambda person=person, now=now: upsert_person_program(person, now))  # type: ignore[misc]
        await audit.append("demo", "callresp.terminal_set", f"terminal:{t.id}", asdict(term))
        await audit.append("demo", "callresp.person_set", f"person:{t.person_id}", asdict(person))
    return areas[STREET]


@contextlib.asynccontextmanager
async def street_terminals(children: Children, root: Path, deadline_s: float = DEADLINE_S
                           ) -> AsyncIterator[Callable[[], Awaitable[dict[str, int]]]]:
    """The terminals as one child process; yields `ports()`, which waits until they listen
    and returns terminal id → its TCP port on loopback."""
    args = [f"--terminal={t.id}:" + ("never" if t.presses is None
                                      else f"{t.presses * deadline_s:.2f}") for t in TERMINALS]
    async with ready_child(children, "firmware_stubs.terminal_street", args, root,
                           "terminals") as ready:
        async def ports() -> dict[str, int]:
            return dict(json.loads(await ready))

        yield ports


def terminals_toml(ports: dict[str, int]) -> str:
    """The gateway's `[[terminals]]` sections for these terminals."""
    return "".join(f'[[terminals]]\nid = "{tid}"\ntcp = "127.0.0.1:{port}"\n\n'
                   for tid, port in ports.items())


async def callresp_round(service: CallRespService, street_id: int, *, user: str,
                         after_s: float = 5.0, every_s: float = 900.0,
                         online_timeout_s: float = 120.0) -> None:
    """Once the street's gateway is online (and `after_s` later), a red warning to the street
    as `user`; again every `every_s`."""
    try:
        async with asyncio.timeout(online_timeout_s):  # the gateway enrols and connects first
            while not await _online(service.storage):
                await asyncio.sleep(1.0)
    except TimeoutError:
        log.warning("demo_callresp_gateway_offline", gw=GW, waited_s=online_timeout_s)
    await asyncio.sleep(after_s)
    while True:
        try:
            wid = (await service.create(level="red", text=TEXT, user=user,
                                        areas=[street_id])).warning_id
        except CentralError as exc:  # storage trouble: try again next round
            log.warning("demo_callresp_failed", error=str(exc))
        else:
            log.info("demo_callresp_round", warning=wid, street=STREET)
            print(f"叫应: red warning {wid} to 二七街道's {len(TERMINALS) - 1} terminals; "
                  "see the console's 叫应 board", flush=True)
        await asyncio.sleep(every_s)


async def _online(storage: Storage) -> bool:
    return any(g.gw == GW and g.online for g in await storage.list_gateways())
