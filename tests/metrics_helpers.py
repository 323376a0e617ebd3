"""Scrape and read a Prometheus text endpoint in tests."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


class Samples:
    """Samples of one scrape, looked up by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def get(self, name: str, **labels: str) -> float:
        """The value of the one sample with this name and (at least) these labels; 0 if absent."""
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) <= 1, f"{name}{labels} matches {len(found)} samples"
        return found[0] if found else 0.0

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


def promtool_check(text: str) -> None:
    """``promtool check metrics`` must accept the exposition (lint included)."""
    promtool = shutil.which("promtool")
    assert promtool is not None
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
