"""Who and what a warning calls (DESIGN.md §7): terminals, terminal groups, responsible persons.

- A terminal (`cr_terminals`) hangs on one gateway and stands in one area; kind `audio` (a
  loudspeaker with a button) or `video` (adds a camera).
- A group (`cr_groups`) is a named set of terminals ("all terminals on the river bank").
- A person (`cr_persons`) belongs to an area, with role `in_charge` (the person in charge of
  that area: the one escalations reach) or `member`, the terminals they answer on and a phone.

"Whoever is in charge, calls" (../shared/DOMAIN.md): escalation goes to the person in charge
of the area one level above the target's (`in_charge_above`); an area without one passes it
further up.

Programs run in the caller's storage transaction (`central.storage.program`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from central import CentralError
from central.storage import NotFoundError
from central.storage.program import Program, Rows, Sql, placeholders


class DirectoryError(CentralError):
    """A directory entry central refuses."""


class UnknownEntryError(NotFoundError):
    """An unknown terminal, group, person or area named in a request."""

    kind = "callresp entry"

    def __init__(self, what: str, ref: object) -> None:
        self.kind = what  # the 404 title says which: "Unknown terminal"
        super().__init__(str(ref))
        self.what = what


class TerminalKind(enum.StrEnum):
    AUDIO = "audio"
    VIDEO = "video"


class PersonRole(enum.StrEnum):
    IN_CHARGE = "in_charge"
    MEMBER = "member"


@dataclass(frozen=True, slots=True)
class Terminal:
    id: str
    gw: str
    area_id: int | None
    kind: str
    name: str
    lat: float | None = None  # its own position (the console's map), else its area's
    lon: float | None = None


@dataclass(frozen=True, slots=True)
class Person:
    id: str
    name: str
    area_id: int | None
    role: str
    phone: str
    terminals: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Group:
    id: str
    name: str
    terminals: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AreaRef:
    id: int
    parent_id: int | None
    path: str


# --- writes -------------------------------------------------------------------------------------


def upsert_terminal_program(t: Terminal, now: int) -> Program[None]:
    if t.area_id is not None:
        yield from _need_area(t.area_id)
    yield Sql("INSERT INTO cr_terminals (id, gw, area_id, kind, name, updated_ms, lat, lon)"
              " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET gw = excluded.gw,"
              " area_id = excluded.area_id, kind = excluded.kind, name = excluded.name,"
              " updated_ms = excluded.updated_ms, lat = excluded.lat, lon = excluded.lon",
              (t.id, t.gw, t.area_id, t.kind, t.name, now, t.lat, t.lon))


def upsert_group_program(g: Group, now: int) -> Program[None]:
    yield from _need_terminals(g.terminals)
    yield Sql("INSERT INTO cr_groups (id, name, updated_ms) VALUES (?, ?, ?)"
              " ON CONFLICT (id) DO UPDATE SET name = excluded.name,"
              " updated_ms = excluded.updated_ms", (g.id, g.name, now))
    yield from _set_terminals("cr_group_terminals", "group_id", g.id, g.terminals)


def upsert_person_program(p: Person, now: int) -> Program[None]:
    if p.area_id is not None:
        yield from _need_area(p.area_id)
    yield from _need_terminals(p.terminals)
    yield Sql("INSERT INTO cr_persons (id, name, area_id, role, phone, updated_ms)"
              " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name,"
              " area_id = excluded.area_id, role = excluded.role, phone = excluded.phone,"
              " updated_ms = excluded.updated_ms",
              (p.id, p.name, p.area_id, p.role, p.phone, now))
    yield from _set_terminals("cr_person_terminals", "person", p.id, p.terminals)


def _set_terminals(table: str, owner_column: str, owner: str,
                   terminals: Sequence[str]) -> Program[None]:
    """Replace the terminals `owner` lists in `table` (a group's or a person's)."""
    yield Sql(f"DELETE FROM {table} WHERE {owner_column} = ?", (owner,))
    for t in terminals:
        yield Sql(f"INSERT INTO {table} ({owner_column}, terminal) VALUES (?, ?)", (owner, t))


def _need_area(area_id: int) -> Program[None]:
    rows = yield Sql("SELECT id FROM areas WHERE id = ?", (area_id,))
    if not rows:
        raise UnknownEntryError("area", area_id)


def _need_terminals(ids: Sequence[str]) -> Program[None]:
    if not ids:
        return
    rows = yield Sql(f"SELECT id FROM cr_terminals WHERE id IN ({placeholders(len(ids))})",
                     tuple(ids))
    missing = sorted(set(ids) - {r[0] for r in rows})
    if missing:
        raise UnknownEntryError("terminal", missing[0])


# --- reads --------------------------------------------------------------------------------------


def areas_program() -> Program[dict[int, AreaRef]]:
    rows = yield Sql("SELECT id, parent_id, path FROM areas")
    return {int(r[0]): AreaRef(int(r[0]), None if r[1] is None else int(r[1]), str(r[2]))
            for r in rows}


def _by_ids(sql: str, ids: Sequence[str] | None) -> Sql | None:
    """`sql` for the rows with these ids (None: all), by id; None for no ids at all."""
    if ids is None:
        return Sql(sql + " ORDER BY id")
    if not ids:
        return None
    return Sql(sql + f" WHERE id IN ({placeholders(len(ids))}) ORDER BY id", tuple(ids))


def terminals_by_owner(rows: Rows) -> dict[str, tuple[str, ...]]:
    """(owner, terminal) rows as each owner's terminals, in row order."""
    by: dict[str, list[str]] = {}
    for owner, t in rows:
        by.setdefault(owner, []).append(t)
    return {owner: tuple(ts) for owner, ts in by.items()}


def terminals_program(ids: Sequence[str] | None = None) -> Program[list[Terminal]]:
    stmt = _by_ids("SELECT id, gw, area_id, kind, name, lat, lon FROM cr_terminals", ids)
    if stmt is None:
        return []
    rows = yield stmt
    return [Terminal(*r) for r in rows]


def groups_program() -> Program[list[Group]]:
    rows = yield Sql("SELECT id, name FROM cr_groups ORDER BY id")
    links = yield Sql("SELECT group_id, terminal FROM cr_group_terminals ORDER BY terminal")
    by = terminals_by_owner(links)
    return [Group(r[0], r[1], by.get(r[0], ())) for r in rows]


def persons_program(ids: Sequence[str] | None = None) -> Program[list[Person]]:
    stmt = _by_ids("SELECT id, name, area_id, role, phone FROM cr_persons", ids)
    if stmt is None:
        return []
    rows = yield stmt
    links = yield Sql("SELECT person, terminal FROM cr_person_terminals ORDER BY terminal")
    by = terminals_by_owner(links)
    return [Person(r[0], r[1], r[2], r[3], r[4], by.get(r[0], ())) for r in rows]


def in_charge_above(area_id: int | None, areas: Mapping[int, AreaRef]) -> Program[Person | None]:
    """The person in charge of the nearest area above `area_id` that has one (None: none)."""
    seen: set[int] = set()
    current = areas.get(area_id) if area_id is not None else None
    while current is not None and current.parent_id is not None and current.id not in seen:
        seen.add(current.id)
        parent = current.parent_id
        rows = yield Sql("SELECT id FROM cr_persons WHERE area_id = ? AND role = ?"
                         " ORDER BY id LIMIT 1", (parent, str(PersonRole.IN_CHARGE)))
        if rows:
            found = yield from persons_program([rows[0][0]])
            return found[0]
        current = areas.get(parent)
    return None
