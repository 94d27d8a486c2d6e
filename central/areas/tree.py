"""The area hierarchy (DESIGN.md §7): city → district → street or township → community or
village → site (enterprise, station, street office); gateways stand at sites.

Levels may be skipped going down (a forest station straight under a township) but never go
up. Each area keeps `path`, the chain of ids from the root (`/1/4/17/`), so "everything under
an area" is a prefix match in SQL. `seed_areas(storage, path)` loads a tree from a YAML or
JSON file (`central/seed/wuhan.yaml`), idempotently: areas are keyed by `code`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from central import CentralError, DuplicateError
from central.storage import NotFoundError, Storage
from central.storage.program import Program, Sql
from central.storage.retire_schema import in_service
from protocols.errors import DetailedError
from runtime import clock
from runtime.files import FileError

SEED_DIR = Path(__file__).resolve().parent.parent / "seed"


class AreaLevel(enum.StrEnum):
    CITY = "city"
    DISTRICT = "district"
    STREET = "street"  # street (街道) or township (乡镇)
    COMMUNITY = "community"  # community (社区) or village (村)
    SITE = "site"  # enterprise, station, street office


RANK = {level: n for n, level in enumerate(AreaLevel)}
KINDS: dict[AreaLevel, tuple[str, ...]] = {
    AreaLevel.CITY: ("city",),
    AreaLevel.DISTRICT: ("district",),
    AreaLevel.STREET: ("street", "township"),
    AreaLevel.COMMUNITY: ("community", "village"),
    AreaLevel.SITE: ("enterprise", "station", "street_office"),
}


class AreaError(CentralError):
    """Base of the area errors that are the caller's fault."""


class UnknownAreaError(NotFoundError):
    kind = "area"


class DuplicateAreaError(AreaError, DuplicateError):
    kind = "area"


class AreaPlacementError(AreaError, DetailedError):
    """A level, kind or parent that does not fit the hierarchy."""

    template = "area {code!r}: {reason}"
    code: str
    reason: str


class SeedFileError(AreaError, FileError):
    """The areas seed file cannot be read or does not parse."""


@dataclass(frozen=True, slots=True)
class Area:
    id: int
    parent_id: int | None
    level: AreaLevel
    code: str
    name_zh: str
    kind: str
    path: str
    lat: float | None = None  # its place on the map (PUT /api/areas/{id}/position)
    lon: float | None = None


@dataclass(frozen=True, slots=True)
class AreaNode:
    area: Area
    gateways: tuple[str, ...]
    children: tuple[AreaNode, ...]


_COLS = "id, parent_id, level, code, name_zh, kind, path, lat, lon"


def _area(row: Sequence[Any]) -> Area:
    return Area(id=row[0], parent_id=row[1], level=AreaLevel(row[2]), code=row[3],
                name_zh=row[4], kind=row[5], path=row[6], lat=row[7], lon=row[8])


# --- programs ---------------------------------------------------------------------------------


def area_program(area_id: int) -> Program[Area]:
    rows = yield Sql(f"SELECT {_COLS} FROM areas WHERE id = ?", (area_id,))
    if not rows:
        raise UnknownAreaError(str(area_id))
    return _area(rows[0])


def kind_problem(level: AreaLevel, kind: str) -> str | None:
    """What is wrong with `kind` for an area of `level`; None if nothing."""
    if kind not in KINDS[level]:
        return f"a {level} is one of {', '.join(KINDS[level])}, not {kind!r}"
    return None


def rank_problem(level: AreaLevel, parent_level: AreaLevel, parent_code: str) -> str | None:
    """What is wrong with an area of `level` under that parent; None if nothing (a level
    below the parent's, levels may be skipped)."""
    if RANK[level] <= RANK[parent_level]:
        return f"a {level} cannot stand under a {parent_level} ({parent_code})"
    return None


def check_placement(code: str, level: AreaLevel, kind: str, parent: Area | None) -> None:
    problem = kind_problem(level, kind) or (
        None if parent is None else rank_problem(level, parent.level, parent.code))
    if problem is not None:
        raise AreaPlacementError(code, problem)


def create_program(parent_id: int | None, level: AreaLevel, code: str, name_zh: str,
                   kind: str | None, now: int, *, exist_ok: bool = False) -> Program[Area]:
    """Insert one area under `parent_id`; with `exist_ok` an area of that code is returned."""
    kind = kind or KINDS[level][0]
    parent = None if parent_id is None else (yield from area_program(parent_id))
    check_placement(code, level, kind, parent)
    rows = yield Sql("INSERT INTO areas (parent_id, level, code, name_zh, kind, created_ms)"
                     " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (code) DO NOTHING RETURNING id",
                     (parent_id, str(level), code, name_zh, kind, now))
    if not rows:
        if not exist_ok:
            raise DuplicateAreaError(code)
        rows = yield Sql(f"SELECT {_COLS} FROM areas WHERE code = ?", (code,))
        return _area(rows[0])
    new_id = rows[0][0]
    path = f"{parent.path if parent else '/'}{new_id}/"
    yield Sql("UPDATE areas SET path = ? WHERE id = ?", (path, new_id))
    return Area(new_id, parent_id, level, code, name_zh, kind, path)


def assign_program(gw: str, area_id: int, now: int) -> Program[Area]:
    area = yield from area_program(area_id)
    if area.level is not AreaLevel.SITE:
        raise AreaPlacementError(area.code, f"gateways stand at sites, not at a {area.level}")
    yield Sql("INSERT INTO gateway_sites (gw, area_id, assigned_ms) VALUES (?, ?, ?)"
              " ON CONFLICT (gw) DO UPDATE SET area_id = excluded.area_id,"
              " assigned_ms = excluded.assigned_ms", (gw, area_id, now))
    return area


def tree_program() -> Program[list[AreaNode]]:
    rows = yield Sql(f"SELECT {_COLS} FROM areas ORDER BY path")
    sites = yield Sql(f"SELECT area_id, gw FROM gateway_sites WHERE {in_service()} ORDER BY gw")
    gateways: dict[int, list[str]] = {}
    for area_id, gw in sites:
        gateways.setdefault(area_id, []).append(gw)
    areas = [_area(r) for r in rows]
    children: dict[int | None, list[Area]] = {}
    for a in areas:
        children.setdefault(a.parent_id, []).append(a)

    def node(a: Area) -> AreaNode:
        kids = sorted(children.get(a.id, []), key=lambda c: c.code)
        return AreaNode(a, tuple(gateways.get(a.id, ())), tuple(node(c) for c in kids))

    return [node(a) for a in sorted(children.get(None, []), key=lambda c: c.code)]


# --- the API other modules call ---------------------------------------------------------------


async def create_area(storage: Storage, *, parent_id: int | None, level: AreaLevel | str,
                      code: str, name_zh: str, kind: str | None = None) -> Area:
    """Raises `UnknownAreaError` (parent), `DuplicateAreaError`, `AreaPlacementError`."""
    lv = AreaLevel(level)
    now = clock.now_ms()
    return await storage.run(lambda: create_program(parent_id, lv, code, name_zh, kind, now))


async def get_area(storage: Storage, area_id: int) -> Area:
    return await storage.run(lambda: area_program(area_id), write=False)


async def area_tree(storage: Storage) -> list[AreaNode]:
    """Every root area with its descendants and the gateways at each site."""
    return await storage.run(tree_program, write=False)


async def assign_gateway(storage: Storage, gw: str, area_id: int) -> Area:
    """Put `gw` at the site `area_id` (moving it if it stood elsewhere)."""
    now = clock.now_ms()
    return await storage.run(lambda: assign_program(gw, area_id, now))


# --- seeding ----------------------------------------------------------------------------------


class SeedNode(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1, max_length=64)
    name_zh: str = Field(min_length=1)
    level: AreaLevel
    kind: str | None = None
    gateways: list[str] = []
    children: list[SeedNode] = []


@dataclass(frozen=True, slots=True)
class SeedResult:
    areas: int  # areas in the file
    gateways: int  # gateway assignments in the file


def load_seed(path: Path) -> SeedNode:
    """Parse and validate a seed file (YAML, or JSON by extension)."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return SeedNode.model_validate(raw)
    except OSError as exc:
        raise SeedFileError(path, f"cannot read: {exc.strerror}") from exc
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SeedFileError(path, str(exc)) from exc
    except ValidationError as exc:
        raise SeedFileError(path, "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())) from exc


def seed_program(root: SeedNode, now: int) -> Program[SeedResult]:
    counts = [0, 0]

    def walk(node: SeedNode, parent_id: int | None) -> Program[None]:
        area = yield from create_program(parent_id, node.level, node.code, node.name_zh,
                                         node.kind, now, exist_ok=True)
        counts[0] += 1
        for gw in node.gateways:
            yield from assign_program(gw, area.id, now)
            counts[1] += 1
        for child in node.children:
            yield from walk(child, area.id)

    yield from walk(root, None)
    return SeedResult(areas=counts[0], gateways=counts[1])


async def seed_areas(storage: Storage, path: Path | str) -> SeedResult:
    """Load an area tree with its gateway sites, in one transaction; areas already present
    (by code) are kept as they are, so seeding twice changes nothing."""
    root = load_seed(Path(path))
    now = clock.now_ms()
    return await storage.run(lambda: seed_program(root, now))
