"""The operator CLI (issue 15): `central login|logout`, `central gateways …`, `central areas …`,
and the helpers `central alarms …` / `central commands …` (central.cli.duty) share.

Every command talks to a running central's HTTP API as the user logged in with `central login`
(DESIGN.md §8: the API checks the role and the area, and audits each change). Read commands
take `--json`; errors are one line and exit 1 (401: log in first; 403: the role or area does
not allow it; central unreachable), usage errors exit 2.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from central.areas.tree import AreaLevel
from central.cli import output
from central.cli.options import JsonOpt, YesOpt
from central.cli.output import when
from central.cli.remote import (
    Api,
    CliError,
    NotLoggedInError,
    forget_session,
    load_session,
    login,
    save_session,
    session_path,
)

T = TypeVar("T")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)  # an error stays one line, however long
SETTINGS = {"help_option_names": ["-h", "--help"]}


def sub_app(name: str, help_: str, examples: list[str]) -> typer.Typer:
    return typer.Typer(name=name, help=help_, no_args_is_help=True, context_settings=SETTINGS,
                       epilog="Examples\n\n" + "\n\n".join(examples))


def call(body: Callable[[Api], T]) -> T:
    """Run `body` with a client for the saved session; a CLI error is one line and exit 1."""
    try:
        session = load_session(session_path(os.environ))
        with Api.from_session(session) as api:
            return body(api)
    except CliError as exc:
        output.error(err, exc)
        raise typer.Exit(1) from exc


def emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, ensure_ascii=False, indent=2))


def human(value: Any) -> str:
    """A value for people: yes/no for a bool, a float to 6 significant digits (`21.3`, not
    `21.299999999999997`), '-' for none; JSON for a list or object."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.6g}"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def show_table(columns: list[str], rows: list[list[Any]], title: str | None = None) -> None:
    """A table; the first column (the id others copy into the next command) is never cut."""
    out.print(output.table(columns, [[None if v is None else human(v) for v in row]
                                     for row in rows], title=title, keep_first=True))


def show_fields(data: dict[str, Any], keys: list[str]) -> None:
    """`key  value` lines: times (`*_ms`) in the duty room's zone, other values by `human`."""
    width = max(len(k) for k in keys)
    for k in keys:
        v = data.get(k)
        output.say(out, f"{k:<{width}}  {when(v) if k.endswith('_ms') else human(v)}")


# --- login / logout ---------------------------------------------------------------------------


def login_command(
    url: Annotated[str, typer.Option("--url", help="Central's address, e.g. "
                                                   "http://central.example:8080")],
    user: Annotated[str, typer.Option("--user", "-u", help="Your login name.")],
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from the first line of standard "
                                 "input.")] = False,
) -> None:
    """Log in to a running central once; later commands use the saved session.

    The session token goes to ~/.config/fieldlink/cli-session.json (or $FIELDLINK_CLI_TOKEN),
    readable by you only (0600). It is never printed. It ends after central's idle timeout,
    with `central logout`, or when your password changes.

    Example: central login --url http://127.0.0.1:8080 --user duty-01
    """
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            output.error(err, "--password-stdin: nothing on standard input")
            raise typer.Exit(1)
    else:
        password = str(typer.prompt("Password", hide_input=True))
    path = session_path(os.environ)
    try:
        session, who = login(url, user, password)
        save_session(path, session)
    except CliError as exc:
        output.error(err, exc)
        raise typer.Exit(1) from exc
    except OSError as exc:
        output.error(err, f"cannot save the session in {path}: {exc.strerror}")
        raise typer.Exit(1) from exc
    area = who.get("area") or "all areas"
    output.say(out, f"logged in to {session.url} as {who['name']} ({who['role']}, {area}); "
                    f"session saved in {path}")


def logout_command() -> None:
    """End the session at central and remove the saved session.

    Example: central logout
    """
    path = session_path(os.environ)
    try:
        session = load_session(path)
    except NotLoggedInError:
        out.print("not logged in")
        return
    except CliError as exc:
        output.error(err, exc)
        raise typer.Exit(1) from exc
    try:
        with Api.from_session(session) as api:
            api.post("/api/logout")
    except NotLoggedInError:
        pass  # the session had ended at central already
    except CliError as exc:
        output.error(err, f"{exc}; the saved session is removed anyway", "warning")
    forget_session(path)
    output.say(out, f"logged out of {session.url}")


# --- gateways ---------------------------------------------------------------------------------

gateways_app = sub_app("gateways", "Gateways as central sees them: list, show, place at a "
                                   "site, retire.", [
    "central gateways list", "central gateways show wh-qingshan-02 --json",
    "central gateways place wh-qingshan-02 420107-site-02",
    'central gateways retire wh-qingshan-02 --reason "replaced by wh-qingshan-05"'])
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why, for the record (audited).")]


@gateways_app.command("list", short_help="Gateways in your area.  e.g. central gateways list")
def gateways_list(json_out: JsonOpt = False) -> None:
    """Every gateway in your area: online, version, bearer, backlog, last heard.

    Example: central gateways list --json
    """
    rows = call(lambda api: api.get("/api/gateways"))
    if json_out:
        emit_json(rows)
        return
    show_table(["gateway", "online", "version", "bearer", "backlog", "missing", "last seen"],
               [[g["gw"], "yes" if g["online"] else "NO", g["version"], g["bearer"],
                 g["backlog"], g["missing"], when(g["last_seen_ms"], short=True)] for g in rows])


@gateways_app.command("show", short_help="One gateway, its devices and latest values.  "
                                         "e.g. central gateways show gw-1")
def gateways_show(gw: Annotated[str, typer.Argument(help="Gateway id.")],
                  json_out: JsonOpt = False) -> None:
    """One gateway: state, delivery, and each device's points with their latest values.

    Example: central gateways show wh-qingshan-02
    """
    g = call(lambda api: api.get(f"/api/gateways/{gw}"))
    if json_out:
        emit_json(g)
        return
    show_fields(g, ["gw", "online", "version", "bearer", "backlog", "held", "missing",
                    "reported_lost", "last_seen_ms"])
    rows = [[d["device"], d["profile"], p["point"], p.get("name_zh"),
             None if p["latest"] is None else p["latest"]["value"], p.get("unit"),
             when(None if p["latest"] is None else p["latest"]["ts_ms"], short=True)]
            for d in g["devices"] for p in d["points"]]
    show_table(["device", "profile", "point", "name", "value", "unit", "at"], rows)


def _walk(nodes: list[dict[str, Any]], depth: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    for n in nodes:
        yield depth, n
        yield from _walk(n["children"], depth + 1)


def area_names(api: Api) -> dict[int, str]:
    """The Chinese name of each area in your area tree, by id."""
    return {n["id"]: n["name_zh"] for _, n in _walk(api.get("/api/areas"))}


def find_area(api: Api, ref: str) -> dict[str, Any]:
    """The area with code `ref` (or, when no code matches, id `ref`) in your area tree."""
    nodes = [n for _, n in _walk(api.get("/api/areas"))]
    for n in nodes:
        if n["code"] == ref:
            return n
    for n in nodes:
        if ref.isdigit() and n["id"] == int(ref):
            return n
    raise CliError(f"no area with code or id {ref!r} in your area tree "
                   "(central areas list shows them)")


@gateways_app.command("place", short_help="Place a gateway at a site (admin).  "
                                          "e.g. central gateways place gw-1 420107-site-02")
def gateways_place(gw: Annotated[str, typer.Argument(help="Gateway id.")],
                   area: Annotated[str, typer.Argument(help="The site's area code (or id).")],
                   json_out: JsonOpt = False) -> None:
    """Say at which site a gateway stands (it may not have reported yet). Needs the admin
    role; both the site and the gateway's old place must lie in your area. Audited.

    Example: central gateways place wh-qingshan-02 420107-site-02
    """
    def body(api: Api) -> Any:
        site = find_area(api, area)
        return api.put(f"/api/gateways/{gw}/area", {"area_id": site["id"]})

    placed = call(body)
    if json_out:
        emit_json(placed)
        return
    a = placed["area"]
    output.say(out, f"{placed['gw']} now stands at {a['code']} {a['name_zh']} (area {a['id']})")


def confirm(question: str, yes: bool, refused: str = "nothing done") -> None:
    """Ask `question` on stderr unless `yes`; a no says `refused` and exits 1."""
    if not yes and not typer.confirm(question, default=False, err=True):
        output.say(err, refused)
        raise typer.Exit(1)


@gateways_app.command("retire", short_help="Take a gateway out of service, keeping its "
                                           "history (admin).  e.g. central gateways retire "
                                           "gw-1 --reason TEXT")
def gateways_retire(gw: Annotated[str, typer.Argument(help="Gateway id.")], reason: ReasonOpt,
                    force: Annotated[bool, typer.Option(
                        "--force", help="Clear and acknowledge its open alarms with the reason "
                                        "(else refused while it has any).")] = False,
                    yes: YesOpt = False, json_out: JsonOpt = False) -> None:
    """Retire (decommission) a gateway that was replaced or taken out of service: it leaves
    the map, the lists and the offline counts; its readings, alarms and audit rows stay
    readable; what it still sends is refused and counted; its certificates are revoked and
    its enrolment tokens voided (the production broker refuses it); its pending commands are
    cancelled. Refused (exit 1) while it has open alarms, unless --force. Needs the admin role.
    Audited with your name and the reason. Undo with `central gateways unretire`.

    Example: central gateways retire wh-qingshan-02 --reason "replaced by wh-qingshan-05"
    """
    confirm(f"retire {gw} ({reason}){' and clear its open alarms' if force else ''}?", yes)
    r = call(lambda api: api.post(f"/api/gateways/{gw}/retire",
                                  {"reason": reason, "force": force}))
    if json_out:
        emit_json(r)
        return
    output.say(out, f"{r['gw']} retired by {r['retired_by']}: {r['alarms_cleared']} alarm(s) "
                    f"cleared, {len(r['certificates_revoked'])} certificate(s) revoked, "
                    f"{r['tokens_voided']} token(s) voided, {len(r['commands_cancelled'])} "
                    "command(s) cancelled")


@gateways_app.command("unretire", short_help="Bring a retired gateway back (admin).  "
                                             "e.g. central gateways unretire gw-1 --reason TEXT")
def gateways_unretire(gw: Annotated[str, typer.Argument(help="Gateway id.")], reason: ReasonOpt,
                      yes: YesOpt = False, json_out: JsonOpt = False) -> None:
    """Bring a retired gateway back into service: its data is stored again. Its certificates
    stay revoked: give it a new enrolment token (`central gateway enroll-token`) to reconnect
    through the production broker. Needs the admin role. Audited.

    Example: central gateways unretire wh-qingshan-02 --reason "repaired, back on site"
    """
    confirm(f"bring {gw} back into service ({reason})?", yes)
    r = call(lambda api: api.post(f"/api/gateways/{gw}/unretire", {"reason": reason}))
    if json_out:
        emit_json(r)
        return
    output.say(out, f"{r['gw']} is back in service (retired {when(r['retired_ms'])} by "
                    f"{r['retired_by']}; {r['refused']} message(s) refused meanwhile)")


@gateways_app.command("retired", short_help="Retired gateways (admin).  "
                                            "e.g. central gateways retired")
def gateways_retired(json_out: JsonOpt = False) -> None:
    """The retired gateways in your area: when, by whom, why, and what they sent since
    (refused). Needs the admin role.

    Example: central gateways retired --json
    """
    rows = call(lambda api: api.get("/api/retired-gateways"))
    if json_out:
        emit_json(rows)
        return
    show_table(["gateway", "retired", "by", "reason", "refused", "last refused"],
               [[g["gw"], when(g["retired_ms"], short=True), g["retired_by"], g["reason"],
                 g["refused"], when(g["last_refused_ms"], short=True)] for g in rows])


# --- areas ------------------------------------------------------------------------------------

areas_app = sub_app("areas", "The area tree: city → district → street → community → site.", [
    "central areas list", "central areas list --json",
    "central areas add 420102-site-09 某危化企业 --level site --parent 420102-erqi-changjiang "
    "--kind enterprise",
    "central areas import examples/areas-wuhan.csv --dry-run", "central areas export areas.csv"])


@areas_app.command("list", short_help="The area tree from your area down.  "
                                      "e.g. central areas list")
def areas_list(json_out: JsonOpt = False) -> None:
    """The area tree (from your own area down), with the gateways at each site.

    Example: central areas list
    """
    tree = call(lambda api: api.get("/api/areas"))
    if json_out:
        emit_json(tree)
        return
    show_table(["area", "id", "level", "kind", "gateways"],
               [["  " * depth + f"{n['code']} {n['name_zh']}", n["id"], n["level"], n["kind"],
                 " ".join(n["gateways"]) or None] for depth, n in _walk(tree)])


@areas_app.command("add", short_help="Add an area under a parent (admin).  "
                                     "e.g. central areas add CODE NAME --level site --parent CODE")
def areas_add(
    code: Annotated[str, typer.Argument(help="The new area's code, unique.")],
    name_zh: Annotated[str, typer.Argument(help="Its name (Chinese).")],
    level: Annotated[AreaLevel, typer.Option("--level", help="city, district, street, "
                                                             "community or site.")],
    parent: Annotated[str | None, typer.Option(
        "--parent", help="The parent's code (or id); none for a root (the city).")] = None,
    kind: Annotated[str | None, typer.Option(
        "--kind", help="street|township, community|village, enterprise|station|"
                       "street_office.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Add an area one level under its parent. Needs the admin role (in your area). Audited.

    Example: central areas add 420102-site-09 某企业 --level site --parent 420102-erqi-changjiang
    """
    def body(api: Api) -> Any:
        parent_id = find_area(api, parent)["id"] if parent is not None else None
        return api.post("/api/areas", {"parent_id": parent_id, "level": str(level),
                                       "code": code, "name_zh": name_zh, "kind": kind})

    made = call(body)
    if json_out:
        emit_json(made)
        return
    output.say(out, f"added area {made['code']} {made['name_zh']} ({made['level']}, id "
                    f"{made['id']})")
