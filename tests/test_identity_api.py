"""People, roles, area scope, checked and approved commands, and the audit log (DESIGN.md §8),
through the HTTP API on real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Mount

from central.app import create_app
from central.areas.tree import assign_gateway, create_area
from central.config.settings import Settings
from central.identity.authz import is_public
from central.storage import Storage
from central.storage.program import Program, Sql
from protocols.command_results import CommandResult, CommandState, result_attrs
from protocols.envelope import Birth, DataBatch, DeviceInfo, PointInfo, Record, RecordKind, State
from tests.helpers import Mosquitto
from tests.identity import PASSWORD, auth, ensure_user, token_for
from tests.pg import pg_schema

T0 = 1_700_000_000_000
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Env:
    app: FastAPI
    c: httpx.AsyncClient  # no credentials of its own
    db_url: str
    kind: str

    @property
    def storage(self) -> Storage:
        return self.app.state.storage  # type: ignore[no-any-return]

    async def token(self, name: str, role: str = "operator", area: str | None = None) -> dict[str, str]:
        return auth(await token_for(self.app, self.c, name, role, area))


async def _birth(storage: Storage, gw: str) -> None:
    await storage.record_state(gw, State(online=True, boot_id="b", version="0.1.0", bearer="4g",
                                         backlog=0, ts_ms=now_ms()))
    await storage.record_birth(gw, Birth(gw=gw, stream=f"s-{gw}", boot_id="b", version="0.1.0",
                                         devices=(DeviceInfo(
        id="gas-1", profile="gas-detector-v1", profile_hash="h", points=(
            PointInfo(ordinal=0, key="gas-1/gas_lel", name_zh="可燃气体浓度", unit="%LEL"),
            PointInfo(ordinal=1, key="gas-1/sample_interval_s", name_zh="采样间隔", unit="s"),
            PointInfo(ordinal=2, key="gas-1/relay_test", name_zh="报警继电器测试", unit=""))),)))
    # one alarm per gateway, raised by the edge
    await storage.write_batches([DataBatch(gw=gw, stream=f"s-{gw}", records=(Record(
        seq=1, kind=RecordKind.ALARM, ts_ms=T0, point="gas-1/gas_lel", value=57.5,
        attrs={"alarm_id": "gas-1/gas_lel/high", "rule": "high", "state": "raised",
               "level": 2, "prev_level": 0, "threshold": 50.0, "since_ms": T0}),))])


async def _tree(storage: Storage) -> None:
    """City c / districts d1 (site1: gw-a) and d2 (site2: gw-c)."""
    city = await create_area(storage, parent_id=None, level="city", code="c", name_zh="武汉市")
    d1 = await create_area(storage, parent_id=city.id, level="district", code="d1",
                           name_zh="江岸区")
    d2 = await create_area(storage, parent_id=city.id, level="district", code="d2",
                           name_zh="青山区")
    s1 = await create_area(storage, parent_id=d1.id, level="site", code="site1",
                           name_zh="示范企业", kind="enterprise")
    s2 = await create_area(storage, parent_id=d2.id, level="site", code="site2",
                           name_zh="监测站", kind="station")
    await assign_gateway(storage, "gw-a", s1.id)
    await assign_gateway(storage, "gw-c", s2.id)


@contextlib.contextmanager
def database(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path}/central.db"
    else:
        with pg_schema() as url:
            yield url


@contextlib.asynccontextmanager
async def running(kind: str, tmp_path: Path, broker: Mosquitto | None = None,
                  db_url: str | None = None, **extra: Any) -> AsyncIterator[Env]:
    async with contextlib.AsyncExitStack() as stack:
        url = db_url or stack.enter_context(database(kind, tmp_path))
        mqtt = {"mqtt_port": broker.port} if broker else {}
        settings = Settings(db_url=url, offline_after_s=60, pki_dir=tmp_path / "pki",
                            command_key_path=tmp_path / "command-key.pem", **mqtt, **extra)
        app = create_app(settings, run_ingest=broker is not None)
        await stack.enter_async_context(app.router.lifespan_context(app))
        c = await stack.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://central"))
        storage = app.state.storage
        await _tree(storage)
        for gw in ("gw-a", "gw-c"):
            await _birth(storage, gw)
        yield Env(app, c, url, kind)


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    async with running(request.param, tmp_path) as e:
        yield e


def _concrete(path: str) -> str:
    """A route path with its parameters filled in (`{alarm_id}` -> 1, others -> x)."""
    return re.sub(r"\{([a-z_]+)(:[a-z]+)?\}",
                  lambda m: "1" if m.group(1).endswith("_id") else "gw-a", path)


def _operations(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, mounts included, so a new route cannot escape."""
    ops = []
    for r in app.routes:
        if isinstance(r, APIRoute) or hasattr(r, "methods"):
            for m in sorted(getattr(r, "methods", None) or {"GET"}):
                if m != "HEAD":
                    ops.append((m, _concrete(r.path)))  # type: ignore[attr-defined]
        elif isinstance(r, Mount):
            ops.append(("GET", r.path + "/x.js"))
    return ops


STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
SELF_SERVICE = {"/api/logout", "/api/me/password"}  # every logged-in user may


# --- authentication -----------------------------------------------------------------------


async def test_every_endpoint_but_the_public_ones_answers_401_without_login(env: Env) -> None:
    """Walking every route and mount: without a session each answers 401 problem+json."""
    ops = _operations(env.app)
    assert ("POST", "/api/commands") in ops and ("GET", "/docs") in ops
    assert len([o for o in ops if o[0] in STATE_CHANGING]) >= 10
    checked = 0
    for method, path in ops:
        if is_public(path):
            continue
        r = await env.c.request(method, path, json={})
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json", (method, path)
        assert r.json()["status"] == 401
        checked += 1
    assert checked >= 25
    # a browser asking for the console is sent to the login page instead
    r = await env.c.get("/", headers={"Accept": "text/html"})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    # a made-up token is no better than none
    r = await env.c.get("/api/gateways", headers=auth("not-a-token"))
    assert r.status_code == 401


async def test_websocket_without_session_is_closed(env: Env) -> None:
    """A websocket to any path (none is served today) is closed with 1008 without a user."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await env.app({"type": "websocket", "path": "/ws/live", "raw_path": b"/ws/live",
                   "headers": [], "query_string": b"", "scheme": "ws", "root_path": "",
                   "client": ("127.0.0.1", 1), "server": ("central", 80)}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_public_endpoints_answer_without_login(env: Env) -> None:
    """Health, the login page and its assets need no session."""
    assert (await env.c.get("/api/health")).status_code == 200
    page = await env.c.get("/login")
    assert page.status_code == 200 and "登录" in page.text
    assert (await env.c.get("/static/login.js")).status_code == 200


async def test_cookie_session_needs_csrf_token_and_logout_ends_it(env: Env) -> None:
    """The console's cookie is HttpOnly and SameSite=Strict; a state change without the
    CSRF header is 403, with it allowed; after logout the cookie opens nothing."""
    await ensure_user(env.app, "duty-1", "operator")
    r = await env.c.post("/api/login", json={"name": "duty-1", "password": PASSWORD,
                                             "kind": "cookie"})
    assert r.status_code == 200, r.text
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    csrf = r.json()["csrf"]
    assert r.json()["token"] is None  # the token is only in the HttpOnly cookie
    me = await env.c.get("/api/me")
    assert me.status_code == 200 and me.json()["user"]["name"] == "duty-1"
    (alarm,) = (await env.c.get("/api/alarms", params={"gw": "gw-a"})).json()
    no_csrf = await env.c.post(f"/api/alarms/{alarm['id']}/comment", json={"comment": "到场"})
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.json()["title"]
    ok = await env.c.post(f"/api/alarms/{alarm['id']}/comment", json={"comment": "到场"},
                          headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200, ok.text
    out = await env.c.post("/api/logout", headers={"X-CSRF-Token": csrf})
    assert out.status_code == 204
    env.c.cookies.clear()
    env.c.cookies.set("fl_session", re.search(r"fl_session=([^;]+)", cookie).group(1))  # type: ignore[union-attr]
    assert (await env.c.get("/api/me")).status_code == 401


def _unused_for(ms: int) -> Program[None]:
    """Every session as if its token had not been used for another `ms`."""
    yield Sql("UPDATE sessions SET last_used_ms = last_used_ms - ?", (ms,))


async def test_idle_session_is_logged_out(tmp_path: Path) -> None:
    """A token unused for longer than session_idle_s gets 401, one used within it does not."""
    # The idleness is written into the session's row rather than slept: a busy box may take
    # longer than any short idle timeout between two requests.
    async with running("sqlite", tmp_path, session_idle_s=60) as e:
        h = await e.token("duty-1")
        assert (await e.c.get("/api/me", headers=h)).status_code == 200
        await e.storage.run(lambda: _unused_for(50_000))
        assert (await e.c.get("/api/me", headers=h)).status_code == 200  # and touched now
        await e.storage.run(lambda: _unused_for(61_000))
        assert (await e.c.get("/api/me", headers=h)).status_code == 401
        assert (await e.c.get("/api/me", headers=h)).status_code == 401  # the session is gone


async def test_failed_logins_are_throttled_and_counted(env: Env) -> None:
    """An unknown name fails like a wrong password; five wrong passwords answer 401, the
    sixth attempt, even right, is 429 with Retry-After; /metrics counts both."""
    await ensure_user(env.app, "duty-1", "operator")
    unknown = await env.c.post("/api/login", json={"name": "nobody", "password": "whatever-123"})
    assert unknown.status_code == 401
    assert unknown.json()["detail"] == "wrong user name or password"
    for _ in range(5):
        r = await env.c.post("/api/login", json={"name": "duty-1", "password": "wrong-guess-1"})
        assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json"
    r = await env.c.post("/api/login", json={"name": "duty-1", "password": PASSWORD})
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    h = await env.token("viewer-1", "viewer")
    text = (await env.c.get("/metrics", headers=h)).text
    assert 'fieldlink_central_logins_total{outcome="failed"} 6' in text
    assert 'fieldlink_central_logins_total{outcome="throttled"} 1' in text


# --- roles ----------------------------------------------------------------------------------


async def test_viewer_gets_403_on_every_state_changing_endpoint(env: Env) -> None:
    """A viewer may read but every POST/PUT (ack, clear, comment, commands, approve, areas,
    users, gateway placement) is 403; login, logout and their own password excepted."""
    h = await env.token("viewer-1", "viewer")
    assert (await env.c.get("/api/gateways", headers=h)).status_code == 200
    refused = 0
    for method, path in _operations(env.app):
        if method not in STATE_CHANGING or is_public(path) or path in SELF_SERVICE:
            continue
        r = await env.c.request(method, path, json={}, headers=h)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        refused += 1
    assert refused >= 10
    (alarm,) = (await env.c.get("/api/alarms", params={"gw": "gw-a"}, headers=h)).json()
    r = await env.c.post(f"/api/alarms/{alarm['id']}/ack", json={"comment": ""}, headers=h)
    assert r.status_code == 403
    r = await env.c.post("/api/commands", headers=h, json={
        "gw": "gw-a", "kind": "write_point",
        "args": {"device": "gas-1", "point": "sample_interval_s", "value": 30}})
    assert r.status_code == 403


async def test_audit_log_is_for_auditors_only(env: Env) -> None:
    """GET /api/audit: 200 for an auditor, 403 for an admin or an operator."""
    for role, status in (("auditor", 200), ("admin", 403), ("operator", 403)):
        h = await env.token(f"{role}-1", role)
        assert (await env.c.get("/api/audit", headers=h)).status_code == status, role
    h = await env.token("auditor-1", "auditor")
    v = (await env.c.get("/api/audit/verify", headers=h)).json()
    assert v["ok"] and v["rows"] >= 6


async def test_ack_names_the_logged_in_user(env: Env) -> None:
    """The acknowledging user is who is logged in; a `user` field in the body is refused."""
    h = await env.token("duty-1")
    (alarm,) = (await env.c.get("/api/alarms", params={"gw": "gw-a"}, headers=h)).json()
    forged = await env.c.post(f"/api/alarms/{alarm['id']}/ack", headers=h,
                              json={"user": "someone-else", "comment": ""})
    assert forged.status_code == 422
    r = await env.c.post(f"/api/alarms/{alarm['id']}/ack", headers=h, json={"comment": "已派人"})
    assert r.status_code == 200 and r.json()["acked_by"] == "duty-1"


# --- area scope -----------------------------------------------------------------------------


async def test_operator_of_one_district_sees_and_acts_only_there(env: Env) -> None:
    """An operator of d1: lists show only gw-a; gw-c (district d2) is 403 to read, ack or
    command; the tree starts at d1."""
    h = await env.token("d1-duty", "operator", area="d1")
    gws = [g["gw"] for g in (await env.c.get("/api/gateways", headers=h)).json()]
    assert gws == ["gw-a"]
    alarms = (await env.c.get("/api/alarms", headers=h)).json()
    assert {a["gw"] for a in alarms} == {"gw-a"}
    tree = (await env.c.get("/api/areas", headers=h)).json()
    assert [n["code"] for n in tree] == ["d1"]
    for path in ("/api/gateways/gw-c", "/api/gateways/gw-c/delivery",
                 "/api/devices/gw-c:gas-1/points", "/api/points/gw-c:gas-1:gas_lel/series"):
        r = await env.c.get(path, headers=h)
        assert r.status_code == 403, path
    admin = await env.token("root-admin", "admin")
    (other,) = (await env.c.get("/api/alarms", params={"gw": "gw-c"}, headers=admin)).json()
    r = await env.c.post(f"/api/alarms/{other['id']}/ack", json={"comment": ""}, headers=h)
    assert r.status_code == 403 and "outside" in r.json()["detail"]
    assert (await env.c.get(f"/api/alarms/{other['id']}", headers=h)).status_code == 403
    r = await env.c.post("/api/commands", headers=h, json={
        "gw": "gw-c", "kind": "write_point",
        "args": {"device": "gas-1", "point": "sample_interval_s", "value": 30}})
    assert r.status_code == 403
    ok = await env.c.post("/api/commands", headers=h, json={
        "gw": "gw-a", "kind": "write_point",
        "args": {"device": "gas-1", "point": "sample_interval_s", "value": 30}})
    assert ok.status_code == 201, ok.text
    await env.c.post("/api/commands", headers=admin, json={
        "gw": "gw-c", "kind": "request_diagnostics", "args": {}})
    listed = (await env.c.get("/api/commands", headers=h)).json()
    assert {c["gw"] for c in listed} == {"gw-a"}


# --- commands -------------------------------------------------------------------------------


async def test_writes_the_profile_refuses_are_422_and_never_signed(env: Env) -> None:
    """A non-writable point, a value out of the profile's range or the type's, and an unknown
    point are 422 naming the reason; no command row, nothing to sign."""
    h = await env.token("duty-1")
    cases = {
        ("gas_lel", 10): "not writable",
        ("sample_interval_s", 99_999): "outside 1..3600",
        ("sample_interval_s", 0): "outside 1..3600",
        ("sample_interval_s", -5): "outside",
        ("relay_test", 7): "does not fit",
        ("no_such_point", 1): "no point",
    }
    for (point, value), reason in cases.items():
        r = await env.c.post("/api/commands", headers=h, json={
            "gw": "gw-a", "kind": "write_point",
            "args": {"device": "gas-1", "point": point, "value": value}})
        assert r.status_code == 422, (point, value, r.text)
        assert reason in r.json()["detail"], (point, r.json())
    store = env.app.state.commands.service.store
    assert await store.list() == []
    assert await store.due() == []


async def test_safety_critical_write_waits_for_a_second_operator(env: Env) -> None:
    """relay_test is safety-critical: the command is not due (not signed or sent) until a
    different operator approves; the issuer's own approval is 409."""
    first, second = await env.token("duty-1"), await env.token("duty-2")
    r = await env.c.post("/api/commands", headers=first, json={
        "gw": "gw-a", "kind": "write_point",
        "args": {"device": "gas-1", "point": "relay_test", "value": True}})
    assert r.status_code == 201, r.text
    cmd = r.json()
    assert cmd["approval"] == "required" and cmd["issued_by"] == "duty-1"
    store = env.app.state.commands.service.store
    assert await store.due() == []
    own = await env.c.post(f"/api/commands/{cmd['cmd_id']}/approve", headers=first)
    assert own.status_code == 409 and "second operator" in own.json()["detail"]
    assert await store.due() == []
    ok = await env.c.post(f"/api/commands/{cmd['cmd_id']}/approve", headers=second)
    assert ok.status_code == 200, ok.text
    assert ok.json()["approval"] == "approved" and ok.json()["approved_by"] == "duty-2"
    assert [c.cmd_id for c in await store.due()] == [cmd["cmd_id"]]
    again = await env.c.post(f"/api/commands/{cmd['cmd_id']}/approve", headers=second)
    assert again.status_code == 409
    plain = await env.c.post("/api/commands", headers=first, json={
        "gw": "gw-a", "kind": "write_point",
        "args": {"device": "gas-1", "point": "sample_interval_s", "value": 30}})
    assert plain.json()["approval"] is None


# --- the audit log --------------------------------------------------------------------------


def _verify(db_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "central", "audit", "verify", "--db", db_url],
                          capture_output=True, text=True, timeout=120, check=False)


def _tamper(kind: str, db_url: str, sql: str) -> None:
    """What an intruder with database access would do: drop the guard, change history."""
    if kind == "sqlite":
        import sqlite3

        con = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        con.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        con.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
        con.execute(sql)
        con.commit()
        con.close()
    else:
        with psycopg.connect(db_url, autocommit=True) as con:
            con.execute("DROP TRIGGER IF EXISTS audit_log_no_change ON audit_log")
            con.execute(sql)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_audit_log_holds_every_action_and_verify_catches_an_edit(
        kind: str, tmp_path: Path, mosquitto: Mosquitto) -> None:
    """Logins (ok, failed), user/area/gateway changes, ack/clear/comment, commands issued,
    approved, signed and their result all land in the chain; `central audit verify` passes,
    then exits 1 naming the row after one is edited, and the row after one is removed."""
    with database(kind, tmp_path) as url:
        await _audited_actions_then_tamper(kind, tmp_path, mosquitto, url)


async def _audited_actions_then_tamper(kind: str, tmp_path: Path, mosquitto: Mosquitto,
                                       url: str) -> None:
    async with running(kind, tmp_path, mosquitto, db_url=url) as e:
        admin = await e.token("root-admin", "admin")
        op1, op2 = await e.token("duty-1"), await e.token("duty-2")
        await e.c.post("/api/login", json={"name": "duty-1", "password": "wrong-guess-1"})
        r = await e.c.post("/api/users", headers=admin, json={
            "name": "d2-viewer", "role": "viewer", "area": "d2", "password": "Viewer-pass-42"})
        assert r.status_code == 201, r.text
        r = await e.c.post("/api/areas", headers=admin, json={
            "parent_id": 2, "level": "site", "code": "site3", "name_zh": "新站", "kind": "station"})
        assert r.status_code == 201, r.text
        r = await e.c.put("/api/gateways/gw-new/area", headers=admin, json={"area_id": r.json()["id"]})
        assert r.status_code == 200, r.text
        (alarm,) = (await e.c.get("/api/alarms", params={"gw": "gw-a"}, headers=op1)).json()
        for action in ("comment", "ack", "clear"):
            r = await e.c.post(f"/api/alarms/{alarm['id']}/{action}", headers=op1,
                               json={"comment": f"{action} 测试"})
            assert r.status_code == 200, r.text
        safe = await e.c.post("/api/commands", headers=op1, json={
            "gw": "gw-a", "kind": "write_point",
            "args": {"device": "gas-1", "point": "relay_test", "value": True}})
        cmd_id = safe.json()["cmd_id"]
        assert (await e.c.post(f"/api/commands/{cmd_id}/approve", headers=op2)).status_code == 200
        service = e.app.state.commands.service
        deadline = time.monotonic() + 30
        while (await service.store.get(cmd_id)).sent_count == 0:  # the dispatcher signs it
            assert time.monotonic() < deadline, "command not published"
            await e.app.state.storage.record_state("gw-a", State(
                online=True, boot_id="b", version="0.1.0", bearer="4g", backlog=0, ts_ms=now_ms()))
            await asyncio.sleep(0.2)
        res = CommandResult(cmd_id, CommandState.SUCCEEDED, kind="write_point")
        await service.apply_batch(DataBatch(gw="gw-a", stream="s-gw-a", records=(Record(
            seq=2, kind=RecordKind.CMD_RESULT, ts_ms=now_ms(), point=None, value=None,
            attrs=result_attrs(res)),)))
        await e.c.post("/api/logout", headers=op2)
        rows = await e.app.state.audit.entries(limit=1000, newest_first=False)
    actions = {r.action for r in rows}
    assert {"login.ok", "login.failed", "logout", "user.created", "area.created",
            "gateway.placed", "alarm.comment", "alarm.ack", "alarm.clear", "command.issued",
            "command.approved", "command.signed", "command.result"} <= actions, actions
    by = {(r.action, r.actor) for r in rows}
    assert ("alarm.ack", "duty-1") in by and ("command.approved", "duty-2") in by
    assert ("command.result", "gateway:gw-a") in by
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))

    good = _verify(e.db_url)
    assert good.returncode == 0, good.stderr + good.stdout
    assert "intact" in good.stdout

    # the guard: the database itself refuses to change a row
    if kind == "sqlite":
        import sqlite3

        con = sqlite3.connect(e.db_url.removeprefix("sqlite:///"))
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute("UPDATE audit_log SET actor = 'x' WHERE seq = 1")
        con.close()
    else:
        with psycopg.connect(e.db_url, autocommit=True) as con, \
                pytest.raises(psycopg.Error, match="append-only"):
            con.execute("DELETE FROM audit_log WHERE seq = 1")

    ack_seq = next(r.seq for r in rows if r.action == "alarm.ack")
    _tamper(kind, e.db_url, f"UPDATE audit_log SET actor = 'duty-2' WHERE seq = {ack_seq}")
    bad = _verify(e.db_url)
    assert bad.returncode == 1
    assert f"row {ack_seq}" in bad.stderr, bad.stderr


@pytest.mark.parametrize("kind", BACKENDS)
async def test_audit_verify_names_a_removed_row(kind: str, tmp_path: Path) -> None:
    """Deleting a row in the middle, or the newest, is caught and named."""
    with database(kind, tmp_path) as url:
        async with running(kind, tmp_path, db_url=url) as e:
            for i in range(5):
                await e.app.state.audit.append("tester", "test.step", f"step:{i}", {"i": i})
        _tamper(kind, url, "DELETE FROM audit_log WHERE seq = 3")
        bad = _verify(url)
        assert bad.returncode == 1 and "row 3" in bad.stderr, bad.stderr
        _tamper(kind, url, "DELETE FROM audit_log WHERE seq >= 3")
        bad = _verify(url)
        assert bad.returncode == 1 and "row 3" in bad.stderr, bad.stderr
