"""The Helm chart (helm/spillway), rendered and linted by real Helm, offline.

* Helm: the Go SDK itself, through the PyPI package helm-python-sdk (no helm
  binary, no cluster): strict lint and render, with the chart's values schema.
* kubernetes-validate --strict: every rendered object against the bundled
  Kubernetes schemas for 1.29 (the first release with native sidecars on by
  default) and the newest the package has.
* `spillway check` on the config inside every rendered ConfigMap (the binary
  at target/debug/spillway, or $SPILLWAY_BIN).
* promtool (Debian's prometheus package) parses every dashboard query.

Run: python3 -m pip install -r tests/k8s/requirements.txt
     cargo build --locked --bin spillway
     python3 -m pytest tests/k8s
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "spillway"
PARENT = Path(__file__).resolve().parent / "parent-chart"
RELEASE, NAMESPACE = "demo", "shop"

# Kubernetes versions to validate against: 1.29 and the newest bundled.
K8S_VERSIONS = ["1.29.0", kv_utils.latest_version()]

# The metric names users may rely on (docs/guide.md, "Admin endpoints and metrics").
PUBLIC_METRICS = {
    "spillway_requests_total",
    "spillway_request_duration_seconds",
    "spillway_stage_duration_seconds",
    "spillway_in_flight",
    "spillway_concurrency_limit",
    "spillway_queue_depth",
    "spillway_queue_depth_peak",
    "spillway_queue_capacity",
    "spillway_queue_wait_seconds",
    "spillway_rejections_total",
    "spillway_timeouts_total",
    "spillway_retries_total",
    "spillway_retry_budget_exhausted_total",
    "spillway_upstream_requests_total",
    "spillway_circuit_state",
    "spillway_circuit_transitions_total",
    "spillway_connections",
    "spillway_config_reloads_total",
    "spillway_config_generation",
    "spillway_config_last_reload_success",
}

# Every optional object switched on, and the non-default code paths.
ALL_ON: dict[str, Any] = {
    "proxy": {"restartOnConfigChange": True},
    "app": {"preStop": {"enabled": True}},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}},
    "podDisruptionBudget": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
    "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Spillway"}},
}
PLAIN: dict[str, Any] = {"proxy": {"nativeSidecar": False}}
ALL_ON_PLAIN = {**ALL_ON, "proxy": {"restartOnConfigChange": True, "nativeSidecar": False},
                "app": {"preStop": {"enabled": True, "method": "exec"}}}

VARIANTS = {
    "defaults": {},
    "all-on": ALL_ON,
    "plain-container": PLAIN,
    "all-on-plain-container": ALL_ON_PLAIN,
}

# Custom resources have no schema in kubernetes-validate; each has its own test.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> list[dict[str, Any]]:
    """Renders the chart as `helm template` does; returns the objects."""
    with helm.Chart.load(str(chart)) as c:
        out = c.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {})
                objects.append(doc)
    return objects


def render_error(values: dict[str, Any]) -> str:
    """Renders values that must fail; returns Helm's message."""
    with pytest.raises(helm.HelmError) as e:
        render(values)
    return str(e.value)


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def spillway_container(spec: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in spec.get("initContainers") or [] if c["name"] == "spillway"]
    found += [c for c in spec.get("containers") or [] if c["name"] == "spillway"]
    assert len(found) == 1, "exactly one spillway container"
    return found[0]


def spillway_config(objects: list[dict[str, Any]]) -> str:
    cms = [o for o in objects if o["kind"] == "ConfigMap" and "spillway.yaml" in o.get("data", {})]
    assert len(cms) == 1, "one ConfigMap carries spillway.yaml"
    return cms[0]["data"]["spillway.yaml"]


def spillway_bin() -> Path:
    path = Path(os.environ.get("SPILLWAY_BIN", ROOT / "target" / "debug" / "spillway"))
    if not path.is_file():
        pytest.fail(f"{path} not found: build it first with `cargo build --locked --bin spillway` "
                    "(or set SPILLWAY_BIN)")
    return path


def spillway_check(config_text: str, tmp_path: Path, name: str = "spillway.yaml") -> str:
    f = tmp_path / name
    f.write_text(config_text)
    r = subprocess.run([str(spillway_bin()), "check", "--config", str(f)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"spillway check rejected the rendered config:\n{r.stderr}\n--- config ---\n{config_text}"
    return r.stdout


def k8s_validate(objects: list[dict[str, Any]], version: str) -> None:
    errors = []
    for o in objects:
        if (o["apiVersion"], o["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{o['kind']}/{o['metadata'].get('name')}: {path}: {e.message}")
        except kv_utils.SchemaNotFoundError as e:
            errors.append(f"{o['kind']}/{o['metadata'].get('name')}: {e.message}")
    assert not errors, f"invalid against Kubernetes {version} (strict):\n" + "\n".join(errors)


def merge(*dicts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
    return out


def parent_chart(tmp_path: Path) -> Path:
    """The example parent chart with this chart vendored as its dependency."""
    dst = tmp_path / "shop"
    shutil.copytree(PARENT, dst)
    shutil.copytree(CHART, dst / "charts" / "spillway")
    return dst


# ---------------------------------------------------------------------------
# lint and schema
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kube", ["v1.29.0", "v1.35.0"])
def test_lint_strict(variant: str, kube: str) -> None:
    report = helm.lint(str(CHART), VARIANTS[variant], strict=True, kube_version=kube)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], json.dumps(report, indent=2)


def test_native_sidecar_refused_before_kubernetes_1_29(tmp_path: Path) -> None:
    # Offline rendering cannot choose the cluster version (and lint turns
    # `fail` into a log line), so a parent chart hands the template a context
    # whose Capabilities say 1.28, as a real 1.28 API server would.
    chart = parent_chart(tmp_path)
    (chart / "templates" / "old-cluster.yaml").write_text(
        '{{- $top := dict "Release" .Release "Capabilities" '
        '(dict "KubeVersion" (dict "Version" "v1.28.3")) }}\n'
        '# {{ include "spillway.sidecar.container" (dict "top" $top "values" .Values.spillway) | sha256sum }}\n')
    with pytest.raises(helm.HelmError) as e:
        render(chart=chart)
    assert "proxy.nativeSidecar needs Kubernetes >= 1.29 (this cluster: v1.28.3)" in str(e.value)
    render({"spillway": {"proxy": {"nativeSidecar": False}}}, chart=chart)


def test_schema_accepts_defaults() -> None:
    with helm.Chart.load(str(CHART)) as c:
        assert c.schema is not None
        c.validate_schema(c.values)


@pytest.mark.parametrize("values, message", [
    ({"proxy": {"logFormat": "xml"}}, "/proxy/logFormat"),
    ({"proxy": {"nativeSidecars": True}}, "nativeSidecars"),
    ({"app": {"args": ["upstream", 8]}}, "/app/args/1"),
    ({"config": {"drain": {"grace": "5"}}}, "/config/drain/grace"),
    ({"config": {"version": 2}}, "/config/version"),
    ({"config": {"routez": []}}, "routez"),
    ({"proxy": {"ports": {"admin": 70000}}}, "/proxy/ports/admin"),
    ({"service": {"type": "Ingress"}}, "/service/type"),
])
def test_bad_values_fail_with_a_clear_message(values: dict[str, Any], message: str) -> None:
    err = render_error(values)
    assert "schema" in err and message in err, err


@pytest.mark.parametrize("values, message", [
    ({"config": {"admin": {"bind": "0.0.0.0:9000"}}}, "config.admin.bind is \"0.0.0.0:9000\" but proxy.ports.admin is 9901"),
    ({"config": {"admin": {"bind": "127.0.0.1:9901"}}}, "admin.bind is on loopback"),
    ({"config": {"listeners": [{"name": "in", "bind": "0.0.0.0:80"}]}}, "config.listeners[0].bind"),
    ({"proxy": {"terminationGracePeriodSeconds": 10}}, "would kill a draining proxy"),
    ({"podDisruptionBudget": {"enabled": True, "maxUnavailable": 1}}, "not both"),
    ({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}}, "autoscaling: set"),
])
def test_inconsistent_values_fail_with_a_clear_message(values: dict[str, Any], message: str) -> None:
    err = render_error(values)
    assert message in err, err


def test_unquoted_on_key_survives_helms_yaml_1_1() -> None:
    values = helm.values_from_yaml(
        "config:\n  version: 1\n  upstreams: {app: {endpoints: ['127.0.0.1:3000']}}\n"
        "  defaults:\n    retries: {max_attempts: 2, on: [connect]}\n"
        "  routes:\n    - name: r\n      match: {path_prefix: /}\n      upstream: app\n"
        "      retries: {max_attempts: 3, on: [connect, 503]}\n")
    assert values["config"]["routes"][0]["retries"]["true"] == ["connect", 503], "Helm's YAML 1.1"
    cfg = yaml.safe_load(spillway_config(render(values)))
    assert cfg["routes"][0]["retries"] == {"max_attempts": 3, "on": ["connect", 503]}
    assert cfg["defaults"]["retries"] == {"max_attempts": 2, "on": ["connect"]}


def test_image_tag_follows_app_version() -> None:
    with helm.Chart.load(str(CHART)) as c:
        assert c.values["proxy"]["image"]["tag"] == c.metadata["appVersion"]


# ---------------------------------------------------------------------------
# Kubernetes schemas and Spillway's own validation
# ---------------------------------------------------------------------------

def test_validation_is_strict() -> None:
    """The validator itself rejects an unknown field and a wrong type."""
    deploy = copy.deepcopy(one(render(), "Deployment"))
    deploy["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(AssertionError, match="restartPolicyy"):
        k8s_validate([deploy], K8S_VERSIONS[0])
    deploy = copy.deepcopy(one(render(), "Deployment"))
    deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "40s"
    with pytest.raises(AssertionError, match="terminationGracePeriodSeconds"):
        k8s_validate([deploy], K8S_VERSIONS[-1])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_are_valid_kubernetes(variant: str, version: str) -> None:
    k8s_validate(render(VARIANTS[variant]), version)


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_config_passes_spillway_check(variant: str, tmp_path: Path) -> None:
    out = spillway_check(spillway_config(render(VARIANTS[variant])), tmp_path)
    assert "ok" in out


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "config" / "examples").glob("*.yaml")))
def test_config_examples_pass_check_directly_and_through_the_chart(example: str, tmp_path: Path) -> None:
    text = (ROOT / "config" / "examples" / example).read_text()
    spillway_check(text, tmp_path, "direct.yaml")
    # Read as `helm -f` reads values (YAML 1.1: an unquoted `on:` is true).
    objects = render({"config": helm.values_from_yaml(text)})
    spillway_check(spillway_config(objects), tmp_path)
    k8s_validate(objects, K8S_VERSIONS[0])


# ---------------------------------------------------------------------------
# the pod: native sidecar, hardening, probes, grace period, config mount
# ---------------------------------------------------------------------------

def test_pod_spec_native_sidecar_hardened_probed() -> None:
    objects = render()
    spec = pod_spec(objects)

    # Native sidecar: an init container that restarts, started before the app.
    assert [c["name"] for c in spec["initContainers"]] == ["spillway"]
    sw = spec["initContainers"][0]
    assert sw["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["app"]

    # Hardened pod and containers.
    assert spec["automountServiceAccountToken"] is False
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec["initContainers"] + spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], c["name"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
        assert sc.get("privileged", False) is False
        for kind in ("requests", "limits"):
            assert c["resources"].get(kind), f"{c['name']} has resource {kind}"
    assert sw["resources"]["limits"]["memory"] and sw["resources"]["limits"]["cpu"]

    # Probes on the admin port: readiness /ready, liveness /live, startup /ready.
    ports = {p["name"]: p["containerPort"] for p in sw["ports"]}
    assert ports == {"spillway": 8080, "spillway-admin": 9901}
    assert sw["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "spillway-admin"}
    assert sw["livenessProbe"]["httpGet"] == {"path": "/live", "port": "spillway-admin"}
    assert sw["startupProbe"]["httpGet"] == {"path": "/ready", "port": "spillway-admin"}

    # Grace period: drain.grace 5s + drain.timeout 30s + 5 s extra.
    assert spec["terminationGracePeriodSeconds"] == 40
    assert "lifecycle" not in spec["containers"][0], "preStop is opt-in"

    # JSON logs, the mounted config, never subPath (ConfigMap updates must reach the watch).
    args = sw["args"]
    assert args[args.index("--log-format") + 1] == "json"
    assert args[args.index("--config") + 1] == "/etc/spillway/spillway.yaml"
    assert sw["volumeMounts"] == [{"name": "spillway-config", "mountPath": "/etc/spillway", "readOnly": True}]
    cm = one(objects, "ConfigMap")
    vol = next(v for v in spec["volumes"] if v["name"] == "spillway-config")
    assert vol["configMap"]["name"] == cm["metadata"]["name"]
    for c in spec["initContainers"] + spec["containers"]:
        for m in c.get("volumeMounts") or []:
            assert "subPath" not in m and "subPathExpr" not in m

    # Admin on all interfaces (probes, Prometheus); Service only on the listener.
    cfg = yaml.safe_load(spillway_config(objects))
    assert cfg["admin"]["bind"] == "0.0.0.0:9901"
    assert cfg["listeners"][0]["bind"] == "0.0.0.0:8080"
    svc = one(objects, "Service")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "spillway", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == one(objects, "Deployment")["spec"]["selector"]["matchLabels"]

    # Demo default: the app container is Spillway's image running its simulated upstream.
    app = spec["containers"][0]
    assert app["image"] == sw["image"]
    assert app["args"][:3] == ["upstream", "--bind", "127.0.0.1:3000"]
    assert cfg["upstreams"]["app"]["endpoints"] == ["127.0.0.1:3000"]

    # Hot reload by default: no checksum annotation that would restart pods.
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    assert not any(k.startswith("checksum/") for k in annotations)
    assert annotations["prometheus.io/port"] == "9901"


def test_plain_container_mode() -> None:
    spec = pod_spec(render(PLAIN))
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["app", "spillway"]
    assert "restartPolicy" not in spillway_container(spec)


@pytest.mark.parametrize("values, grace, pre_stop", [
    # Native sidecar: the app's preStop (drain.grace) runs before Spillway's drain.
    ({"app": {"preStop": {"enabled": True}}}, 5 + 5 + 30 + 5, {"sleep": {"seconds": 5}}),
    # Plain container: the app's preStop outlives Spillway's whole drain, in parallel.
    ({"proxy": {"nativeSidecar": False}, "app": {"preStop": {"enabled": True, "method": "exec"}}},
     35 + 5, {"exec": {"command": ["sleep", "35"]}}),
    ({"config": {"drain": {"grace": "1m30s", "timeout": "1500ms"}}}, 90 + 2 + 5, None),
    ({"proxy": {"terminationGracePeriodSeconds": 120}}, 120, None),
    ({"app": {"preStop": {"enabled": True, "seconds": 12}}, "proxy": {"terminationGraceExtraSeconds": 0}},
     12 + 35, {"sleep": {"seconds": 12}}),
])
def test_grace_period_and_prestop_derive_from_drain(values: dict[str, Any], grace: int,
                                                     pre_stop: dict[str, Any] | None) -> None:
    spec = pod_spec(render(values))
    assert spec["terminationGracePeriodSeconds"] == grace
    app = next(c for c in spec["containers"] if c["name"] == "app")
    assert app.get("lifecycle", {}).get("preStop") == pre_stop


def test_checksum_annotation_rolls_pods_only_when_asked() -> None:
    def checksum(values: dict[str, Any]) -> str | None:
        meta = one(render(values), "Deployment")["spec"]["template"]["metadata"]
        return (meta.get("annotations") or {}).get("checksum/spillway-config")

    on = {"proxy": {"restartOnConfigChange": True}}
    assert checksum({}) is None
    first = checksum(on)
    assert first and re.fullmatch(r"[0-9a-f]{64}", first)
    changed = merge(on, {"config": {"drain": {"grace": "7s"}}})
    assert checksum(changed) not in (None, first)


# ---------------------------------------------------------------------------
# optional objects: off by default, valid and consistent when on
# ---------------------------------------------------------------------------

def test_optional_objects_off_by_default() -> None:
    assert kinds(render()) == ["ConfigMap", "Deployment", "Service", "ServiceAccount"]


def test_optional_objects_consistent_when_on() -> None:
    objects = render(ALL_ON)
    assert kinds(objects) == sorted([
        "ConfigMap", "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
        "PodDisruptionBudget", "Service", "Service", "ServiceAccount", "ServiceMonitor"])
    deploy = one(objects, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    spec = deploy["spec"]["template"]["spec"]
    port_names = {p["name"] for c in spec["initContainers"] + spec["containers"] for p in c.get("ports", [])}

    def selects_pods(selector: dict[str, str]) -> bool:
        return all(pod_labels.get(k) == v for k, v in selector.items())

    # HPA owns the replica count.
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert "replicas" not in deploy["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deploy["metadata"]["name"]}
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}

    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and selects_pods(pdb["spec"]["selector"]["matchLabels"])

    # NetworkPolicy: only Spillway's ports are reachable; admin only from monitoring.
    np = one(objects, "NetworkPolicy")
    assert selects_pods(np["spec"]["podSelector"]["matchLabels"])
    assert np["spec"]["policyTypes"] == ["Ingress"]
    rules = {r["ports"][0]["port"]: r for r in np["spec"]["ingress"]}
    assert set(rules) == {"spillway", "spillway-admin"} and set(rules) <= port_names
    assert "from" not in rules["spillway"]
    assert rules["spillway-admin"]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]

    # ServiceMonitor -> the headless metrics Service (admin only) -> the pods.
    sm = one(objects, "ServiceMonitor")
    metrics_svc = one(objects, "Service", f"{deploy['metadata']['name']}-metrics")
    main_svc = one(objects, "Service", deploy["metadata"]["name"])
    assert [p["targetPort"] for p in main_svc["spec"]["ports"]] == ["spillway"]
    assert metrics_svc["spec"]["clusterIP"] == "None"
    assert [p["targetPort"] for p in metrics_svc["spec"]["ports"]] == ["spillway-admin"]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    sel = sm["spec"]["selector"]["matchLabels"]
    assert all(metrics_svc["metadata"]["labels"].get(k) == v for k, v in sel.items())
    assert not all(main_svc["metadata"]["labels"].get(k) == v for k, v in sel.items()), \
        "the ServiceMonitor must not select the main Service"
    assert selects_pods(metrics_svc["spec"]["selector"])
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == metrics_svc["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    assert set(sm["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings",
                             "metricRelabelings"}

    # Restart-on-change and preStop switched on too.
    assert "checksum/spillway-config" in deploy["spec"]["template"]["metadata"]["annotations"]
    assert spec["containers"][0]["lifecycle"]["preStop"] == {"sleep": {"seconds": 5}}


# ---------------------------------------------------------------------------
# Grafana dashboard
# ---------------------------------------------------------------------------

def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_configmap_and_contents() -> None:
    cm = one(render({"grafanaDashboard": {"enabled": True}}), "ConfigMap", f"{RELEASE}-spillway-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["spillway.json"])
    assert dash["uid"] and dash["title"] == "Spillway"
    assert dash == json.loads((CHART / "dashboards" / "spillway.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"

    exprs = "\n".join(dashboard_exprs(dash))
    used = set(re.findall(r"\b(spillway_[a-z_]+)", exprs))
    bases = {re.sub(r"_(bucket|sum|count)$", "", m) if m.endswith(("_bucket", "_sum", "_count")) else m
             for m in used}
    assert bases <= PUBLIC_METRICS, f"not documented metric names: {sorted(bases - PUBLIC_METRICS)}"
    code_names = set(re.findall(r'"(spillway_[a-z_]+)"', (ROOT / "src" / "metrics.rs").read_text()))
    assert bases <= code_names, f"not exported by src/metrics.rs: {sorted(bases - code_names)}"

    titles = " | ".join(p["title"] for p in dash["panels"])
    for needed in ("Request rate by route, status and reason", "In-flight vs limit",
                   "Queue depth vs capacity", "Queue wait p50 / p95 / p99", "Rejections by reason",
                   "Retries by cause and retry budget exhaustion", "Breaker state", "Config reloads"):
        assert needed in titles, needed
    for q in ("0.5", "0.95", "0.99"):
        assert re.search(rf"histogram_quantile\({q}, sum by \(route, le\) \(rate\(spillway_queue_wait_seconds_bucket",
                         exprs), q
    timeline = next(p for p in dash["panels"] if p["title"] == "Breaker state")
    assert timeline["type"] == "state-timeline"
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's `prometheus` package "
                    "(apt-get install -y --no-install-recommends prometheus)")
    dash = json.loads((CHART / "dashboards" / "spillway.json").read_text())
    # Grafana's variables, as Grafana would substitute them.
    subst = {"$__rate_interval": "1m", "$namespace": ".*", "$pod": ".*", "$route": ".*", "$upstream": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs(dash)):
        for k, v in subst.items():
            expr = expr.replace(k, v)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            inner = re.fullmatch(r"label_values\((.+), *[a-z_]+\)", var["query"]["query"])
            assert inner, var["query"]
            expr = inner.group(1)
            for k, v in subst.items():
                expr = expr.replace(k, v)
            rules.append({"record": f"dashboard:var_{var['name']}", "expr": expr})
    f = tmp_path / "dashboard-rules.yaml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------
# use from another chart (spillway.sidecar.*), as documented
# ---------------------------------------------------------------------------

def test_parent_chart_through_named_templates(tmp_path: Path) -> None:
    chart = parent_chart(tmp_path)
    report = helm.lint(str(chart), None, strict=True, kube_version="v1.29.0")
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2], report
    objects = render(chart=chart)
    # The subchart lends templates only: no workload of its own.
    assert kinds(objects) == ["ConfigMap", "Deployment", "Service"]
    for version in K8S_VERSIONS:
        k8s_validate(objects, version)
    spec = pod_spec(objects)
    sw = spec["initContainers"][0]
    assert sw["name"] == "spillway" and sw["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["shop"]
    cm = one(objects, "ConfigMap")
    assert cm["metadata"]["name"] == "shop-spillway-config"
    assert spec["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    # drain 5s + 20s, the shop's preStop 5s, 5 s extra.
    assert spec["terminationGracePeriodSeconds"] == 35
    assert spec["containers"][0]["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert one(objects, "Service")["spec"]["ports"][0]["targetPort"] == "spillway"
    cfg = yaml.safe_load(spillway_config(objects))
    assert [r["name"] for r in cfg["routes"]] == ["checkout", "catalog"]
    assert cfg["upstreams"]["app"]["endpoints"] == ["127.0.0.1:8000"]
    spillway_check(spillway_config(objects), tmp_path)

    # Plain-container mode through the same templates.
    plain = render({"spillway": {"proxy": {"nativeSidecar": False}}}, chart=chart)
    k8s_validate(plain, K8S_VERSIONS[0])
    pspec = pod_spec(plain)
    assert not pspec.get("initContainers")
    assert [c["name"] for c in pspec["containers"]] == ["shop", "spillway"]


def test_docs_show_the_tested_parent_chart() -> None:
    """docs/kubernetes.md's copy-paste example is this test's fixture, verbatim."""
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    for name in ("templates/deployment.yaml", "templates/spillway-config.yaml", "Chart.yaml", "values.yaml"):
        text = (PARENT / name).read_text().strip()
        assert text in docs, f"docs/kubernetes.md must show tests/k8s/parent-chart/{name} verbatim"
