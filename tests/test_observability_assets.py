"""The shipped Prometheus rules and Grafana dashboard: rules pass promtool's checks and unit
tests, and every stepserve metric they name is one the server exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from stepserve.server.observability.metrics import EngineCollector, Metrics

from .tools import require

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/prometheus/stepserve-rules.yaml"
RULE_TESTS = ROOT / "deploy/prometheus/stepserve-rules.test.yaml"
DASHBOARD = ROOT / "deploy/grafana/stepserve-dashboard.json"

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


def exported_names() -> set[str]:
    """Every sample name the server can export (CUDA memory only exists on GPU replicas)."""
    metrics = Metrics(process_collectors=False)
    metrics.registry.register(EngineCollector(lambda: None, {"m": 4}))
    names = {"stepserve_accelerator_memory_bytes"}
    for family in metrics.registry.collect():
        names |= {family.name + s for s in SUFFIXES[family.type]}
    return names


def referenced_names(text: str) -> set[str]:
    return set(re.findall(r"\bstepserve_[a-z_]+\b", text))


def test_dashboard_and_rules_name_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = referenced_names("\n".join(exprs)) | referenced_names(RULES.read_text())
    assert used - exported_names() == set()
    # The dashboard covers what operators asked for.
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in (
        "queue depth",
        "throughput",
        "latency",
        "first preview",
        "batch size",
        "cost per image",
        "by code",
    ):
        assert topic in titles, topic


def test_rules_pass_promtool_check_and_unit_tests() -> None:
    promtool = require("promtool", "Debian package 'prometheus'; .ci/run installs it")
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
