"""Start ``stepserve serve`` as a real subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``stepserve-client --target TARGET ARGS...``."""
    return subprocess.run(
        [str(BIN / "stepserve-client"), "--target", target, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def start_server(
    model_dir: Path,
    log: Path,
    *extra: str,
    metrics_port: int = 0,
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    wait: bool = True,
) -> tuple[subprocess.Popen[bytes], str]:
    """Serve ``model_dir`` as model ``tiny`` on ``host``; returns once health says SERVING
    (``wait`` false: at once, then call :func:`wait_ready`). The result cache is off unless
    ``extra`` turns it on (see ServerThread)."""
    port = free_port()
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [
                str(BIN / "stepserve"),
                "serve",
                "--host",
                host,
                "--port",
                str(port),
                "--model",
                f"tiny={model_dir}",
                "--metrics-port",
                str(metrics_port),
                "--result-cache-bytes",
                "0",
                *extra,
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
    target = f"{host}:{port}"
    if wait:
        wait_ready(proc, target, log)
    return proc, target


def wait_ready(proc: subprocess.Popen[bytes], target: str, log: Path) -> None:
    """Return once the server at ``target`` says SERVING (kill it and fail if it never does)."""
    ready = client(target, "health", "--wait", "120")
    if ready.returncode != 0:
        proc.kill()
        raise AssertionError(f"server did not become ready:\n{log.read_text()}")
