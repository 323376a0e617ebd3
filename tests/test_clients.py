"""The TypeScript and Go clients (clients/), generated from the same proto, against a live
stepserve server on the embedded model: each language's own test suite (npm test, go test)
runs generate with previews, cancel mid-stream (counted by the server's metrics), an invalid
request whose field violations the client decodes, a health check, and its example program.
Also: the committed generated code is what `make clients` generates (no drift).

Skipped with a message when node/npm or go (and their dependencies) are missing; CI installs
them (.ci/run) and fails instead of skipping."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
from pathlib import Path

import pytest

from stepserve.client import build_request, routing_metadata
from stepserve.server.config import ServerConfig

from .server_process import free_port
from .server_thread import ServerThread
from .tools import require

ROOT = Path(__file__).resolve().parent.parent
TS = ROOT / "clients/typescript"
GOPATH = f"{ROOT / 'clients/go'}:/usr/share/gocode"
GO_DEPS = Path("/usr/share/gocode/src/google.golang.org/grpc")


def _need(ok: bool, message: str) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run every test", pytrace=False)
        pytest.skip(message)


def _node_modules() -> None:
    require("npm", "Node.js and npm, e.g. Debian's nodejs and npm")
    _need((TS / "node_modules/.bin/protoc-gen-es").exists(), "run `npm ci` in clients/typescript")


def _go() -> str:
    go = require("go", "Debian's golang-go (see .ci/run for the packages)")
    _need(GO_DEPS.exists(), "the Go gRPC packages are missing (Debian's golang-google-grpc-dev, see .ci/run)")
    return go


# The routing hints of one request, as the Python client computes them: the TypeScript and Go
# tests build the same request and must compute the same (a proxy hashes on them).
ROUTING_HINTS = json.dumps(
    dict(
        routing_metadata(
            build_request(
                "a red circle",
                seed=1,
                steps=4,
                guidance_scale=7.5,
                request_id="r1",
                preview_every=2,
                loras=["b", ("a", 0.5)],
            )
        )
    )
)


@pytest.fixture(scope="module")
def live_server():
    """A server on the embedded model with a metrics port: (target, metrics URL)."""
    metrics_port = free_port()
    config = ServerConfig(host="127.0.0.1", port=0, metrics_port=metrics_port).validate()
    srv = ServerThread(config)
    yield srv.target, f"http://127.0.0.1:{metrics_port}/metrics"
    srv.stop()


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    out = subprocess.run(cmd, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-6000:]}\n{out.stderr[-4000:]}"


def test_typescript_client_against_a_live_server(live_server) -> None:
    _node_modules()
    target, metrics = live_server
    env = {
        "STEPSERVE_TARGET": target,
        "STEPSERVE_METRICS_URL": metrics,
        "STEPSERVE_ROUTING_HINTS": ROUTING_HINTS,
    }
    _run(["npm", "test"], TS, env)


def test_go_client_against_a_live_server(live_server) -> None:
    go = _go()
    target, metrics = live_server
    env = {
        "GO111MODULE": "off",
        "GOPATH": GOPATH,
        "STEPSERVE_TARGET": target,
        "STEPSERVE_METRICS_URL": metrics,
        "STEPSERVE_ROUTING_HINTS": ROUTING_HINTS,
    }
    _run([go, "vet", "stepserve/..."], ROOT, env)
    _run([go, "test", "-count=1", "stepserve/client"], ROOT, env)


def test_generated_clients_match_the_proto(tmp_path: Path) -> None:
    """`make clients` run again into a scratch directory gives the committed files."""
    _node_modules()
    _go()
    require("protoc-gen-go", "Debian's protoc-gen-go")
    require("protoc-gen-go-grpc", "Debian's protoc-gen-go-grpc")
    _run(["make", "--no-print-directory", f"CLIENTS_OUT={tmp_path}", "clients"], ROOT, {})
    for sub in ("clients/typescript/src/gen", "clients/go/src/stepserve/gen"):
        fresh, committed = tmp_path / sub, ROOT / sub
        files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
        _, mismatch, errors = filecmp.cmpfiles(fresh, committed, [str(f) for f in files], shallow=False)
        assert not mismatch and not errors, (
            f"stale generated code in {sub}: {mismatch + errors}: run make clients"
        )


def test_python_routing_hints_key_on_what_changes_pixels() -> None:
    def key(**kw: object) -> str | None:
        return dict(routing_metadata(build_request("a red circle", **kw))).get("x-stepserve-cache-key")

    base = key(seed=1, steps=4)
    assert base is not None and len(base) == 32
    # Not pixels: the request id, priority, previews.
    same = key(seed=1, steps=4, request_id="x", priority="batch", preview_every=2, preview_max_size=64)
    assert same == base
    # Pixels or bytes: seed, steps, output format; no seed, no key (a random seed each time).
    others = [key(seed=2, steps=4), key(seed=1, steps=5), key(seed=1, steps=4, output_format="webp")]
    assert len({base, *others}) == 4
    assert key(steps=4) is None
    hints = dict(routing_metadata(build_request("x", loras=["b", "a:0.5", "b:2"])))
    assert hints == {"x-stepserve-lora": "a,b"}
