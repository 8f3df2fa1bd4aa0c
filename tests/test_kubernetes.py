"""deploy/kubernetes/: the manifests validate against Kubernetes' own schemas (kubernetes-validate,
strict: an unknown field is an error; the schemas ship inside the package, so no network), and
they agree with the agent: probe paths and ports, the endpoint's bind address, the token's
Secret, the volume, the Service, the ServiceMonitor and the plain scrape job."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from agent import config as cfgmod

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
# the oldest Kubernetes release the package has schemas for (1.25 in 1.37.0), and the newest
VERSIONS = (kubernetes_validate.utils.all_versions()[0], kubernetes_validate.latest_version())


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Validation must work offline: any connection attempt fails the test."""
    def refuse(*a, **k):
        raise AssertionError("the validation tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def by_kind(resources: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["kind"], r["metadata"]["name"]): r for r in resources}


def validate(resource: dict) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(resource, version, strict=True)


@pytest.fixture(scope="module")
def manifest() -> dict[tuple[str, str], dict]:
    return by_kind(docs("comfyui.yaml"))


@pytest.fixture(scope="module")
def defaults() -> dict:
    return yaml.safe_load((ROOT / "config" / "default.yaml").read_text())


def container(manifest) -> dict:
    (c,) = manifest[("StatefulSet", "comfyui")]["spec"]["template"]["spec"]["containers"]
    return c


def test_every_manifest_validates_offline_and_a_broken_one_does_not(manifest):
    assert set(manifest) == {("ConfigMap", "pod-agent-config"), ("Service", "comfyui"),
                             ("Service", "comfyui-pods"), ("StatefulSet", "comfyui")}
    for resource in manifest.values():
        validate(resource)
    sts = manifest[("StatefulSet", "comfyui")]
    broken = []
    for path, value in ((("livenessProbe", "httpGet", "port"), 91.88),
                        (("readinessProbe", "periodSeconds"), "five"),
                        (("ports", 0, "containerPort"), "8188"),
                        (("livenessProbe", "httpGett"), {})):
        bad = copy.deepcopy(sts)
        node = bad["spec"]["template"]["spec"]["containers"][0]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        broken.append(bad)
    for bad in broken:
        with pytest.raises(kubernetes_validate.ValidationError):
            validate(bad)
    # the ServiceMonitor is a custom resource: no schema in the package, checked below instead
    (monitor,) = docs("servicemonitor.yaml")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(monitor, VERSIONS[-1], strict=True)


def test_probes_ports_and_bind_match_the_agent(manifest, defaults, tmp_path):
    c = container(manifest)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    overlay = yaml.safe_load(manifest[("ConfigMap", "pod-agent-config")]["data"]
                             ["pod-agent.yaml"])
    assert ports == {"pod-agent": defaults["http"]["port"], "comfyui": defaults["comfyui"]["port"]}
    assert overlay["http"]["port"] == defaults["http"]["port"]
    # the kubelet probes the pod IP: the default (127.0.0.1) would fail every probe
    assert overlay["http"]["address"] == "0.0.0.0"
    assert defaults["http"]["address"] == "127.0.0.1"
    probes = {k: (c[k]["httpGet"]["path"], ports[c[k]["httpGet"]["port"]])
              for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {"startupProbe": ("/healthz", 9188), "livenessProbe": ("/healthz", 9188),
                      "readinessProbe": ("/readyz", 9188)}
    # the overlay is a configuration the agent accepts, mounted where the agent reads it
    ws = tmp_path / "workspace"
    ws.mkdir()
    (ws / "pod-agent.yaml").write_text(manifest[("ConfigMap", "pod-agent-config")]["data"]
                                       ["pod-agent.yaml"])
    conf = cfgmod.load(None, ws)
    assert (conf.http["address"], conf.http["port"]) == ("0.0.0.0", 9188)
    env = {e["name"]: e for e in c["env"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/workspace/pod-agent.yaml"]["subPath"] == "pod-agent.yaml"
    assert env["POD_AGENT_WORKSPACE"]["value"] == "/workspace"
    assert mounts["/workspace"]["name"] == "workspace"


def test_token_volume_and_services_fit_together(manifest):
    sts = manifest[("StatefulSet", "comfyui")]
    c = container(manifest)
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_AGENT_HTTP_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "pod-agent",
                                                                       "key": "token"}
    assert "value" not in env["POD_AGENT_HTTP_TOKEN"]  # never inline
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "workspace"
    volumes = {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} <= volumes | {"workspace"}
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert sts["spec"]["serviceName"] == "comfyui-pods"
    assert manifest[("Service", "comfyui-pods")]["spec"]["clusterIP"] == "None"
    container_ports = {p["name"] for p in c["ports"]}
    for name in ("comfyui", "comfyui-pods"):
        svc = manifest[("Service", name)]
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} == container_ports


def test_prometheus_scrapes_the_agents_metrics_port(manifest):
    svc = manifest[("Service", "comfyui")]
    (monitor,) = docs("servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        svc["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert endpoint["port"] == "pod-agent" and endpoint["path"] == "/metrics"
    assert "bearerTokenSecret" not in endpoint  # GET /metrics needs no token
    # the plain scrape job keeps exactly the pods and the port of the StatefulSet
    (job,) = yaml.safe_load((DEPLOY / "prometheus-scrape.yaml").read_text())["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"]
            if r.get("action") == "keep"}
    tmpl = manifest[("StatefulSet", "comfyui")]["spec"]["template"]
    assert keep == {
        ("__meta_kubernetes_pod_label_app_kubernetes_io_name",):
            tmpl["metadata"]["labels"]["app.kubernetes.io/name"],
        ("__meta_kubernetes_pod_container_port_name",): "pod-agent"}
    notes = tmpl["metadata"]["annotations"]
    assert (notes["prometheus.io/port"], notes["prometheus.io/path"]) == ("9188", "/metrics")
