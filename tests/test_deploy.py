"""deploy/: the manifests render, validate and agree with the server (deploy/check.py), and the
check catches the mistakes it exists for."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("deploy_check", ROOT / "deploy/check.py")
assert spec is not None and spec.loader is not None
check = importlib.util.module_from_spec(spec)
sys.modules["deploy_check"] = check
spec.loader.exec_module(check)


def test_every_render_passes_deploy_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert check.main([]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    for label in check.RENDERS:
        assert f"{label}:" in out


@pytest.fixture(scope="module")
def gpu_docs() -> list[dict[str, Any]]:
    return check.render("overlays/gpu", [])


def _deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "Deployment")


def _scaledobject(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "ScaledObject")


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    dep = next(d for d in docs if d["kind"] == "Deployment")
    return dep["spec"]["template"]["spec"]["containers"][0]


def _configmap(docs: list[dict[str, Any]]) -> dict[str, str]:
    return next(d for d in docs if d["kind"] == "ConfigMap")["data"]


def mutate(docs, fn) -> list[str]:
    docs = copy.deepcopy(docs)
    fn(docs)
    return check.check_docs(docs)


@pytest.mark.parametrize(
    ("what", "fn", "expect"),
    [
        (
            "grace shorter than the drain",
            lambda d: next(x for x in d if x["kind"] == "Deployment")["spec"]["template"]["spec"].update(
                terminationGracePeriodSeconds=20
            ),
            "terminationGracePeriodSeconds",
        ),
        (
            "a port typed by hand",
            lambda d: _container(d)["ports"][0].update(containerPort=8080),
            "container port grpc",
        ),
        (
            "liveness probing readiness",
            lambda d: _container(d)["livenessProbe"]["grpc"].pop("service"),
            "liveness must probe",
        ),
        ("a misspelt setting", lambda d: _configmap(d).update(STEPSERVE_PORTT="1"), "unknown settings"),
        (
            "a setting the server rejects",
            lambda d: _configmap(d).update(STEPSERVE_MAX_BATCH_SIZE="0"),
            "invalid",
        ),
        (
            "an autoscaler on a metric that does not exist",
            lambda d: next(x for x in d if x["kind"] == "ScaledObject")["spec"]["triggers"][0][
                "metadata"
            ].update(query="sum(stepserve_queue_length)"),
            "unknown metrics",
        ),
        (
            "a field Kubernetes does not know",
            lambda d: _container(d).update(imagePullPolice="Always"),
            "Deployment/stepserve",
        ),
        (
            "a writable root filesystem",
            lambda d: _container(d)["securityContext"].update(readOnlyRootFilesystem=False),
            "read-only root filesystem",
        ),
        (
            "a GPU model without a GPU",
            lambda d: _container(d)["resources"]["limits"].pop("nvidia.com/gpu"),
            "nvidia.com/gpu",
        ),
        (
            "a model path on no volume",
            lambda d: _configmap(d).update(STEPSERVE_MODELS="sd15=/data/sd15"),
            "on no mounted volume",
        ),
        (
            "replicas fixed under an autoscaler",
            lambda d: _deployment(d)["spec"].update(replicas=2),
            "drop spec.replicas",
        ),
        ("an autoscaler with no fallback", lambda d: _scaledobject(d)["spec"].pop("fallback"), "fallback"),
        (
            "an autoscaler reading every namespace",
            lambda d: _scaledobject(d)["spec"]["triggers"][1]["metadata"].update(
                query='sum(rate(stepserve_requests_total{code="rejected"}[2m]))'
            ),
            "does not keep to namespace",
        ),
        (
            "scaling on queue depth alone",
            lambda d: _scaledobject(d)["spec"]["triggers"][0]["metadata"].update(
                query='sum(stepserve_queue_depth{namespace="stepserve"})'
            ),
            "saturation trigger",
        ),
        (
            "a readiness probe that flaps",
            lambda d: _container(d)["readinessProbe"].update(failureThreshold=1),
            "one missed check",
        ),
        (
            "replicas that may share a node",
            lambda d: _deployment(d)["spec"]["template"]["spec"].pop("topologySpreadConstraints"),
            "spread over nodes and zones",
        ),
        (
            "GPU pod memory that can be squeezed",
            lambda d: _container(d)["resources"]["requests"].update(memory="8Gi"),
            "memory request must equal its limit",
        ),
        (
            "a CUDA cache on the read-only root",
            lambda d: next(e for e in _container(d)["env"] if e["name"] == "CUDA_CACHE_PATH").update(
                value="/home/stepserve/.nv"
            ),
            "CUDA_CACHE_PATH",
        ),
        (
            "emptyDirs bigger than the disk asked for",
            lambda d: _container(d)["resources"]["requests"].pop("ephemeral-storage"),
            "ephemeral-storage",
        ),
        (
            "a models volume only one node can mount",
            lambda d: next(x for x in d if x["kind"] == "PersistentVolumeClaim")["spec"].update(
                accessModes=["ReadWriteOnce"]
            ),
            "access mode",
        ),
        (
            "a models volume nobody fills",
            lambda d: d.remove(next(x for x in d if x["kind"] == "Job")),
            "no Job fills",
        ),
    ],
)
def test_deploy_check_catches(gpu_docs, what: str, fn, expect: str) -> None:
    assert check.check_docs(gpu_docs) == []
    problems = mutate(gpu_docs, fn)
    assert any(expect in p for p in problems), (what, problems)


@pytest.fixture(scope="module")
def cache_docs() -> list[dict[str, Any]]:
    return check.render(*check.RENDERS["overlays/cpu+result-cache-redis"])


def _named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize(
    ("what", "fn", "expect"),
    [
        (
            "a Redis anyone in the cluster can reach",
            lambda d: _named(d, "NetworkPolicy", check.RESULT_CACHE)["spec"]["ingress"][0]["from"][0].update(
                podSelector={}
            ),
            "only them",
        ),
        (
            "a Redis without its NetworkPolicy",
            lambda d: d.remove(_named(d, "NetworkPolicy", check.RESULT_CACHE)),
            "no NetworkPolicy",
        ),
        (
            "a URL naming another host",
            lambda d: _configmap(d).update(STEPSERVE_RESULT_CACHE_REDIS="redis://redis:6379/0"),
            "does not name",
        ),
        (
            "a Service on another port",
            lambda d: _named(d, "Service", check.RESULT_CACHE)["spec"]["ports"][0].update(port=6380),
            "port 6380",
        ),
    ],
)
def test_deploy_check_catches_result_cache_mistakes(cache_docs, what: str, fn, expect: str) -> None:
    assert check.check_docs(cache_docs) == []
    problems = mutate(cache_docs, fn)
    assert any(expect in p for p in problems), (what, problems)


@pytest.fixture(scope="module")
def envoy_docs() -> list[dict[str, Any]]:
    return check.render(*check.RENDERS["overlays/cpu+envoy"])


def _envoy_config(docs: list[dict[str, Any]], edit) -> None:
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(check.ENVOY))
    config = yaml.safe_load(cm["data"]["envoy.yaml"])
    edit(config)
    cm["data"]["envoy.yaml"] = yaml.safe_dump(config)


def _endpoint(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["clusters"][1]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]


@pytest.mark.parametrize(
    ("what", "fn", "expect"),
    [
        (
            "Envoy pods stepserve's NetworkPolicy refuses",
            lambda d: _named(d, "Deployment", check.ENVOY)["spec"]["template"]["metadata"]["labels"].pop(
                "stepserve.io/client"
            ),
            "lack stepserve.io/client",
        ),
        (
            "a cluster on another port",
            lambda d: _envoy_config(
                d, lambda c: _endpoint(c)["endpoint"]["address"]["socket_address"].update(port_value=50052)
            ),
            "not stepserve-headless:50051",
        ),
        (
            "a configuration Envoy rejects",
            lambda d: _envoy_config(
                d, lambda c: c["static_resources"]["clusters"][0].update(lb_policy="FASTEST")
            ),
            "envoy --mode validate",
        ),
    ],
)
def test_deploy_check_catches_envoy_mistakes(envoy_docs, what: str, fn, expect: str) -> None:
    assert check.check_docs(envoy_docs) == []
    problems = mutate(envoy_docs, fn)
    assert any(expect in p for p in problems), (what, problems)
