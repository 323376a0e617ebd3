"""End to end with a real Prometheus server (Debian package ``prometheus``) on loopback: it
scrapes a live stepserve under load, loads the shipped alerting rules, and answers PromQL,
including every query of the shipped Grafana dashboard."""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from stepserve.client import ImageClient
from stepserve.server.config import ServerConfig

from .server_process import free_port
from .server_thread import ServerThread
from .tools import require

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/prometheus/stepserve-rules.yaml"
DASHBOARD = ROOT / "deploy/grafana/stepserve-dashboard.json"


class Prometheus:
    def __init__(self, tmp: Path, metrics_port: int) -> None:
        binary = require("prometheus", "Debian package 'prometheus'; .ci/run installs it")
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {
                            "job_name": "stepserve",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                        }
                    ],
                }
            )
        )
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        end = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None and time.monotonic() < end, "prometheus did not start"
            time.sleep(0.2)

    def api(self, path: str, **params: str) -> dict:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400 for a bad query: keep the error message
            body = json.loads(e.read())
        return body

    def query(self, expr: str) -> list[dict]:
        body = self.api("query", query=expr)
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        return list(body["data"]["result"])

    def scalar(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, ok, timeout: float = 60) -> float:
        end = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if len(result) == 1 and ok(float(result[0]["value"][1])):
                return float(result[0]["value"][1])
            assert time.monotonic() < end, f"{expr} never satisfied the condition (last: {result})"
            time.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def test_prometheus_scrapes_evaluates_rules_and_answers_dashboard_queries(
    tiny_sd_dir: Path, tmp_path: Path
) -> None:
    require("prometheus", "Debian package 'prometheus'; .ci/run installs it")
    cfg = ServerConfig(
        host="127.0.0.1", port=0, metrics_port=free_port(), models=[f"tiny={tiny_sd_dir}"], max_batch_size=2
    ).validate()
    srv = ServerThread(cfg, result_cache=True)  # the dashboard's result-cache panels need it
    prom = Prometheus(tmp_path, srv.server.metrics_port)
    try:
        prom.wait_for('up{job="stepserve"}', lambda v: v == 1)
        # A burst bigger than the batch: some requests must queue while the others run.
        n = 10
        done: list[float] = []

        def one(i: int) -> None:
            with ImageClient(srv.target) as c:
                c.generate(f"shape {i}", steps=20, seed=i, preview_every=5)
                done.append(1.0)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert len(done) == n
        prom.wait_for('sum(stepserve_requests_total{code="ok"})', lambda v: v == n)
        prom.wait_for("sum(stepserve_queue_depth) + sum(stepserve_active_requests)", lambda v: v == 0)
        # Prometheus saw the queue back up during the burst, and drain again.
        assert prom.scalar("max_over_time(stepserve_queue_depth[2m])") >= 1
        p50 = prom.scalar(
            "histogram_quantile(0.5, sum by (le) ("
            'increase(stepserve_request_duration_seconds_bucket{code="ok"}[2m])))'
        )
        assert 0 < p50 < 600 and math.isfinite(p50)
        cost = prom.scalar("sum(stepserve_cost_usd_total)")
        assert cost > 0

        # The shipped rules load and evaluate without error; a recording rule has a value.
        rules = prom.api("rules")["data"]["groups"]
        assert {g["name"] for g in rules} == {"stepserve.recording", "stepserve.alerts"}
        prom.wait_for("sum(stepserve:images:rate5m)", lambda v: v > 0)
        for g in prom.api("rules")["data"]["groups"]:
            for rule in g["rules"]:
                assert rule["health"] == "ok", rule
                if rule["type"] == "alerting":
                    assert rule["state"] == "inactive", rule  # a healthy server raises no alert

        # Every dashboard query is valid PromQL against real data, and the core panels have data.
        dashboard = json.loads(DASHBOARD.read_text())
        empty = []
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", "2m")
                expr = re.sub(r"\$(job|model)", ".*", expr)
                if not prom.query(expr):
                    empty.append(panel["title"])
        # Only panels about things this run never had are allowed to be empty.
        assert set(empty) <= {"Accelerator memory (CUDA)", "Outcomes by code"}, empty
    finally:
        prom.stop()
        srv.stop()
