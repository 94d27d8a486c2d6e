"""`central alarms …` and `central commands …` (issue 15): the duty officer's work from a
shell, through central's HTTP API as the logged-in user (central.cli.operator). Acks,
comments and commands are audited at central under that user's name.
"""

from __future__ import annotations

import enum
import json
import time
from typing import Annotated, Any

import typer

from central.alarms.lifecycle import AckState
from central.cli.operator import (
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
from central.cli.output import error, say
from central.cli.remote import Api
from protocols.command_results import CommandState
from protocols.commands import CommandKind

LEVELS = {1: "一级", 2: "二级"}
AlarmId = Annotated[int, typer.Argument(help="The alarm's id.", min=1)]

# --- alarms -----------------------------------------------------------------------------------

alarms_app = sub_app("alarms", "Alarms: list, show, acknowledge (确认), comment (备注), clear.", [
    "central alarms list", "central alarms list --state all --gw wh-qingshan-02 --json",
    "central alarms show 42", "central alarms ack 42 --comment '已通知企业'",
    "central alarms comment 42 '现场已处置'"])



class AlarmFilter(enum.StrEnum):
    ACTIVE = "active"
    CLEARED = "cleared"
    ALL = "all"


def _alarm_row(a: dict[str, Any]) -> list[Any]:
    return [a["id"], LEVELS.get(a["level"], a["level"]), a["state"],
            "yes" if a["ack_state"] == "acknowledged" else "NO", a["gw"],
            a.get("name_zh") or a.get("point") or a["device"], a["value"], a.get("area_name"),
            when(a["raised_ms"], short=True)]


ALARM_COLUMNS = ["id", "level", "state", "acked", "gateway", "point", "value", "area", "raised"]


@alarms_app.command("list", short_help="Alarms in your area, active first.  "
                                       "e.g. central alarms list --ack unacknowledged")
def alarms_list(
    state: Annotated[AlarmFilter, typer.Option(
        help="active, cleared or all.")] = AlarmFilter.ACTIVE,
    ack: Annotated[AckState | None, typer.Option(help="unacknowledged or acknowledged.")] = None,
    gw: Annotated[str | None, typer.Option("--gw", help="Only this gateway's.")] = None,
    area: Annotated[str | None, typer.Option(help="This area (code or id) and all under "
                                                  "it.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 200,
    json_out: JsonOpt = False,
) -> None:
    """Alarms in your area: active first, then by severity, newest first.

    Example: central alarms list --state all --gw wh-qingshan-02 --json
    """
    def body(api: Api) -> Any:
        area_id = find_area(api, area)["id"] if area is not None else None
        return api.get("/api/alarms", state=str(state), ack=None if ack is None else str(ack),
                       gw=gw, area=area_id, limit=limit)

    rows = call(body)
    if json_out:
        emit_json(rows)
        return
    show_table(ALARM_COLUMNS, [_alarm_row(a) for a in rows])


@alarms_app.command("show", short_help="One alarm and its history.  e.g. central alarms show 42")
def alarms_show(alarm_id: AlarmId,
                json_out: JsonOpt = False) -> None:
    """One alarm with its whole history: raised, level changes, acks, comments, clears.

    Example: central alarms show 42 --json
    """
    a = call(lambda api: api.get(f"/api/alarms/{alarm_id}"))
    if json_out:
        emit_json(a)
        return
    show_fields(a, ["id", "gw", "device", "point", "name_zh", "type", "level", "state",
                    "ack_state", "value", "unit", "threshold", "area_name", "raised_ms",
                    "cleared_ms", "acked_by", "acked_ms", "ack_comment"])
    show_table(["at", "action", "source", "level", "value", "user", "comment"],
               [[when(h["ts_ms"], short=True), h["action"], h["source"], h["level"], h["value"],
                 h["user"], h["comment"]] for h in a["history"]], title="history")


def _alarm_action(alarm_id: int, action: str, comment: str, json_out: bool) -> None:
    a = call(lambda api: api.post(f"/api/alarms/{alarm_id}/{action}", {"comment": comment}))
    if json_out:
        emit_json(a)
        return
    say(out, f"alarm {a['id']} ({a['gw']} {a.get('name_zh') or a.get('point')}): "
             f"{a['state']}, {a['ack_state']}")


@alarms_app.command("ack", short_help="Acknowledge an alarm (operator).  "
                                      "e.g. central alarms ack 42 --comment '已通知'")
def alarms_ack(alarm_id: AlarmId, comment: Annotated[str, typer.Option(
        help="Why, or what was done.")] = "", json_out: JsonOpt = False) -> None:
    """Acknowledge (确认) an alarm as yourself; exits 1 if it is acknowledged already.

    Example: central alarms ack 42 --comment '已通知企业安全员'
    """
    _alarm_action(alarm_id, "ack", comment, json_out)


@alarms_app.command("comment", short_help="Add a comment to an alarm (operator).  "
                                          "e.g. central alarms comment 42 '现场已处置'")
def alarms_comment(alarm_id: AlarmId,
                   text: Annotated[str, typer.Argument(help="The comment.")],
                   json_out: JsonOpt = False) -> None:
    """Add a comment (备注) to the alarm's history, in any state.

    Example: central alarms comment 42 '现场已处置，浓度回落'
    """
    _alarm_action(alarm_id, "comment", text, json_out)


@alarms_app.command("clear", short_help="Clear an alarm by hand (operator).  "
                                        "e.g. central alarms clear 42 --comment '误报'")
def alarms_clear(alarm_id: AlarmId, comment: Annotated[str, typer.Option(help="Why.")] = "",
                 json_out: JsonOpt = False) -> None:
    """Clear (清除) an alarm by hand, also while the gateway still reports it (recorded).

    Example: central alarms clear 42 --comment '传感器检修，误报'
    """
    _alarm_action(alarm_id, "clear", comment, json_out)


# --- commands ---------------------------------------------------------------------------------

commands_app = sub_app("commands", "Signed commands to gateways: list, show, send, approve.", [
    "central commands list --gw wh-qingshan-02",
    "central commands send wh-qingshan-02 write_point --arg device=gas-1 "
    "--arg point=sample_interval_s --arg value=30",
    "central commands send gw-1 sync_time --yes --json", "central commands show 3f2c…",
    "central commands approve 3f2c…"])

COMMAND_COLUMNS = ["command", "gateway", "kind", "target", "state", "reason", "by", "updated"]


def _command_row(c: dict[str, Any]) -> list[Any]:
    return [c["cmd_id"], c["gw"], c["kind"], c["target"], c["state"], c["reason"],
            c["issued_by"], when(c["updated_ms"], short=True)]


@commands_app.command("list", short_help="Commands, newest first.  "
                                         "e.g. central commands list --gw gw-1")
def commands_list(
    gw: Annotated[str | None, typer.Option("--gw", help="Only this gateway's.")] = None,
    state: Annotated[CommandState | None, typer.Option(help="Only in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="At most this many.")] = 100,
    json_out: JsonOpt = False,
) -> None:
    """Commands in your area, newest first, with their state.

    Example: central commands list --state failed --json
    """
    rows = call(lambda api: api.get("/api/commands", gw=gw,
                                    state=None if state is None else str(state), limit=limit))
    if json_out:
        emit_json(rows)
        return
    show_table(COMMAND_COLUMNS, [_command_row(c) for c in rows])


@commands_app.command("show", short_help="One command and its history.  "
                                         "e.g. central commands show CMD_ID")
def commands_show(cmd_id: Annotated[str, typer.Argument(help="The command's id.")],
                  json_out: JsonOpt = False) -> None:
    """One command: its state and every step (pending, sent, received, executing, result).

    Example: central commands show 3f2c9a… --json
    """
    c = call(lambda api: api.get(f"/api/commands/{cmd_id}"))
    if json_out:
        emit_json(c)
        return
    show_fields(c, ["cmd_id", "gw", "kind", "target", "args", "state", "reason", "detail",
                    "result", "issued_by", "approval", "approved_by", "sent_count",
                    "created_ms", "expires_at_ms"])
    show_table(["at", "state", "source", "reason", "detail"],
               [[when(e["ts_ms"], short=True), e["state"], e["source"], e["reason"], e["detail"]]
                for e in c["history"]], title="history")


@commands_app.command("approve", short_help="Approve another operator's safety-critical "
                                            "write (operator).  e.g. central commands approve "
                                            "CMD_ID")
def commands_approve(cmd_id: Annotated[str, typer.Argument(help="The command's id (`central "
                                                                "commands list` shows it).")],
                     yes: YesOpt = False,
                     json_out: JsonOpt = False) -> None:
    """Approve a write to a safety-critical point (a relay, a valve) that another operator
    issued: it is signed and sent next. Shows the command and asks first unless --yes. The
    operator who issued it cannot approve it, nor can anyone approve a command that waits for
    no approval (central refuses: 409, exit 1). Audited under your name.

    Example: central commands approve 3f2c9a… --yes
    """
    if not yes:
        c = call(lambda api: api.get(f"/api/commands/{cmd_id}"))
        say(err, f"approve {c['kind']} {c['target']} on {c['gw']} with "
                 f"{json.dumps(c['args'], ensure_ascii=False)}, issued by {c['issued_by']} "
                 f"({c['state']}, approval {c['approval'] or 'not needed'})")
        confirm("Approve it?", yes, "not approved")
    c = call(lambda api: api.post(f"/api/commands/{cmd_id}/approve"))
    if json_out:
        emit_json(c)
        return
    say(out, f"command {c['cmd_id']} to {c['gw']} approved by {c['approved_by']} (issued by "
             f"{c['issued_by']}): {c['state']}; follow it with "
             f"`central commands show {c['cmd_id']}`")


def parse_args(pairs: list[str], raw: str | None) -> dict[str, Any]:
    """`--arg key=value` (a value that reads as JSON is taken as JSON: 30, true, "x") and
    `--args-json '{...}'` merged, the pairs last."""
    args: dict[str, Any] = {}
    if raw is not None:
        try:
            loaded = json.loads(raw)
        except ValueError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--args-json") from exc
        if not isinstance(loaded, dict):
            raise typer.BadParameter("must be a JSON object", param_hint="--args-json")
        args.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not key=value", param_hint="--arg")
        try:
            args[key] = json.loads(value)
        except ValueError:
            args[key] = value
    return args


@commands_app.command("send", short_help="Issue a signed command, after a confirmation "
                                         "(operator).  e.g. central commands send gw-1 sync_time")
def commands_send(
    gw: Annotated[str, typer.Argument(help="The gateway.")],
    kind: Annotated[CommandKind, typer.Argument(help="What to do.")],
    arg: Annotated[list[str] | None, typer.Option(
        "--arg", help="An argument as key=value (repeat it).")] = None,
    args_json: Annotated[str | None, typer.Option(
        "--args-json", help="All arguments as a JSON object.")] = None,
    ttl: Annotated[float, typer.Option("--ttl", min=1, help="Seconds until it expires if "
                                                            "not executed.")] = 3600.0,
    yes: YesOpt = False,
    wait: Annotated[float, typer.Option("--wait", min=0, help="Follow it up to this many "
                                        "seconds until it ends; exit 1 unless it succeeded."
                                        )] = 0.0,
    json_out: JsonOpt = False,
) -> None:
    """Issue a command to a gateway. Central checks it against the device profile, signs it
    and sends it when the gateway is online (a safety-critical write first waits for a second
    operator: `approval: required`). Asks before sending unless --yes. With --wait, follows
    it until it succeeded (exit 0) or failed, was rejected or expired (exit 1).

    Example: central commands send gw-1 write_point --arg device=gas-1 --arg point=p1 --arg value=30
    """
    args = parse_args(arg or [], args_json)
    if not yes:
        shown = json.dumps(args, ensure_ascii=False)
        say(err, f"send {kind} to {gw} with {shown} (expires in {ttl:g} s)")
        confirm("Send it?", yes, "not sent")
    c = call(lambda api: api.post("/api/commands", {"gw": gw, "kind": str(kind), "args": args,
                                                    "ttl_s": ttl}))
    if wait > 0:
        c = call(lambda api: follow(api, c, wait))
    if json_out:
        emit_json(c)
    else:
        approval = (" (waits for a second operator's approval)"
                    if c.get("approval") == "required" else "")
        say(out, f"command {c['cmd_id']} to {c['gw']}: {c['state']}{approval}; follow it with "
                 f"`central commands show {c['cmd_id']}`")
    if wait > 0 and c["state"] != CommandState.SUCCEEDED:
        reason = f" ({c['reason']})" if c.get("reason") else ""
        error(err, f"command {c['cmd_id']} is {c['state']}{reason}"
              + ("" if c["state"] in FINAL else f" after {wait:g} s"))
        raise typer.Exit(1)


FINAL = frozenset({CommandState.SUCCEEDED, CommandState.FAILED, CommandState.REJECTED,
                   CommandState.EXPIRED})
POLL_S = 0.5


def follow(api: Api, c: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The command as it is when it ends, or after `seconds`."""
    deadline = time.monotonic() + seconds
    while c["state"] not in FINAL and time.monotonic() < deadline:
        time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        c = api.get(f"/api/commands/{c['cmd_id']}")
    return c
