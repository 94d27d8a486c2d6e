"""Issue 10: path, query and body integers beyond what the database holds are 422 problems
from the models, never a 500 from the driver."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from central.config.settings import Settings
from tests.test_central_api import seed, serve

HUGE = str(2**64 + 1)
DIGITS = "9" * 5000  # past int()'s 4,300-digit limit


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(db_url=f"sqlite:///{tmp_path}/central.db")
    await seed(settings.db_url)
    async with serve(settings) as c:
        yield c


@pytest.mark.parametrize(("method", "url", "body"), [
    ("GET", f"/api/alarms/{HUGE}", None),
    ("GET", f"/api/alarms/{DIGITS}", None),
    ("GET", "/api/alarms/0", None),
    ("POST", f"/api/alarms/{HUGE}/ack", {"comment": "已到场"}),
    ("POST", f"/api/alarms/{HUGE}/clear", {"comment": "已处置"}),
    ("GET", f"/api/areas/{HUGE}/summary", None),
    ("GET", f"/api/alarms?area={HUGE}", None),
    ("GET", f"/api/alarms?area=-{HUGE}", None),
    ("GET", f"/api/points/gw-1:tank-3:gas/series?from={HUGE}", None),
    ("GET", f"/api/points/gw-1:tank-3:gas/series?to=-{HUGE}", None),
    ("GET", f"/api/points/gw-1:tank-3:gas/series?from={DIGITS}", None),
    ("GET", f"/api/points/gw-1:tank-3:gas/series?limit={HUGE}", None),
    ("POST", "/api/areas", {"parent_id": 2**64, "level": "district", "code": "d",
                            "name_zh": "区"}),
    ("PUT", "/api/gateways/gw-1/area", {"area_id": 2**64}),
])
async def test_out_of_range_integers_are_422(client: httpx.AsyncClient, method: str, url: str,
                                             body: object) -> None:
    """Each integer past BIGINT (or below 1 for an id) is refused by the model with 422."""
    r = await client.request(method, url, json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_in_range_integers_still_answer(client: httpx.AsyncClient) -> None:
    """The bounds leave ordinary requests alone: an unknown id is 404, a time window is 200."""
    assert (await client.get(f"/api/alarms/{2**63 - 1}")).status_code == 404
    r = await client.get("/api/points/gw-1:tank-3:gas/series?from=0&resolution=raw")
    assert r.status_code == 200 and len(r.json()["samples"]) == 10
