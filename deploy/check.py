"""`make deploy-check`: render every kustomization, validate it offline against the Kubernetes
schemas, lint the Dockerfile, and check that the manifests agree with the server itself.

The ports, drain timeout and every other server setting are written once, in
deploy/k8s/base/stepserve.env (a ConfigMap of STEPSERVE_* variables); kustomize copies the
ports into the container ports, probes and Services. This script parses that ConfigMap with the
server's own settings parser (so a typo or a bad value fails here, not in a pod) and checks that
everything else the cluster will do agrees with it: probe ports and health service names,
termination grace vs. drain timeout, Service and NetworkPolicy ports and selectors, scrape
annotations, autoscaler targets and metrics, and the PrometheusRule vs. deploy/prometheus;
then what production clusters hit first (check_production): autoscalers that own the replica
count, scale on saturation and rejections, keep to their namespace and have a fallback; probes
that do not flap; replicas spread over nodes and zones; disk requested for the emptyDirs; GPU
memory request = limit and a writable CUDA cache; a shared models volume that can be shared,
with a Job that fills it.

    python deploy/check.py               # check (exit 1 with one line per problem)
    python deploy/check.py --write-rules # regenerate the PrometheusRule from deploy/prometheus
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy/k8s"
RULES = ROOT / "deploy/prometheus/stepserve-rules.yaml"
PROMETHEUS_RULE = K8S / "components/prometheus-operator/prometheusrule.yaml"
DOCKERFILE = ROOT / "deploy/docker/Dockerfile"
ADAPTER_VALUES = K8S / "components/hpa/prometheus-adapter-values.yaml"
K8S_VERSION = "1.37.0"

# What gets rendered: every overlay, the base, and the base with the components no overlay uses.
RENDERS: dict[str, tuple[str, list[str]]] = {
    "base": ("base", []),
    "overlays/cpu": ("overlays/cpu", []),
    "overlays/gpu": ("overlays/gpu", []),
    "base+hpa+models-init": ("base", ["components/hpa", "components/models-init"]),
    "base+models-node-cache": ("base", ["components/models-node-cache"]),
    # As an overlay lists it: the shared result cache's Redis, in the overlay's namespace.
    "overlays/cpu+result-cache-redis": ("overlays/cpu", ["components/result-cache-redis"]),
    "overlays/cpu+envoy": ("overlays/cpu", ["components/envoy"]),
}
# Envoy in front of the replicas (components/envoy): checked by check_envoy.
ENVOY = "stepserve-envoy"
# The result cache's Redis (components/result-cache-redis): its objects are checked by
# check_result_cache, not as stepserve's.
RESULT_CACHE = "stepserve-result-cache"
# Custom resources: no upstream schema to validate against; checked by this script instead.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}


def _tool(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found (make setup installs it into .venv)")
    return found


def render(base: str, components: list[str]) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of deploy/k8s/BASE, with extra components layered on top."""
    kubectl = _tool("kubectl")
    if not components:
        out = subprocess.run(
            [kubectl, "kustomize", str(K8S / base)], capture_output=True, text=True, check=False
        )
    else:
        # Components layered on an overlay land in its namespace, as when the overlay lists them.
        namespace = yaml.safe_load((K8S / base / "kustomization.yaml").read_text()).get("namespace")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "kustomization.yaml").write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "kustomize.config.k8s.io/v1beta1",
                        "kind": "Kustomization",
                        **({"namespace": namespace} if namespace else {}),
                        "resources": [os.path.relpath(K8S / base, tmp)],  # kustomize wants relative paths
                        "components": [os.path.relpath(K8S / c, tmp) for c in components],
                    }
                )
            )
            out = subprocess.run(
                [kubectl, "kustomize", "--load-restrictor", "LoadRestrictionsNone", tmp],
                capture_output=True,
                text=True,
                check=False,
            )
    if out.returncode != 0:
        raise SystemExit(f"kustomize {base} {components}: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def prometheus_rule() -> dict[str, Any]:
    """deploy/prometheus/stepserve-rules.yaml as a Prometheus Operator PrometheusRule."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "stepserve"},
        "spec": yaml.safe_load(RULES.read_text()),
    }


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any] | None:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found[0] if len(found) == 1 else None


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def exported_metric_names() -> set[str]:
    from stepserve.server.observability.metrics import EngineCollector, Metrics

    metrics = Metrics(process_collectors=False)
    metrics.registry.register(EngineCollector(lambda: None, {"m": 1}))
    return {f.name + s for f in metrics.registry.collect() for s in ("", "_total")}


def check_docs(docs: list[dict[str, Any]]) -> list[str]:
    """Problems in one rendered kustomization (empty when all agree)."""
    from stepserve.server.app import LIVENESS_SERVICE
    from stepserve.server.config import ConfigError, ServerConfig, add_arguments, from_args

    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    for d in docs:
        if (d["apiVersion"], d["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(
                f"{d['kind']}/{d['metadata']['name']}: {e.message} at {'.'.join(map(str, e.path))}"
            )

    cms = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("stepserve-config")
    ]
    dep = _one(docs, "Deployment", "stepserve")
    if len(cms) != 1 or dep is None:
        return [*problems, "expected one stepserve-config ConfigMap and one stepserve Deployment"]
    env = cms[0]["data"]
    known = {"STEPSERVE_" + k.upper() for k in ServerConfig.__dataclass_fields__}
    need(not set(env) - known, f"ConfigMap sets unknown settings: {sorted(set(env) - known)}")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    try:
        cfg = from_args(parser.parse_args([]), environ={k: v for k, v in env.items() if k in known})
    except (ConfigError, ValueError) as e:
        return [*problems, f"ConfigMap settings are invalid for the server: {e}"]

    pod = dep["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    spec = pod["spec"]
    (c,) = [c for c in spec["containers"] if c["name"] == "stepserve"]
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    need(
        ports.get("grpc") == cfg.port, f"container port grpc {ports.get('grpc')} != STEPSERVE_PORT {cfg.port}"
    )
    need(
        ports.get("metrics") == (cfg.metrics_port or None),
        f"container port metrics {ports.get('metrics')} != STEPSERVE_METRICS_PORT {cfg.metrics_port}",
    )
    need(
        any(
            e.get("configMapRef", {}).get("name") == cms[0]["metadata"]["name"] for e in c.get("envFrom", [])
        ),
        "the container does not take its environment from the stepserve-config ConfigMap",
    )
    need(_selects(dep["spec"]["selector"]["matchLabels"], labels), "Deployment selector misses its pods")

    probes = {k: c.get(k) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    for name, probe in probes.items():
        need(probe is not None and "grpc" in probe, f"{name}: must be a gRPC health probe")
        if probe and "grpc" in probe:
            need(probe["grpc"]["port"] == cfg.port, f"{name} port {probe['grpc']['port']} != {cfg.port}")
    if all(p and "grpc" in p for p in probes.values()):
        need(
            probes["readinessProbe"]["grpc"].get("service", "") == "", "readiness must probe the server ('')"
        )
        need(
            probes["livenessProbe"]["grpc"].get("service") == LIVENESS_SERVICE,
            f"liveness must probe {LIVENESS_SERVICE!r} (serving while draining)",
        )
        start = probes["startupProbe"]
        budget = start.get("periodSeconds", 10) * start.get("failureThreshold", 3)
        need(budget >= 300, f"startupProbe allows {budget}s for model load; want >= 300")

    pre = c.get("lifecycle", {}).get("preStop", {})
    pre_s = pre.get("sleep", {}).get("seconds", 0)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    need(
        grace >= pre_s + cfg.drain_timeout_s + 5,
        f"terminationGracePeriodSeconds {grace} < preStop {pre_s}s + drain {cfg.drain_timeout_s}s + 5s",
    )
    ann = pod["metadata"].get("annotations", {})
    if ann.get("prometheus.io/scrape") == "true":
        need(ann.get("prometheus.io/port") == str(cfg.metrics_port), "prometheus.io/port != metrics port")

    sec = c.get("securityContext", {})
    need(spec.get("securityContext", {}).get("runAsNonRoot") is True, "pod must set runAsNonRoot")
    need(sec.get("readOnlyRootFilesystem") is True, "container must have a read-only root filesystem")
    need(sec.get("allowPrivilegeEscalation") is False, "container must forbid privilege escalation")
    need("ALL" in sec.get("capabilities", {}).get("drop", []), "container must drop ALL capabilities")
    need(any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), "/tmp must be a writable volume")
    if cfg.device.startswith("cuda"):
        need(
            "nvidia.com/gpu" in c.get("resources", {}).get("limits", {}), "a cuda device needs nvidia.com/gpu"
        )
    for spec_path in (m.split("=", 1)[1] for m in cfg.models):
        need(
            any(spec_path.startswith(m["mountPath"] + "/") for m in c.get("volumeMounts", [])),
            f"model path {spec_path} is on no mounted volume",
        )

    for svc in (
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] not in (RESULT_CACHE, ENVOY)
    ):
        name = svc["metadata"]["name"]
        need(_selects(svc["spec"].get("selector", {}), labels), f"Service {name} selects no stepserve pod")
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort")
            need(target in ports, f"Service {name} targets port {target!r}, not a container port name")
            if p["name"] == "grpc":
                need(p["port"] == cfg.port, f"Service {name} grpc port {p['port']} != {cfg.port}")
    need(
        any(s["spec"].get("clusterIP") == "None" for s in docs if s["kind"] == "Service"),
        "a headless Service is needed for client-side load balancing",
    )
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        obj = _one(docs, kind, "stepserve")
        sel = (
            (obj or {})
            .get("spec", {})
            .get("selector" if kind == "PodDisruptionBudget" else "podSelector", {})
        )
        need(
            obj is not None and _selects(sel.get("matchLabels", {}), labels),
            f"{kind} does not select the pods",
        )
    netpol = _one(docs, "NetworkPolicy", "stepserve")
    if netpol is not None:
        opened = {p["port"] for rule in netpol["spec"].get("ingress", []) for p in rule.get("ports", [])}
        need(
            opened == {cfg.port, cfg.metrics_port},
            f"NetworkPolicy opens {opened}, server listens on { {cfg.port, cfg.metrics_port} }",
        )

    exported = exported_metric_names()
    for so in (d for d in docs if d["kind"] == "ScaledObject"):
        need(
            so["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"],
            "ScaledObject targets another Deployment",
        )
        for trig in so["spec"]["triggers"]:
            names = set(re.findall(r"\bstepserve_[a-z_]+", trig["metadata"].get("query", "")))
            need(
                bool(names) and names <= exported,
                f"ScaledObject query uses unknown metrics {names - exported}",
            )
            need(float(trig["metadata"]["threshold"]) > 0, "ScaledObject threshold must be > 0")
    adapter = adapter_metrics()
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        need(
            hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "HPA targets another Deployment"
        )
        for m in hpa["spec"]["metrics"]:
            name = m.get("pods", {}).get("metric", {}).get("name")
            need(
                name in exported or name in adapter,
                f"HPA metric {name} is neither exported by the server nor made by prometheus-adapter",
            )
    for name, used in adapter.items():
        need(used <= exported, f"prometheus-adapter's {name} uses unknown metrics {used - exported}")
    for pm in (d for d in docs if d["kind"] == "PodMonitor"):
        need(_selects(pm["spec"]["selector"]["matchLabels"], labels), "PodMonitor does not select the pods")
        for ep in pm["spec"]["podMetricsEndpoints"]:
            need(ports.get(ep["port"]) == cfg.metrics_port, f"PodMonitor scrapes port {ep['port']!r}")
    for pr in (d for d in docs if d["kind"] == "PrometheusRule"):
        need(pr["spec"] == prometheus_rule()["spec"], "PrometheusRule is stale: run make deploy-rules")
    return (
        problems
        + check_result_cache(docs, labels, cfg)
        + check_envoy(docs, labels, cfg)
        + check_production(docs, dep, cfg)
    )


def check_result_cache(docs: list[dict[str, Any]], labels: dict[str, str], cfg: Any) -> list[str]:
    """With a result cache Redis in the manifests: STEPSERVE_RESULT_CACHE_REDIS names its
    Service and port, the Service selects its pods, and its NetworkPolicy lets the stepserve
    pods (and only them) in on that port; and a URL never points at a Redis not deployed here."""
    from urllib.parse import urlsplit

    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    dep = _one(docs, "Deployment", RESULT_CACHE)
    if dep is None:
        host = urlsplit(cfg.result_cache_redis).hostname or ""
        need(
            not host.startswith(RESULT_CACHE),
            f"STEPSERVE_RESULT_CACHE_REDIS points at {host}, which is not deployed",
        )
        return problems
    url = urlsplit(cfg.result_cache_redis)
    need(
        (url.hostname or "").split(".")[0] == RESULT_CACHE,
        f"STEPSERVE_RESULT_CACHE_REDIS {cfg.result_cache_redis!r} does not name the {RESULT_CACHE} Service",
    )
    pod_labels = dep["spec"]["template"]["metadata"].get("labels", {})
    container_ports = {
        p["name"]: p["containerPort"]
        for c in dep["spec"]["template"]["spec"]["containers"]
        for p in c["ports"]
    }
    svc = _one(docs, "Service", RESULT_CACHE)
    need(svc is not None, f"no Service {RESULT_CACHE}")
    if svc is not None:
        need(
            _selects(svc["spec"].get("selector", {}), pod_labels),
            f"Service {RESULT_CACHE} selects no Redis pod",
        )
        (port,) = svc["spec"]["ports"]
        need(port["port"] == (url.port or 6379), f"Service {RESULT_CACHE} port {port['port']} != the URL's")
        need(port.get("targetPort") in container_ports, f"Service {RESULT_CACHE} targets no container port")
    netpol = _one(docs, "NetworkPolicy", RESULT_CACHE)
    need(netpol is not None, f"no NetworkPolicy {RESULT_CACHE}: anything in the cluster could read the cache")
    if netpol is not None:
        need(
            _selects(netpol["spec"]["podSelector"].get("matchLabels", {}), pod_labels),
            f"NetworkPolicy {RESULT_CACHE} does not select the Redis pods",
        )
        rules = netpol["spec"].get("ingress", [])
        need(
            bool(rules)
            and all(
                _selects(peer.get("podSelector", {}).get("matchLabels", {}), labels)
                for rule in rules
                for peer in rule.get("from", [{}])
            ),
            f"NetworkPolicy {RESULT_CACHE} must admit the stepserve pods and only them",
        )
        opened = {p["port"] for rule in rules for p in rule.get("ports", [])}
        need(
            opened <= set(container_ports.values()) | set(container_ports),
            f"NetworkPolicy {RESULT_CACHE} opens {opened}",
        )
        need((url.port or 6379) in opened, f"NetworkPolicy {RESULT_CACHE} does not open the URL's port")
    return problems


def adapter_metrics() -> dict[str, set[str]]:
    """The custom metrics prometheus-adapter's values define, with the server metrics each uses."""
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    return {
        rule["name"]["as"]: set(re.findall(r"\bstepserve_[a-z_]+", rule["metricsQuery"]))
        for rule in values["rules"]["custom"]
    }


_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(quantity)).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def check_production(docs: list[dict[str, Any]], dep: dict[str, Any], cfg: Any) -> list[str]:
    """What production clusters hit first: autoscaling that owns the replica count and means
    saturation, probes that do not flap, replicas spread, disk and GPU memory requested."""
    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    spec = dep["spec"]["template"]["spec"]
    labels = dep["spec"]["template"]["metadata"].get("labels", {})
    (c,) = [c for c in spec["containers"] if c["name"] == "stepserve"]
    namespace = dep["metadata"].get("namespace")

    scalers = [d for d in docs if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")]
    if scalers:
        need("replicas" not in dep["spec"], "an autoscaler owns the replica count: drop spec.replicas")
    for so in (d for d in docs if d["kind"] == "ScaledObject"):
        fallback = so["spec"].get("fallback", {})
        need(fallback.get("replicas", 0) >= 1, "ScaledObject needs a fallback for when Prometheus is down")
        queries = [t["metadata"].get("query", "") for t in so["spec"]["triggers"]]
        for q in queries:
            for selector in re.findall(r"\bstepserve_[a-z_]+(\{[^}]*\})?", q):
                need(
                    namespace is None or f'namespace="{namespace}"' in selector,
                    f"ScaledObject query {q!r} does not keep to namespace {namespace!r}",
                )
        saturation = {"stepserve_queue_depth", "stepserve_active_requests", "stepserve_max_batch_size"}
        need(
            any(saturation <= set(re.findall(r"\bstepserve_[a-z_]+", q)) for q in queries),
            "ScaledObject needs a saturation trigger: (queue depth + active requests) / max batch size",
        )
        need(
            any("stepserve_requests_total" in q and 'code="rejected"' in q for q in queries),
            "ScaledObject needs a trigger on the rejection rate",
        )

    ready, live = c.get("readinessProbe", {}), c.get("livenessProbe", {})
    for name, probe in (("readinessProbe", ready), ("livenessProbe", live)):
        need(probe.get("timeoutSeconds", 1) >= 2, f"{name}: timeoutSeconds under 2 s flaps under load")
    need(ready.get("failureThreshold", 3) >= 2, "readinessProbe: one missed check must not drop the pod")

    keys = {
        t["topologyKey"]
        for t in spec.get("topologySpreadConstraints", [])
        if _selects(t.get("labelSelector", {}).get("matchLabels", {}), labels)
    }
    need(
        {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys,
        "replicas must be spread over nodes and zones (topologySpreadConstraints)",
    )

    def requested(container: dict[str, Any], resource: str) -> float:
        return _bytes(container.get("resources", {}).get("requests", {}).get(resource, "0"))

    disk = max(
        [sum(requested(x, "ephemeral-storage") for x in spec["containers"])]
        + [requested(x, "ephemeral-storage") for x in spec.get("initContainers", [])]
    )
    empty_dirs = sum(_bytes(v["emptyDir"].get("sizeLimit", "0")) for v in spec["volumes"] if "emptyDir" in v)
    need(disk >= empty_dirs, f"ephemeral-storage requested ({disk:.0f} B) < the emptyDirs' size limits")

    if cfg.device.startswith("cuda"):
        res = c.get("resources", {})
        need(
            res.get("requests", {}).get("memory") == res.get("limits", {}).get("memory"),
            "a GPU pod's memory request must equal its limit",
        )
        cache = next((e.get("value", "") for e in c.get("env", []) if e["name"] == "CUDA_CACHE_PATH"), "")
        need(
            any(
                cache.startswith(m["mountPath"] + "/")
                for m in c.get("volumeMounts", [])
                if not m.get("readOnly")
            ),
            "CUDA_CACHE_PATH must be on a writable volume (the root filesystem is read-only)",
        )

    claims = {
        v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v
    }
    for claim in claims:
        pvc = _one(docs, "PersistentVolumeClaim", claim)
        need(pvc is not None, f"PersistentVolumeClaim {claim} is not in the manifests")
        if pvc is None:
            continue
        modes = set(pvc["spec"].get("accessModes", []))
        need(
            bool(modes & {"ReadWriteMany", "ReadOnlyMany"}),
            f"PersistentVolumeClaim {claim}: every replica mounts it, so it needs a *Many access mode",
        )
        need("storageClassName" in pvc["spec"], f"PersistentVolumeClaim {claim} must name its storage class")
        fillers = [
            j
            for j in docs
            if j["kind"] == "Job"
            and any(
                v.get("persistentVolumeClaim", {}).get("claimName") == claim
                for v in j["spec"]["template"]["spec"].get("volumes", [])
            )
        ]
        need(bool(fillers), f"no Job fills PersistentVolumeClaim {claim}")
    return problems


def check_dockerfile() -> list[str]:
    from stepserve.server.config import ServerConfig

    problems = []
    out = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        problems.append(f"hadolint: {out.stdout.strip()} {out.stderr.strip()}")
    exposed = {
        int(p)
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("EXPOSE")
        for p in line.split()[1:]
    }
    defaults = ServerConfig()
    if exposed != {defaults.port, defaults.metrics_port}:
        problems.append(f"Dockerfile EXPOSE {exposed} != the server's default ports")
    return problems


def check_envoy(docs: list[dict[str, Any]], labels: dict[str, str], cfg: Any) -> list[str]:
    """With Envoy in the manifests: its clusters point at the headless Service on the gRPC
    port, its pods are clients stepserve's NetworkPolicy admits, its Service selects them, and
    its configuration passes ``envoy --mode validate`` (where the binary is installed)."""
    problems: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            problems.append(msg)

    dep = _one(docs, "Deployment", ENVOY)
    if dep is None:
        return problems
    cm = next((d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith(ENVOY)), None)
    need(cm is not None, f"no ConfigMap {ENVOY}")
    if cm is None:
        return problems
    text = cm["data"]["envoy.yaml"]
    config = yaml.safe_load(text)
    headless = _one(docs, "Service", "stepserve-headless")
    for cluster in config["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for ep in group["lb_endpoints"]:
                addr = ep["endpoint"]["address"]["socket_address"]
                need(
                    addr["address"] == "stepserve-headless" and addr["port_value"] == cfg.port,
                    f"Envoy cluster {cluster['name']} points at {addr['address']}:{addr['port_value']}, "
                    f"not stepserve-headless:{cfg.port}",
                )
    need(headless is not None, "no stepserve-headless Service for Envoy's clusters")
    pod_labels = dep["spec"]["template"]["metadata"].get("labels", {})
    need(
        pod_labels.get("stepserve.io/client") == "true",
        "Envoy pods lack stepserve.io/client: stepserve refuses them",
    )
    svc = _one(docs, "Service", ENVOY)
    need(
        svc is not None and _selects(svc["spec"].get("selector", {}), pod_labels),
        f"Service {ENVOY} selects no pod",
    )
    mounted = {v["configMap"]["name"] for v in dep["spec"]["template"]["spec"]["volumes"] if "configMap" in v}
    need(cm["metadata"]["name"] in mounted, f"Envoy does not mount its ConfigMap {cm['metadata']['name']}")
    envoy = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
    if envoy is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(text)
            f.flush()
            out = subprocess.run([envoy, "--mode", "validate", "-c", f.name], capture_output=True, text=True)
        need(out.returncode == 0, f"envoy --mode validate: {out.stdout[-500:]} {out.stderr[-500:]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-rules", action="store_true", help="regenerate the PrometheusRule")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.write_rules:
        header = "# Generated by `make deploy-rules` from deploy/prometheus/stepserve-rules.yaml.\n"
        PROMETHEUS_RULE.write_text(header + yaml.safe_dump(prometheus_rule(), sort_keys=False, width=200))
        print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
        return 0
    problems = check_dockerfile()
    for label, (base, comps) in RENDERS.items():
        docs = render(base, comps)
        problems += [f"{label}: {p}" for p in check_docs(docs)]
        print(f"{label}: {len(docs)} objects rendered and checked")
    for p in problems:
        print("PROBLEM", p)
    print("deploy-check:", "FAILED" if problems else "ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
