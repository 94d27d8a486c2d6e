"""Issue 10's fuzz, a modest run (bench/fuzz_ingest.py runs 20,000): generated envelopes
through decode + validate + store on a real SQLite give only typed, counted refusals and
lose no good record."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz_harness import IngestFuzz


@pytest.fixture
def fuzz(tmp_path: Path) -> Iterator[IngestFuzz]:
    harness = IngestFuzz(tmp_path / "central.db")
    try:
        yield harness
    finally:
        harness.close()


def test_generated_envelopes_give_only_counted_refusals(fuzz: IngestFuzz) -> None:
    """No exception leaves ingest, every refusal has a known reason, no good record is lost."""

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
    @given(st.data())
    def one(data: st.DataObject) -> None:
        fuzz.feed(*data.draw(st.composite(lambda draw: fuzz.message(draw))()))

    one()
    summary = fuzz.summary()
    assert fuzz.first_crashes == [], fuzz.first_crashes[0] if fuzz.first_crashes else ""
    assert summary["crashes"] == 0
    assert fuzz.unknown_reasons() == set()
    # The database's own refusal is a safety net: the validation layer must catch all first.
    assert "unstorable" not in summary["rejected_by_reason"]
    assert summary["good_records_lost"] == 0
    assert summary["records_rejected"] > 0 and summary["good_records"] > 0
