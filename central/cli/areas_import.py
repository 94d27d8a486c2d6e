"""`central areas import FILE` and `central areas export`: the area tree as a spreadsheet.

A bureau keeps its hundreds of areas (city → district → street → community → site) and their
map positions in a spreadsheet; adding them one `central areas add` at a time does not scale.
The file is CSV as Excel and WPS save it ("CSV UTF-8", with or without a BOM), one area a row:

    code,name_zh,level,parent_code,kind,lat,lon

Import checks the whole file against itself and against the tree central already has before
it changes anything, so a bad file (exit 2) lists every bad row by its line and writes
nothing. It is idempotent: an area whose code central has with the same fields is
"unchanged"; one with another name, kind, level or parent is a conflict and is left as it is
(central has no endpoint that renames or moves an area, and this command does not go around
the API); a position is filled in where central has none, and changed with `--update`.
Everything goes through the HTTP API as the logged-in admin (POST /api/areas and
PUT /api/areas/{id}/position), so central checks the role and the area and audits each change.

Levels follow central's rule (central.areas.tree): each level stands below its parent's, and
levels may be skipped going down (a site straight under a street, a forest station under a
township), as the demo tree does. Export writes the same columns, parents first, so a tree
round-trips.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from central.areas.tree import KINDS, RANK, AreaLevel, kind_problem, rank_problem
from central.cli import output
from central.cli.operator import call, confirm, emit_json, err, out, show_table
from central.cli.options import YesOpt
from central.cli.remote import Api, CliError

COLUMNS = ("code", "name_zh", "level", "parent_code", "kind", "lat", "lon")
REQUIRED = COLUMNS[:5]
CODE_MAX = 64  # AreaIn in central.alarms.api
NAME_MAX = 100
SAME_DEGREES = 1e-7  # about 1 cm: a position read back from central and written again
Position = tuple[float, float]


class AreaFileError(CliError):
    """The file cannot be read as a UTF-8 CSV with the expected header (exit 2)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Row:
    line: int  # where the row starts in the file, for the admin's spreadsheet
    code: str
    name_zh: str
    level: AreaLevel
    parent_code: str | None
    kind: str
    position: Position | None


@dataclass(frozen=True, slots=True)
class Known:
    """An area central already has (as GET /api/areas shows it to this user)."""

    id: int
    parent_code: str | None  # None for a root, or a parent outside the user's area
    level: AreaLevel
    name_zh: str
    kind: str
    position: Position | None


@dataclass(frozen=True, slots=True)
class Problem:
    line: int
    code: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.code or '(no code)'}: {self.reason}"


@dataclass(slots=True)
class Plan:
    """What importing a file would do; `errors` non-empty means nothing may be written."""

    add: list[Row] = field(default_factory=list)  # parents before children
    unchanged: list[Row] = field(default_factory=list)
    place: list[Row] = field(default_factory=list)  # existing areas to position
    conflicts: list[Problem] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)

    @property
    def positions(self) -> int:
        return len(self.place) + sum(1 for r in self.add if r.position is not None)


# --- reading and checking the file (no I/O) ---------------------------------------------------


def decode(path: Path, data: bytes) -> str:
    """The file's text; Excel on a Chinese Windows saves plain "CSV" in GBK, so say how to fix."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AreaFileError(path, f"not UTF-8 text (byte {exc.start}): save it as \"CSV UTF-8\" "
                                  "(Excel) or choose UTF-8 encoding (WPS)") from exc


def _position(lat: str, lon: str) -> tuple[Position | None, str | None]:
    if not lat and not lon:
        return None, None
    if not lat or not lon:
        return None, "lat and lon go together: give both or neither"
    try:
        la, lo = float(lat), float(lon)
    except ValueError:
        return None, f"lat/lon must be decimal degrees, not {lat!r}, {lon!r}"
    if not (math.isfinite(la) and -90 <= la <= 90):
        return None, f"lat {lat} is not between -90 and 90"
    if not (math.isfinite(lo) and -180 <= lo <= 180):
        return None, f"lon {lon} is not between -180 and 180"
    return (la, lo), None


def _row(line: int, cells: dict[str, str]) -> tuple[Row | None, list[str]]:
    """One row's own checks; the row (None when its level is unusable) and what is wrong."""
    reasons = []
    code, name = cells["code"], cells["name_zh"]
    if not code:
        reasons.append("code is empty")
    elif len(code) > CODE_MAX:
        reasons.append(f"code is longer than {CODE_MAX} characters")
    if not name:
        reasons.append("name_zh is empty")
    elif len(name) > NAME_MAX:
        reasons.append(f"name_zh is longer than {NAME_MAX} characters")
    position, bad_position = _position(cells.get("lat", ""), cells.get("lon", ""))
    if bad_position:
        reasons.append(bad_position)
    try:
        level = AreaLevel(cells["level"].lower())
    except ValueError:
        reasons.append(f"level {cells['level']!r} is not one of "
                       f"{', '.join(str(lv) for lv in AreaLevel)}")
        return None, reasons
    kind = cells["kind"].lower() or KINDS[level][0]
    if (problem := kind_problem(level, kind)) is not None:
        reasons.append(problem)
    return Row(line, code, name, level, cells["parent_code"] or None, kind, position), reasons


def read_rows(path: Path, text: str) -> tuple[list[Row], list[Problem]]:
    """The rows of a CSV text and the problems each has on its own; blank rows are skipped."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in next(reader, [])]
    missing = [c for c in REQUIRED if c not in header]
    unknown = [h for h in header if h not in COLUMNS]
    if missing or unknown or len(set(header)) != len(header):
        raise AreaFileError(path, f"line 1 must name the columns {','.join(COLUMNS)} (lat, lon "
                                  f"optional); missing: {', '.join(missing) or '-'}, unknown or "
                                  f"repeated: {', '.join(unknown) or '-'}")
    rows, problems = [], []
    start = reader.line_num + 1
    for cells in reader:
        line, start = start, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue  # Excel leaves empty rows (",,,,,,") below the data
        if len(cells) != len(header):
            problems.append(Problem(line, cells[0].strip(), f"{len(cells)} fields, the header "
                                                            f"has {len(header)}"))
            continue
        row, reasons = _row(line, {h: c.strip() for h, c in zip(header, cells, strict=True)})
        problems += [Problem(line, cells[header.index("code")].strip(), r) for r in reasons]
        if row is not None and not reasons:
            rows.append(row)
    return rows, problems


def _same(a: Position | None, b: Position | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a[0] - b[0]) <= SAME_DEGREES and abs(a[1] - b[1]) <= SAME_DEGREES


def _differences(row: Row, known: Known) -> list[str]:
    said = []
    for what, ours, theirs in (("name_zh", row.name_zh, known.name_zh),
                               ("kind", row.kind, known.kind),
                               ("level", str(row.level), str(known.level)),
                               ("parent_code", row.parent_code or "", known.parent_code or "")):
        if ours != theirs:
            said.append(f"{what} is {theirs or '(none)'!r} in central, {ours or '(none)'!r} here")
    return said


def plan_import(rows: list[Row], problems: list[Problem], known: dict[str, Known], *,
                update: bool = False) -> Plan:
    """Check the rows against each other and against central's tree, and say what to do.

    `problems` (from `read_rows`) are kept as errors. Parents come before children in
    `add` whatever the row order, because a child's level is always below its parent's."""
    plan = Plan(errors=list(problems))
    first: dict[str, Row] = {}
    for row in rows:
        if row.code in first:
            plan.errors.append(Problem(row.line, row.code, "duplicate code (first on line "
                                                           f"{first[row.code].line})"))
        else:
            first[row.code] = row
    bad = {p.code for p in problems}  # rows with their own errors still count as parents
    for row in first.values():
        if (reason := _placement(row, first, known, bad)) is not None:
            plan.errors.append(Problem(row.line, row.code, reason))
            continue
        have = known.get(row.code)
        if have is None:
            plan.add.append(row)
        elif differences := _differences(row, have):
            plan.conflicts.append(Problem(row.line, row.code, "; ".join(differences)))
        elif row.position is None or _same(row.position, have.position):
            plan.unchanged.append(row)
        elif have.position is None or update:
            plan.place.append(row)
        else:
            plan.conflicts.append(Problem(
                row.line, row.code, f"central has it at {have.position[0]}, {have.position[1]}, "
                                    f"here {row.position[0]}, {row.position[1]} (--update moves "
                                    "it)"))
    plan.errors.sort(key=lambda p: p.line)
    plan.add.sort(key=lambda r: RANK[r.level])  # stable: file order within a level
    return plan


def _placement(row: Row, rows: dict[str, Row], known: dict[str, Known],
               bad: set[str]) -> str | None:
    """Why the row cannot stand under its parent, or None."""
    if row.parent_code is None:
        if row.code not in known and row.level is not AreaLevel.CITY:
            return f"no parent_code: only a city stands at the top, not a {row.level}"
        return None
    if row.parent_code == row.code:
        return "its own parent"
    parent = known.get(row.parent_code) or rows.get(row.parent_code)
    if parent is None:
        if row.parent_code in bad:
            return None  # the parent's own line says what is wrong with it
        return f"unknown parent {row.parent_code!r} (not in the file nor in central)"
    return rank_problem(row.level, parent.level, row.parent_code)


# --- central's side ---------------------------------------------------------------------------


def _walk(nodes: list[dict[str, Any]], parent: str | None = None
          ) -> Iterator[tuple[str | None, dict[str, Any]]]:
    for n in nodes:
        yield parent, n
        yield from _walk(n["children"], n["code"])


def _node_position(n: dict[str, Any]) -> Position | None:
    return None if n.get("lat") is None or n.get("lon") is None else (n["lat"], n["lon"])


def known_areas(api: Api) -> dict[str, Known]:
    """The areas central shows this user, by code, parents first."""
    return {n["code"]: Known(n["id"], parent, AreaLevel(n["level"]), n["name_zh"], n["kind"],
                             _node_position(n))
            for parent, n in _walk(api.get("/api/areas"))}


@dataclass(slots=True)
class Done:
    added: int = 0
    positioned: int = 0
    failed: Problem | None = None


def apply_plan(api: Api, plan: Plan, known: dict[str, Known]) -> Done:
    """Add and position the areas; stop at the first refusal (named by its line)."""
    ids = {code: k.id for code, k in known.items()}
    done = Done()
    columns = (TextColumn("[bold]importing areas[/bold]"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("import", total=len(plan.add) + len(plan.place))
        for row in [*plan.add, *plan.place]:
            try:
                if row.code not in ids:
                    made = api.post("/api/areas", {
                        "parent_id": ids[row.parent_code] if row.parent_code else None,
                        "level": str(row.level), "code": row.code, "name_zh": row.name_zh,
                        "kind": row.kind})
                    ids[row.code] = made["id"]
                    done.added += 1
                if row.position is not None:
                    api.put(f"/api/areas/{ids[row.code]}/position",
                            {"lat": row.position[0], "lon": row.position[1]})
                    done.positioned += 1
            except CliError as exc:
                done.failed = Problem(row.line, row.code, f"central refused: {exc}")
                return done
            progress.update(task, advance=1)
    return done


# --- the commands -----------------------------------------------------------------------------

FileArg = Annotated[Path, typer.Argument(help="The CSV file (UTF-8, with or without BOM).",
                                         exists=True, dir_okay=False, readable=True)]


def _summary(plan: Plan, done: Done | None, dry_run: bool) -> dict[str, Any]:
    """The counts written (with --dry-run: that would be written; with errors: none)."""
    failed = [done.failed] if done and done.failed else []
    if done is None:
        would = dry_run and not plan.errors
        done = Done(len(plan.add) if would else 0, plan.positions if would else 0)
    return {
        "added": done.added, "unchanged": len(plan.unchanged), "conflicts": len(plan.conflicts),
        "positioned": done.positioned,
        "errors": len(plan.errors) + len(failed), "dry_run": dry_run,
        "problems": [{"line": p.line, "code": p.code, "problem": kind, "reason": p.reason}
                     for kind, ps in (("error", plan.errors + failed),
                                      ("conflict", plan.conflicts)) for p in ps]}


def import_command(
    file: FileArg,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the file against central "
                                          "and say what would change; change nothing.")] = False,
    update: Annotated[bool, typer.Option("--update", help="Move areas whose position in "
                                         "central differs to the file's. (Central cannot "
                                         "rename an area or change its kind, level or parent: "
                                         "those conflicts stay, also with --update.)")] = False,
    yes: YesOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON: added, "
                                           "unchanged, conflicts, positioned, errors.")] = False,
) -> None:
    """Add the areas of a CSV file (code,name_zh,level,parent_code,kind,lat,lon; lat and lon
    optional) to central's tree, with their map positions. Needs the admin role (in your
    area); each area added or positioned is audited by central.

    The whole file is checked first: every bad row is listed by line (a bad level or kind, a
    parent neither in the file nor in central, a level not below its parent's, a duplicate
    code, a bad lat/lon) and nothing is written (exit 2). Rows may come in any order. Areas
    central has with the same fields are skipped; ones with other fields are conflicts,
    listed and left as they are (exit 1). Asks before writing unless --yes.

    Example: central areas import examples/areas-wuhan.csv --dry-run
    """
    try:
        rows, problems = read_rows(file, decode(file, file.read_bytes()))
    except AreaFileError as exc:
        output.error(err, exc)
        raise typer.Exit(2) from exc
    known = call(known_areas)
    plan = plan_import(rows, problems, known, update=update)
    done = None
    if not plan.errors and not dry_run and (plan.add or plan.place):
        if not json_out:
            _show_plan(file, plan)
        confirm(f"add {len(plan.add)} area(s) and set {plan.positions} position(s) in central?",
                yes, "nothing imported")
        done = call(lambda api: apply_plan(api, plan, known))
    summary = _summary(plan, done, dry_run)
    if json_out:
        emit_json(summary)
    else:
        _report(file, plan, summary, done)
    if plan.errors:
        raise typer.Exit(2)
    if plan.conflicts or (done and done.failed):
        raise typer.Exit(1)


def _show_plan(file: Path, plan: Plan) -> None:
    output.say(err, f"{file}: {len(plan.add)} area(s) to add, {len(plan.place)} to position, "
                    f"{len(plan.unchanged)} unchanged, {len(plan.conflicts)} conflict(s)")


def _report(file: Path, plan: Plan, summary: dict[str, Any], done: Done | None) -> None:
    for p in plan.errors:
        output.error(err, p)
    for p in plan.conflicts:
        output.error(err, f"{p} (left as it is)", "conflict")
    if plan.errors:
        output.say(err, f"{file}: {len(plan.errors)} bad row(s); nothing imported")
        return
    if done is not None and done.failed is not None:
        output.error(err, f"{done.failed}; stopped, the rows after it were not imported")
    if summary["dry_run"] and plan.add:
        show_table(["line", "code", "name", "level", "parent", "kind"],
                   [[r.line, r.code, r.name_zh, r.level, r.parent_code, r.kind]
                    for r in sorted(plan.add, key=lambda r: r.line)], title="would add")
    tail = ("dry run: nothing written" if summary["dry_run"] else
            "nothing to change" if done is None else
            "stopped" if done.failed is not None else "done")
    output.say(out, f"{file}: {summary['added']} added, {summary['unchanged']} unchanged, "
                    f"{summary['conflicts']} conflict(s), {summary['positioned']} positioned "
                    f"({tail})")


def export_rows(known: dict[str, Known]) -> list[list[str]]:
    """The tree as rows of the import file, parents before children; positions exact."""
    return [[code, k.name_zh, str(k.level), k.parent_code or "", k.kind,
             *((repr(k.position[0]), repr(k.position[1])) if k.position else ("", ""))]
            for code, k in known.items()]


def export_command(
    file: Annotated[Path | None, typer.Argument(
        help="Write here (UTF-8 with a BOM, so Excel shows the Chinese); standard output "
             "(without a BOM) when left out.", dir_okay=False)] = None,
) -> None:
    """Write the area tree you see (from your area down) as a CSV file that
    `central areas import` reads: code,name_zh,level,parent_code,kind,lat,lon, parents first.

    Example: central areas export areas.csv
    """
    rows = export_rows(call(known_areas))
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\r\n")  # as Excel writes CSV
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    if file is None:
        typer.echo(text.getvalue(), nl=False)
        return
    try:
        file.write_text(text.getvalue(), encoding="utf-8-sig", newline="")
    except OSError as exc:
        output.error(err, f"cannot write {file}: {exc.strerror}")
        raise typer.Exit(1) from exc
    output.say(err, f"wrote {len(rows)} area(s) to {file}")


def register(app: typer.Typer) -> None:
    """Add `import` and `export` to `central areas`."""
    app.command("import", short_help="Add areas and positions from a CSV file (admin).  "
                                     "e.g. central areas import areas.csv --dry-run")(
        import_command)
    app.command("export", short_help="The area tree as a CSV file for import.  "
                                     "e.g. central areas export areas.csv")(export_command)
