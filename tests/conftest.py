from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers import Mosquitto

# The CLIs' rich consoles are made at import and take their width from COLUMNS then; the tests
# read tables, so every worker gets the same wide terminal whatever imported the module first.
os.environ["COLUMNS"] = "200"

# Properties are about behaviour, not speed: under `make test` several workers share the cores,
# and a slow draw on a busy box must not fail a codec's property (deadline, too_slow).
settings.register_profile("fieldlink", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fieldlink")


def pytest_collection_finish(session: pytest.Session) -> None:
    """What import and collection made lives for the whole run: frozen, it is passed over by
    the collection after each test (`_collected_after_each_test`), which would otherwise
    scan it every time (a full collection here: about 80 ms; the test's own objects: ~10)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True)
def _collected_after_each_test() -> Iterator[None]:
    """After the test and its other fixtures, a collection: a socket, file or transport the
    test dropped in a reference cycle without closing it warns now, in this test's teardown,
    and not in whatever later test the collector happened to run in (warnings are errors)."""
    yield
    gc.collect()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A private Mosquitto for one test, on a free port; the test may kill and restart it."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    broker = Mosquitto(workdir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
