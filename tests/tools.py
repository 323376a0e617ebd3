"""External tools some tests need (prometheus, promtool, grpcurl). On a developer's machine a
missing one skips those tests with a message; in CI (CI set, as .ci/run does) it fails them:
CI never goes green with tests skipped."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def require(tool: str, install: str) -> str:
    """The path of ``tool`` (this interpreter's bin directory first, then PATH); skips the test
    when it is missing, or fails it under CI. ``install`` says how to get it."""
    path = shutil.which(tool, path=str(Path(sys.executable).parent)) or shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed ({install})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must run every test", pytrace=False)
        pytest.skip(message)
    return path
