"""packaging/alerts-fieldlink.yml only names series the two metrics endpoints really serve.

Every `fieldlink_*` name in a rule's expression must be a sample name of a family scraped from
a running agent (simulator, private broker) or from central's /metrics, and every label a rule
matches on (`{lane="alarm"}`) must be a label of that series with that value among its samples.
A renamed metric then fails here, not silently in Prometheus (an alert on a missing series
never fires).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Mosquitto, wait_for
from tests.test_metrics import _scrape, agent_with_metrics, central_on_broker

RULES = Path(__file__).resolve().parent.parent / "packaging" / "alerts-fieldlink.yml"
SERIES = re.compile(r"\b(fieldlink_[a-z0-9_]+)(\{[^}]*\})?")
MATCHER = re.compile(r'([a-z_]+)\s*(=~|!=|!~|=)\s*"([^"]*)"')
# The sample names a family of each type is exposed under.
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
            "summary": ("_count", "_sum", "")}

Served = dict[str, list[dict[str, str]]]  # sample name → the label sets of its samples


def _rules(group: str) -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [r for g in doc["groups"] if g["name"] == group for r in g["rules"]]


def _used(group: str) -> Iterator[tuple[str, str, dict[str, tuple[str, str]]]]:
    """(alert, series name, {label: (operator, value)}) for each series a rule's expr names."""
    for rule in _rules(group):
        for name, braces in SERIES.findall(str(rule["expr"])):
            yield str(rule["alert"]), name, {k: (op, v) for k, op, v in MATCHER.findall(braces)}


def _served(text: str) -> Served:
    out: Served = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):  # a family with no samples yet too
            out.setdefault(family.name + suffix, [])
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def _unserved(group: str, served: Served) -> list[str]:
    """What the group's rules name that `served` lacks, one line each."""
    problems = []
    for alert, name, matchers in _used(group):
        if name not in served:
            problems.append(f"{alert}: {name} is not served")
            continue
        for label, (op, value) in matchers.items():
            values = {s.get(label) for s in served[name]}
            if op == "=" and value not in values:
                problems.append(f"{alert}: no {name}{{{label}={value!r}}} (has {values})")
            elif op == "=~" and not any(v and re.fullmatch(value, v) for v in values):
                problems.append(f"{alert}: no {name}{{{label}=~{value!r}}} (has {values})")
    return problems


def test_rules_file_is_valid_and_names_only_fieldlink_series() -> None:
    """Each rule has alert, expr and a severity; each group names its own program's series."""
    for group, prefix in (("fieldlink-edge", "fieldlink_edge_"),
                          ("fieldlink-central", "fieldlink_central_")):
        rules = _rules(group)
        assert rules, group
        for rule in rules:
            assert {"alert", "expr", "labels"} <= set(rule), rule
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule  # type: ignore[index]
        names = {name for _, name, _ in _used(group)}
        assert names and all(n.startswith(prefix) for n in names), names


def test_edge_rules_name_series_a_running_agent_serves(tmp_path: Path,
                                                       mosquitto: Mosquitto) -> None:
    """The fieldlink-edge rules against a real agent's endpoint (a polled device, its outbox)."""
    with agent_with_metrics(tmp_path, mosquitto) as port:

        def scraped() -> Served | None:
            try:
                served = _served(_scrape(port))
            except OSError:
                return None
            return served if served.get("fieldlink_edge_device_up") else None

        served = wait_for(scraped, timeout=60, what="the agent's metrics with gas-1")
        assert served is not None
        assert _unserved("fieldlink-edge", served) == []


async def test_central_rules_name_series_central_serves(mosquitto: Mosquitto,
                                                        tmp_path: Path) -> None:
    """The fieldlink-central rules against central's /metrics, connected to its broker."""
    async with central_on_broker(mosquitto, tmp_path) as c:
        served = _served((await c.get("/metrics")).text)
    assert _unserved("fieldlink-central", served) == []
