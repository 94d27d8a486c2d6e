"""The typed contracts of record attrs that cross from edge to central (DESIGN.md §2): alarm
transitions (`protocols.alarm_attrs`) and the outbox's reports (`protocols.outbox_events`).
Round trips, the maps today's agents send, malformed input → only `AttrsError`, and the edge's
writers read by central's readers through the one definition."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from central.alarms.engine import BadAlarmRecordError, event_from_record
from central.alarms.lifecycle import EdgeState
from central.health.metrics import Metrics
from central.ingest.rejects import RejectLog, count_bad_attrs
from central.narrowband.receiver import (
    BadBirthError,
    alarm_record,
    inventory_from_birth,
)
from central.storage import open_storage
from central.storage.delivery import loss_report
from edge_agent.alarms import rules
from edge_agent.alarms.rules import Rule, RuleEngine, Sample
from edge_agent.narrowband.fallback import point_ordinals
from edge_agent.outbox.budget import Eviction
from edge_agent.outbox.seqs import Skipped
from protocols import alarm_attrs, envelope, outbox_events
from protocols.alarm_attrs import AlarmAttrs, AlarmState, RuleKind
from protocols.envelope import DataBatch, Record, RecordKind, State
from protocols.limits import MalformedEnvelopeError
from protocols.narrowband import AlarmEntry, AlarmRule, AlarmTransition
from protocols.outbox_events import (
    MAX_POINTS_LISTED,
    DiskFullEpisode,
    LossReason,
    LossReport,
    OutboxEvent,
    parse_outbox_event,
)
from protocols.point_inventory import PointInventory
from protocols.record_attrs import AttrsError, UnsupportedAttrsVersionError

NOW = time.time_ns() // 1_000_000
T0 = NOW - 3_600_000

# What an agent of today writes, byte for byte the same map (version 1 has no `v`).
EDGE_ALARM = {"alarm_id": "gas-1/gas_lel/high", "rule": "high", "state": "raised", "level": 2,
              "prev_level": 0, "threshold": 50.0, "since_ms": 1000, "hysteresis": 2.0}
OFFLINE_ALARM = {"alarm_id": "gas-1/_device/device_offline", "rule": "device_offline",
                 "state": "raised", "level": 1, "prev_level": 0, "threshold": None,
                 "since_ms": 5000, "error": "timeout"}
THINNED = {"event": "outbox_thinned", "records": 30, "first_seq": 11, "last_seq": 60,
           "points": ["d/a", "d/b"], "keep_every": 4}
DISK_FULL_DROP = {"event": "outbox_dropped", "records": 5, "first_seq": 7, "last_seq": 12,
                  "points": ["d/p"], "reason": "disk_full", "telemetry": 5, "held_lost": 0}
POWER_CUT = {"event": "outbox_dropped", "records": 256, "first_seq": 2, "last_seq": 257,
             "points": [], "reason": "power_cut", "reserved_by_boot": "b-1"}
EPISODE = {"event": "outbox_disk_full", "since_ms": 1, "until_ms": 9, "held": 3,
           "telemetry_dropped": 5, "held_lost": 0, "marks_retried": 2, "error": "disk I/O"}


def alarm_rec(attrs: Any, seq: int = 1) -> Record:
    return Record(seq=seq, kind=RecordKind.ALARM, ts_ms=T0, point="gas-1/gas_lel", value=60.0,
                  attrs=attrs)


def event_rec(attrs: Any, seq: int = 1) -> Record:
    return Record(seq=seq, kind=RecordKind.EVENT, ts_ms=T0, point=None, value=None, attrs=attrs)


# --- alarm attrs ----------------------------------------------------------------------------


@pytest.mark.parametrize("attrs", [EDGE_ALARM, OFFLINE_ALARM, {
    "alarm_id": "d/p/rate", "rule": "rate", "state": "changed", "level": 1, "prev_level": 2,
    "threshold": 5.0, "since_ms": 10, "rate_per_min": 6.5},
    {"alarm_id": "d/p/stale", "rule": "stale", "state": "cleared", "level": 0, "prev_level": 1,
     "threshold": 60.0, "since_ms": 10, "age_s": 0.0},
    {"alarm_id": "d/p/high", "rule": "high", "state": "cleared", "level": 0, "prev_level": 1,
     "threshold": 25.0, "since_ms": None, "reason": "rule_removed"}])
def test_alarm_attrs_of_todays_agents_round_trip(attrs: dict[str, Any]) -> None:
    """Every map an agent writes today parses and renders back to the same map."""
    assert AlarmAttrs.from_attrs(attrs).to_attrs() == attrs


def test_alarm_attrs_old_and_short_forms() -> None:
    """A record without `rule` names it by its alarm_id; a narrowband copy has only the frame's
    fields; unknown keys are kept; `v: 1` is the same version."""
    old = AlarmAttrs.from_attrs({"alarm_id": "d/p/low", "state": "raised", "level": 1})
    assert (old.rule, old.prev_level, old.threshold, old.since_ms) == ("low", None, None, None)
    short = AlarmAttrs(alarm_id="d/p/high", rule=RuleKind.HIGH, state=AlarmState.RAISED, level=1,
                       bearer="pdt").to_attrs()
    assert short == {"alarm_id": "d/p/high", "rule": "high", "state": "raised", "level": 1,
                     "bearer": "pdt"}
    newer = AlarmAttrs.from_attrs({**EDGE_ALARM, "v": 1, "zone": "z-3"})
    assert newer.extra == {"zone": "z-3"} and newer.to_attrs() == {**EDGE_ALARM, "zone": "z-3"}


@pytest.mark.parametrize(("attrs", "field"), [
    (None, "attrs"), ([1, 2], "attrs"), ({}, "alarm_id"), ({**EDGE_ALARM, "alarm_id": ""}, "alarm_id"),
    ({**EDGE_ALARM, "state": "weird"}, "state"), ({**EDGE_ALARM, "state": ["raised"]}, "state"),
    ({**EDGE_ALARM, "level": 0}, "level"), ({**EDGE_ALARM, "level": True}, "level"),
    ({**EDGE_ALARM, "level": 10}, "level"), ({**EDGE_ALARM, "threshold": "50"}, "threshold"),
    ({**EDGE_ALARM, "threshold": False}, "threshold"), ({**EDGE_ALARM, "since_ms": -1}, "since_ms"),
    ({**EDGE_ALARM, "rule": 3}, "rule"), ({**EDGE_ALARM, "error": {"x": 1}}, "error")])
def test_malformed_alarm_attrs_raise_a_typed_error(attrs: Any, field: str) -> None:
    """Each malformed map is an AttrsError naming the contract and the field."""
    with pytest.raises(AttrsError) as info:
        AlarmAttrs.from_attrs(attrs)
    assert (info.value.contract, info.value.field, info.value.reason) == ("alarm", field,
                                                                           "bad_attrs")


def test_unknown_version_is_its_own_error() -> None:
    """A `v` this side does not read is refused with its own reason, for both contracts."""
    for parse, attrs in ((AlarmAttrs.from_attrs, EDGE_ALARM), (parse_outbox_event, THINNED)):
        for v in (2, 0, "1", None, True):
            with pytest.raises(UnsupportedAttrsVersionError) as info:
                parse({**attrs, "v": v})
            assert info.value.reason == "attrs_version"


def test_alarm_extra_may_not_shadow_a_field() -> None:
    """Writing an `extra` key that the contract names is refused, not silently overwritten."""
    with pytest.raises(AttrsError):
        AlarmAttrs("d/p/high", "high", AlarmState.RAISED, 1, extra={"level": 2}).to_attrs()


# --- outbox reports -------------------------------------------------------------------------


@pytest.mark.parametrize("attrs", [THINNED, DISK_FULL_DROP, POWER_CUT, EPISODE])
def test_outbox_reports_of_todays_agents_round_trip(attrs: dict[str, Any]) -> None:
    """Every report an outbox writes today parses and renders back to the same map."""
    report = parse_outbox_event(attrs)
    assert report is not None and report.to_attrs() == attrs


def test_loss_report_kinds_and_old_forms() -> None:
    """Kinds as central's delivery view counts them; a report without points still reads."""
    kinds = [LossReport.from_attrs(a).kind for a in (THINNED, DISK_FULL_DROP, POWER_CUT)]
    assert kinds == ["thinned", "dropped", "power_cut"]
    bare = LossReport.from_attrs({"event": "outbox_dropped", "records": 1, "first_seq": 4,
                                  "last_seq": 4})
    assert (bare.points, bare.reason, bare.kind) == ((), None, "dropped")
    assert parse_outbox_event({"event": "local_write", "written": 3}) is None
    assert parse_outbox_event({"event": ["outbox_dropped"]}) is None
    assert parse_outbox_event(None) is None


def test_loss_report_names_at_most_the_listed_points() -> None:
    """Past MAX_POINTS_LISTED points a report names the first ones and counts the rest."""
    points = {f"d/p{i:04d}" for i in range(MAX_POINTS_LISTED + 7)}
    r = LossReport.naming(OutboxEvent.DROPPED, 9, 1, 9, points)
    assert len(r.points) == MAX_POINTS_LISTED and r.points_more == 7
    assert r.to_attrs()["points_more"] == 7 and LossReport.from_attrs(r.to_attrs()) == r


@pytest.mark.parametrize(("attrs", "field"), [
    ({**THINNED, "first_seq": 0}, "first_seq"), ({**THINNED, "last_seq": 10}, "last_seq"),
    ({**THINNED, "records": 51}, "records"), ({**THINNED, "records": True}, "records"),
    ({**THINNED, "records": -1}, "records"), ({**THINNED, "first_seq": 2**63}, "first_seq"),
    ({**DISK_FULL_DROP, "reason": "gremlins"}, "reason"), ({**THINNED, "points": "d/a"}, "points"),
    ({**THINNED, "points": [1]}, "points"), ({**EPISODE, "held": None}, "held"),
    ({**EPISODE, "until_ms": "soon"}, "until_ms")])
def test_malformed_outbox_reports_raise_a_typed_error(attrs: dict[str, Any], field: str) -> None:
    """A report that claims to be an outbox report and does not fit is an AttrsError."""
    with pytest.raises(AttrsError) as info:
        parse_outbox_event(attrs)
    assert (info.value.contract, info.value.field) == ("outbox_event", field)


_SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
_KEYS = st.sampled_from(["alarm_id", "rule", "state", "level", "prev_level", "threshold",
                         "since_ms", "event", "records", "first_seq", "last_seq", "points",
                         "reason", "v", "held", "until_ms", "x"])
_MAPS = st.dictionaries(_KEYS, st.recursive(_SCALAR, lambda c: st.lists(c, max_size=3)
                                            | st.dictionaries(st.text(max_size=3), c, max_size=3),
                                            max_leaves=6), max_size=10)
_EVENTS = st.sampled_from([*(str(e) for e in OutboxEvent), "other"])


@given(_MAPS, _EVENTS)
def test_garbage_raises_only_attrs_errors(attrs: dict[str, Any], event: str) -> None:
    """Whatever the map holds, the parsers return a contract or raise AttrsError."""
    for parse, a in ((AlarmAttrs.from_attrs, attrs), (parse_outbox_event, attrs),
                     (parse_outbox_event, {**attrs, "event": event})):
        try:
            parse(a)
        except AttrsError:
            pass


@given(st.integers(1, 2**40), st.integers(0, 2**20), st.sets(st.text(min_size=1, max_size=5),
                                                               max_size=5),
       st.sampled_from([None, *LossReason]))
def test_loss_report_round_trip(first: int, extra: int, points: set[str],
                                reason: LossReason | None) -> None:
    """from_attrs(to_attrs(r)) == r for any valid report."""
    r = LossReport.naming(OutboxEvent.DROPPED, extra + 1, first, first + extra, points,
                          reason=reason)
    assert LossReport.from_attrs(r.to_attrs()) == r


# --- the one definition on both sides ------------------------------------------------------


def test_edge_and_central_share_the_enums() -> None:
    """The edge's rule kinds and states and central's edge states are the contract's."""
    assert rules.RuleKind is alarm_attrs.RuleKind and rules.AlarmState is alarm_attrs.AlarmState
    assert EdgeState is alarm_attrs.AlarmState


def test_edge_alarm_records_read_at_central() -> None:
    """What the edge's rule engine writes, central's alarm engine reads field for field."""
    engine = RuleEngine([Rule("gas-1", "gas-1/gas_lel", RuleKind.HIGH, (25.0, 50.0), 2.0)])
    (ev,) = engine.on_samples([Sample("gas-1/gas_lel", T0, 60.0)]).events
    rec = ev.to_record()
    assert rec.attrs == {**EDGE_ALARM, "since_ms": T0}
    got = event_from_record("gw", "s", Record(7, rec.kind, rec.ts_ms, rec.point, rec.value,
                                              attrs=rec.attrs))
    assert (got.alarm_key, got.rule, got.state, got.level, got.threshold) == (
        "gas-1/gas_lel/high", "high", EdgeState.RAISED, 2, 50.0)


def test_narrowband_copy_reads_at_central() -> None:
    """Central's copy of a narrowband entry is a valid alarm record under the same contract."""
    entry = AlarmEntry(seq=5, point=0, rule=AlarmRule.DEVICE_OFFLINE,
                       state=AlarmTransition.RAISED, level=1, ts=T0 // 1000, value=None)
    rec = alarm_record(entry, "gas-1/_device", bearer="beidou")
    got = event_from_record("gw", "s", rec)
    assert (got.alarm_key, got.rule, got.bearer) == ("gas-1/_device/device_offline",
                                                     "device_offline", "beidou")


def test_edge_loss_reports_read_at_central() -> None:
    """The budget's, the power-cut and the disk-full reports become central's loss rows."""
    thin = Eviction("thinned")
    thin.add([11, 12, 20], {"d/a"})
    cut = Skipped(first_seq=2, last_seq=257, boot_id="b-1")
    rows = [loss_report(41, T0, thin.report(4).to_attrs()),
            loss_report(42, T0, cut.report().to_attrs()),
            loss_report(43, T0, LossReport.from_attrs(DISK_FULL_DROP).to_attrs())]
    assert [(r.kind, r.first_seq, r.last_seq, r.records) for r in rows if r] == [
        ("thinned", 11, 20, 3), ("power_cut", 2, 257, 256), ("dropped", 7, 12, 5)]
    assert cut.report().to_attrs() == {**POWER_CUT, "records": 256}
    assert loss_report(44, T0, EPISODE) is None
    assert DiskFullEpisode.from_attrs(EPISODE).to_attrs() == EPISODE
    assert outbox_events.LOSS_EVENTS == {OutboxEvent.THINNED, OutboxEvent.DROPPED}


DEV, PT = envelope.DeviceInfo, envelope.PointInfo
BIRTH = envelope.Birth(gw="gw-1", stream="s1", boot_id="b", version="1", devices=(
    DEV("gas-1", "gas-detector-v1", "h", (PT(3, "gas-1/gas_lel"), PT(4, "gas-1/o2"))),
    DEV("empty", "p", "h"), DEV("tank", "p", "h", (PT(9, "level"),))))


def test_point_ordinals_agree_between_edge_and_central() -> None:
    """Every key the edge encodes as an ordinal, central decodes back to the same key (the
    device pseudo point by a device-level rule), from the birth JSON it keeps."""
    edge = point_ordinals(BIRTH)
    assert dict(edge) == {"gas-1/gas_lel": 3, "gas-1/_device": 3, "gas-1/o2": 4,
                          "tank/level": 9, "tank/_device": 9}
    central = inventory_from_birth("gw-1", "s1", envelope.to_jsonable(BIRTH)).points
    assert central == PointInventory.of_birth(BIRTH)
    for key, ordinal in edge.items():
        assert central.point(ordinal, device_level=key.endswith("/_device")) == key
    assert central.point(5) is None


@pytest.mark.parametrize("birth", [None, {"devices": {}}, {"devices": [{"id": "d"}, 3]},
                                   {"devices": [{"id": "d", "points": [{"ordinal": "1",
                                                                         "key": "d/p"}]}]},
                                   {"devices": [{"id": 7, "points": []}]}])
def test_malformed_stored_birth_is_a_typed_error(birth: Any) -> None:
    """A birth that does not read is MalformedEnvelopeError, at central a BadBirthError."""
    with pytest.raises(MalformedEnvelopeError):
        PointInventory.from_jsonable(birth)
    with pytest.raises(BadBirthError):
        inventory_from_birth("gw-1", "s1", birth)


# --- central: counted, stored, never a crashed loop ----------------------------------------


def test_bad_attrs_are_counted_per_reason() -> None:
    """Ingest counts each record whose attrs break their contract, by reason; good ones and
    EVENT records of other kinds are not counted."""
    metrics = Metrics()
    b = DataBatch(gw="gw-1", stream="s1", records=(
        alarm_rec(EDGE_ALARM, 1), alarm_rec({"state": "raised"}, 2),
        alarm_rec({**EDGE_ALARM, "v": 9}, 3), event_rec(THINNED, 4),
        event_rec({**THINNED, "records": 99}, 5), event_rec({"event": "local_write"}, 6)))
    assert count_bad_attrs(b, metrics, RejectLog()) == 3
    assert metrics.attrs_rejected == {"bad_attrs": 2, "attrs_version": 1}
    assert 'fieldlink_central_attrs_rejected_total{reason="attrs_version"} 1.0' in metrics.render()
    with pytest.raises(BadAlarmRecordError) as info:
        event_from_record("gw-1", "s1", alarm_rec({"state": "raised"}))
    assert isinstance(info.value.error, AttrsError) and info.value.error.field == "alarm_id"


async def test_bad_attrs_are_stored_and_move_nothing(tmp_path: Path) -> None:
    """A malformed loss report and alarm are kept in history; the good ones beside them count."""
    async with open_storage(f"sqlite:///{tmp_path}/central.db") as storage:
        await storage.record_state("gw-1", State(online=True, boot_id="b", version="1",
                                                 bearer="4g", backlog=0, ts_ms=NOW,
                                                 stream="s1"), now_ms=NOW)
        (res,) = await storage.write_batches([DataBatch(gw="gw-1", stream="s1", records=(
            event_rec({**THINNED, "first_seq": 1, "last_seq": 3, "records": 2}, 4),
            event_rec({**THINNED, "first_seq": 5, "last_seq": 6, "records": 9}, 7),
            alarm_rec({**EDGE_ALARM, "level": "high"}, 8),
            alarm_rec(EDGE_ALARM, 9)))])
        assert res.inserted == 4
        (s,) = (await storage.delivery("gw-1")).streams
        assert (s.lost_records_reported, s.missing, s.reported_lost) == (2, 5, 2)
