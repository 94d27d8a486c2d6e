"""叫应 at scale (DESIGN.md §7, issue 11 point 5): one red warning to `--terminals` terminals
of a street, on `--gateways` gateway stand-ins over a real Mosquitto and a real central
process; `--no-answer` of them never answer, so each is re-sent `resends` times and then
escalated to the district's person in charge (who answers). With `--kill`, central is
SIGKILLed once the first re-sends have reached the gateways, and restarted.

    python bench/callresp.py --terminals 200 --no-answer 20 [--kill] [--backend postgres]

Prints one JSON line: terminals, delivered, answered, resends, escalations, on_time_ratio
(re-sends and escalations that reached their gateway within 2 s of their due time),
max_lateness_s (the worst of them, at the gateway), central_max_lateness_s (when central
fired the step), and the durations.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the repo on sys.path)
import httpx
from _common import emit

from protocols.command_keys import parse_public_key
from tests.callresp_gw import TerminalGateway, terminal_fleet
from tests.fleet import Central
from tests.helpers import Mosquitto, wait_for
from tests.identity import bearer, cli_user
from tests.pg import pg_schema

ON_TIME_MS = 2000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--terminals", type=int, default=200)
    ap.add_argument("--no-answer", type=int, default=20)
    ap.add_argument("--gateways", type=int, default=10)
    ap.add_argument("--deadline-s", type=float, default=6.0, help="red deadline for the run")
    ap.add_argument("--resends", type=int, default=3)
    ap.add_argument("--kill", action="store_true", help="SIGKILL central after the first re-sends")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite",
                    help="postgres: a fresh schema on the test PostgreSQL (tests/pg.py), dropped after")
    a = ap.parse_args()
    if not 0 <= a.no_answer <= a.terminals or a.gateways < 1:
        ap.error("need 0 <= --no-answer <= --terminals and --gateways >= 1")
    rnd = random.Random(a.seed)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-callresp-"))
        db_url = stack.enter_context(pg_schema()) if a.backend == "postgres" else None
        work = Path(tmp)
        (work / "broker").mkdir()
        broker = Mosquitto(work / "broker")
        broker.start()
        cfg = work / "central.toml"
        cfg.write_text(f"[central.callresp]\ndeadline_red_s = {a.deadline_s}\n"
                       f"resends = {a.resends}\ntick_s = 0.2\n")
        central = Central(work, broker.port, db_url=db_url, extra_args=["--config", str(cfg)])
        fleet_stack = contextlib.ExitStack()
        try:
            central.start()
            admin = httpx.Client(base_url=central.base_url, timeout=30,
                                 headers=central.auth_headers())
            key = parse_public_key(admin.get("/api/keys/commands").json()["public_key"])
            names = [f"t-{i:04d}" for i in range(a.terminals)]
            silent = set(rnd.sample(names, a.no_answer))
            per_gw: dict[str, dict[str, float | None]] = {
                f"gw-bench-{g:02d}": {} for g in range(a.gateways)}
            gw_names = sorted(per_gw)
            for i, t in enumerate(names):
                per_gw[gw_names[i % a.gateways]][t] = None if t in silent else rnd.uniform(0.2, 2.0)
            per_gw[gw_names[0]]["d-boss"] = 0.5
            gws, _ = fleet_stack.enter_context(terminal_fleet(
                admin, broker.host, broker.port, central_key=key, answers=per_gw,
                online_timeout=30))
            city = admin.post("/api/areas", json={"level": "city", "code": "c",
                                                   "name_zh": "市"}).json()
            dist = admin.post("/api/areas", json={"parent_id": city["id"], "level": "district",
                                                   "code": "d", "name_zh": "区"}).json()
            street = admin.post("/api/areas", json={"parent_id": dist["id"], "level": "street",
                                                     "code": "s", "name_zh": "街道"}).json()
            for gw, answers in per_gw.items():
                for t in answers:
                    area = dist["id"] if t == "d-boss" else street["id"]
                    admin.put(f"/api/callresp/terminals/{t}", json={"gw": gw, "area_id": area}
                              ).raise_for_status()
            admin.put("/api/callresp/persons/p-boss", json={
                "name": "区领导", "area_id": dist["id"], "role": "in_charge",
                "terminals": ["d-boss"]}).raise_for_status()
            cli_user(central.db_url, "op", role="operator")
            op = httpx.Client(base_url=central.base_url, timeout=30,
                              headers=bearer(central.base_url, "op"))
            t_start = time.monotonic()
            rsp = op.post("/api/callresp/warnings", json={
                "level": "red", "text": "暴雨红色预警", "areas": [street["id"]]})
            rsp.raise_for_status()
            wid = rsp.json()["id"]

            def warning() -> dict[str, Any]:
                return admin.get(f"/api/callresp/warnings/{wid}").json()  # type: ignore[no-any-return]

            if a.kill and a.no_answer:
                # after the first re-sends reached the gateways: between two due times
                first = a.terminals + a.no_answer
                wait_for(lambda: sum(len(v) for g in gws.values() for v in g.plays.values())
                         >= first, timeout=a.deadline_s * 3 + 30, interval=0.1,
                         what="first re-sends played")
                central.kill()
                central.start()

            def done() -> dict[str, Any] | None:
                w = warning()
                open_ = [t for t in w["targets"] if t["due_ms"] is not None]
                boss = [t for t in w["targets"] if t["ref"] == "p-boss"]
                settled = not open_ and (not a.no_answer or (boss and boss[0]["answered_ms"]))
                return w if settled else None

            w = wait_for(done, timeout=(a.resends + 2) * a.deadline_s + 120, interval=0.5,
                         what="the warning to settle")
            elapsed = time.monotonic() - t_start
            emit(**summarise(w, gws, wid, a, elapsed))
        finally:
            fleet_stack.close()
            central.stop()
            broker.stop()
    return 0


def summarise(w: dict[str, Any], gws: dict[str, TerminalGateway], wid: str,
              a: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    by_id = {t["id"]: t for t in w["targets"]}
    terminals = [t for t in w["targets"] if t["kind"] == "terminal"]
    plays: dict[str, tuple[TerminalGateway, str]] = {}
    for g in gws.values():
        for (wid_, term), cmd_ids in g.plays.items():
            if wid_ == wid:
                for i, cmd in enumerate(cmd_ids):
                    plays[f"{cmd}/{term}"] = (g, str(g.play_times[(wid_, term)][i]))
    gateway_late: list[int] = []
    central_late: list[int] = []
    for s in w["steps"]:
        if s["due_ms"] is None:
            continue
        central_late.append(s["at_ms"] - s["due_ms"])
        if s["step"] == "resent":
            terms = by_id[s["target_id"]]["terminals"]
            cmds = s["detail"]["cmd_ids"]
        elif s["step"] == "escalated":
            to = by_id[s["detail"]["to_target"]]
            terms = to["terminals"]
            sent = [x for x in w["steps"] if x["target_id"] == to["id"] and x["step"] == "sent"]
            cmds = sent[0]["detail"]["cmd_ids"]
        else:
            continue
        times = [int(plays[f"{c}/{t}"][1]) for c in cmds for t in terms if f"{c}/{t}" in plays]
        gateway_late.append((min(times) - s["due_ms"]) if times else 10**9)
        if gateway_late[-1] > ON_TIME_MS:
            print(f"late: {s['step']} {s['target_id']} attempt {s['attempt']} due {s['due_ms']}"
                  f" fired +{s['at_ms'] - s['due_ms']} ms, played +{gateway_late[-1]} ms",
                  file=sys.stderr)
    total_plays = sum(len(v) for g in gws.values() for k, v in g.plays.items() if k[0] == wid)
    n = len(gateway_late)
    return {
        "terminals": len(terminals),
        "delivered": sum(1 for t in terminals if t["delivered_ms"] is not None),
        "answered": sum(1 for t in terminals if t["answered_ms"] is not None),
        "resends": sum(1 for s in w["steps"] if s["step"] == "resent"),
        "escalations": sum(1 for s in w["steps"] if s["step"] == "escalated"),
        "on_time_ratio": round(sum(1 for x in gateway_late if 0 <= x <= ON_TIME_MS) / n, 4)
        if n else 1.0,
        "max_lateness_s": round(max(gateway_late) / 1000, 3) if n else 0.0,
        "central_max_lateness_s": round(max(central_late) / 1000, 3) if central_late else 0.0,
        "plays": total_plays,
        "duplicate_deliveries": sum(g.duplicates for g in gws.values()),
        "killed": bool(a.kill),
        "backend": a.backend,
        "deadline_s": a.deadline_s,
        "elapsed_s": round(elapsed, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
