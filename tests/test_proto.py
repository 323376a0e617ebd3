"""The API stays compatible with the last released proto: `buf breaking` against its image
(proto/released/, built with `buf build` from the release's proto; replace it on a release)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .tools import require

ROOT = Path(__file__).resolve().parent.parent
(RELEASED,) = sorted((ROOT / "proto/released").glob("*.binpb"))


def _breaking(module: Path) -> subprocess.CompletedProcess[str]:
    buf = require("buf", "PyPI buf-bin, in .[dev]")
    return subprocess.run(
        [buf, "breaking", str(module), "--against", str(RELEASED)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_proto_has_no_breaking_change_since_the_release() -> None:
    out = _breaking(ROOT / "proto")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_check_sees_a_breaking_change(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "proto/stepserve", tmp_path / "stepserve")
    proto = tmp_path / "stepserve/v1/image_generation.proto"
    text = proto.read_text()
    proto.write_text(text.replace("string negative_prompt = 3;", "string negative_prompt = 30;"))
    out = _breaking(tmp_path)
    assert out.returncode != 0 and "negative_prompt" in out.stdout + out.stderr
