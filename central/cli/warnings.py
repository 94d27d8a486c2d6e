"""`central warnings …`: 叫应 warnings from a shell (DESIGN.md §7), through central's HTTP API as
the logged-in user (central.cli.operator), as the console's 叫应 board issues them. Issuing
asks first, naming what will sound, unless --yes; central checks every target against the
user's area and audits the warning under the user's name.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

import typer

from central.cli.operator import (
    area_names,
    call,
    confirm,
    emit_json,
    err,
    find_area,
    out,
    show_fields,
    show_table,
    sub_app,
    when,
)
from central.cli.options import JsonOpt, YesOpt
from central.cli.output import say
from central.cli.remote import Api
from protocols.callresp import Level

warnings_app = sub_app("warnings", "叫应 warnings: list, show, issue (operator).", [
    "central warnings list", "central warnings show w-3f2c… --json",
    "central warnings issue --level red --text '暴雨红色预警：请立即组织转移' --area 420102-s01",
    "central warnings issue --level blue --text '大风蓝色预警' --terminal JY-JA-0101 --yes"])


LEVEL_ZH = {"red": "红色", "orange": "橙色", "yellow": "黄色", "blue": "蓝色"}
WarningId = Annotated[str, typer.Argument(help="The warning's id (`central warnings list`).")]



def _many(what: str) -> Any:
    return typer.Option(help=f"{what} (repeat it for more).")


def _states(w: dict[str, Any]) -> str:
    counts = Counter(t["state"] for t in w.get("targets", ()))
    return ", ".join(f"{state} {n}" for state, n in sorted(counts.items())) or "-"


@warnings_app.command("list", short_help="Warnings in your area, newest first.  "
                                         "e.g. central warnings list --limit 20")
def warnings_list(limit: Annotated[int, typer.Option(min=1, max=1000, help="How many.")] = 50,
                  json_out: JsonOpt = False) -> None:
    """The 叫应 warnings whose targets lie in your area, newest first, with how many targets
    stand in each state (sent, delivered, answered, escalated, unanswered).

    Example: central warnings list --json
    """
    rows = call(lambda api: api.get("/api/callresp/warnings", limit=limit))
    if json_out:
        emit_json(rows)
        return
    show_table(["id", "level", "text", "issued", "by", "targets"],
               [[w["id"], LEVEL_ZH.get(w["level"], w["level"]), w["text"][:30],
                 when(w["created_ms"], short=True), w["created_by"], _states(w)] for w in rows])


@warnings_app.command("show", short_help="One warning: its targets and their steps.  "
                                         "e.g. central warnings show w-3f2c…")
def warnings_show(warning_id: WarningId, json_out: JsonOpt = False) -> None:
    """One warning with each target's state, attempts and times (sent, delivered, answered,
    escalated).

    Example: central warnings show w-3f2c9a41
    """
    w = call(lambda api: api.get(f"/api/callresp/warnings/{warning_id}"))
    if json_out:
        emit_json(w)
        return
    names = call(area_names)
    shown = {**w, "level": f"{LEVEL_ZH.get(w['level'], w['level'])} ({w['level']})",
             "answer_within_s": w["deadline_ms"] / 1000}
    show_fields(shown, ["id", "level", "text", "repeat", "answer_within_s", "max_resends",
                        "created_ms", "created_by"])
    show_table(["target", "kind", "area", "state", "attempts", "delivered", "answered", "by"],
               [[t["ref"], t["kind"], names.get(t["area_id"], t["area_id"]), t["state"],
                 t["attempts"], when(t["delivered_ms"], short=True),
                 when(t["answered_ms"], short=True), t["answered_by"]] for t in w["targets"]],
               title="targets")


def _body(api: Api, level: Level, text: str, repeat: int | None, areas: list[str],
          groups: list[str], persons: list[str], terminals: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {"level": str(level), "text": text,
                            "areas": [find_area(api, a)["id"] for a in areas],
                            "groups": groups, "persons": persons, "terminals": terminals}
    if repeat is not None:
        body["repeat"] = repeat
    return body


@warnings_app.command("issue", short_help="Issue a 叫应 warning, after a confirmation "
                                          "(operator).  e.g. central warnings issue --level red "
                                          "--text '…' --area 420102")
def warnings_issue(
    level: Annotated[Level, typer.Option(help="red, orange, yellow or blue.")],
    text: Annotated[str, typer.Option(help="What the terminals play (1-500 characters).")],
    area: Annotated[list[str] | None, _many("An area by code or id: all its terminals")] = None,
    group: Annotated[list[str] | None, _many("A terminal group's id")] = None,
    person: Annotated[list[str] | None, _many("A responsible person's id")] = None,
    terminal: Annotated[list[str] | None, _many("A terminal's id")] = None,
    repeat: Annotated[int | None, typer.Option(min=1, max=10, help="Plays per send (default: "
                                               "central's setting).")] = None,
    yes: YesOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Issue a 叫应 warning to areas (by code or id: every terminal under them), terminal
    groups, responsible persons and terminals (each option may be repeated). Central calls
    every target until it answers, re-sends, then escalates (README "叫应"). Asks before
    issuing unless --yes; central refuses targets outside your area (403, exit 1).

    Example: central warnings issue --level red --text '暴雨红色预警' --area 420102-s01 --person p-7
    """
    targets = {"area": area or [], "group": group or [], "person": person or [],
               "terminal": terminal or []}
    if not any(targets.values()):
        raise typer.BadParameter("name at least one --area, --group, --person or --terminal")
    if not text.strip():
        raise typer.BadParameter("the text is blank", param_hint="--text")
    body = call(lambda api: _body(api, level, text, repeat, targets["area"], targets["group"],
                                  targets["person"], targets["terminal"]))
    if not yes:
        named = "; ".join(f"{kind} {', '.join(refs)}" for kind, refs in targets.items() if refs)
        say(err, f"issue a {LEVEL_ZH[level]} ({level}) warning to {named}: {text}")
        confirm("The terminals will sound. Issue it?", yes, "not issued")
    w = call(lambda api: api.post("/api/callresp/warnings", body))
    if json_out:
        emit_json(w)
        return
    say(out, f"warning {w['id']} issued to {len(w['targets'])} target(s) ({_states(w)}); "
             f"follow it with `central warnings show {w['id']}` or on the console's 叫应 board")
    for sk in w.get("skipped", ()):
        whose = f" ({sk['person']}'s)" if sk.get("person") else ""
        say(err, f"left out terminal {sk['terminal']}{whose}: its gateway {sk['gw']} is "
                 "retired (网关已退役)")
