from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Mosquitto


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
