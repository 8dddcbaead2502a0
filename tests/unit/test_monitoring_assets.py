"""The Grafana dashboard and the alert rules only use metrics the code really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from torchrelay.services.ingest.handlers import IngestMetrics
from torchrelay.services.monitor.handlers import EventMetrics
from torchrelay.services.monitor.sweeps import SweepMonitor
from torchrelay.services.serve.server.app import ServerMetrics
from torchrelay.shared.events import AnyEvent
from torchrelay.shared.runtime.metrics import RuntimeMetrics, reconciled_counter
from torchrelay.shared.state import MemoryState

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "k8s" / "base" / "monitoring" / "grafana-dashboard.json"
ALERTS = ROOT / "k8s" / "base" / "monitoring" / "alerts.yaml"
METRIC = re.compile(r"\btorchrelay_[a-z_]+\b")


async def _ignore(_: AnyEvent) -> bool:
    return True


def exported_names() -> set[str]:
    registry = CollectorRegistry()
    RuntimeMetrics(registry, "test", "0")
    EventMetrics(registry)
    SweepMonitor(state=MemoryState(), publish=_ignore, source="/test", registry=registry)
    IngestMetrics(registry)
    ServerMetrics(registry, "digits")
    reconciled_counter(registry)
    names = set()
    for metric in registry.collect():
        names.add(metric.name)
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
            "info": ["_info"],
        }
        names.update(metric.name + suffix for suffix in suffixes.get(metric.type, []))
    return names


def panels() -> list[dict[str, Any]]:
    """The dashboard's panels that query (rows only group them)."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


def alert_expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_the_dashboard_picks_its_prometheus_data_source() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("pipeline", "loss", "latency", "errors", "restarts", "dead letters", "sweeps"):
        assert topic in titles


def test_every_metric_in_the_dashboard_and_the_rules_is_exported() -> None:
    known = exported_names()
    for expression in dashboard_expressions() + alert_expressions():
        for name in METRIC.findall(expression):
            assert name in known, f"{name} (in {expression!r}) is not exported by any service"


def test_the_rules_cover_the_alerts_operators_need() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {
        "TorchrelayRunStalled",
        "TorchrelayRestartsExhausted",
        "TorchrelayDeadLettersRising",
        "TorchrelayModelServerErrors",
    } <= names
