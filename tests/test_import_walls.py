"""The import walls between the layers (docs/architecture.md, "Modules"), checked in fresh
interpreters so that what a module pulls in transitively counts too:

- the engine never imports the API, gRPC or the generated stubs (it talks in domain types);
- the API never imports torch or diffusers (model code runs on the engine thread only);
- the client never imports the server.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import stepserve.client
import stepserve.server.api
import stepserve.server.engine


def modules_of(package: object) -> list[str]:
    """Every module of ``package``, subpackages included."""
    path = package.__path__  # type: ignore[attr-defined]
    prefix = package.__name__ + "."  # type: ignore[attr-defined]
    return sorted(m.name for m in pkgutil.walk_packages(path, prefix))


def loaded_after_importing(modules: list[str]) -> set[str]:
    """The top-level and stepserve module names loaded by importing ``modules`` afresh."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def forbidden(loaded: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.mark.parametrize(
    ("package", "walls"),
    [
        (stepserve.server.engine, ("stepserve.server.api", "stepserve.v1", "grpc", "google.protobuf")),
        (stepserve.server.api, ("torch", "diffusers", "transformers")),
        (stepserve.client, ("stepserve.server", "torch", "diffusers")),
    ],
    ids=["engine", "api", "client"],
)
def test_layers_keep_their_import_walls(package: object, walls: tuple[str, ...]) -> None:
    modules = modules_of(package)
    assert len(modules) >= 3, modules  # the walk found the package's modules
    loaded = loaded_after_importing(modules)
    assert set(modules) <= loaded
    assert forbidden(loaded, walls) == []


def test_the_check_sees_a_breach() -> None:
    """The same check on a module that does import torch (the model adapters) reports it."""
    loaded = loaded_after_importing(["stepserve.server.engine.models.stable_diffusion"])
    assert "torch" in forbidden(loaded, ("torch",))
