"""The chart renders valid Kubernetes: `helm lint --strict` and `helm template` with the default
values and each values file of deploy/helm/tandem/ci/, every document validated strictly (no
unknown field) against the Kubernetes schemas that `kubernetes-validate` ships, offline, for the
oldest and newest Kubernetes the chart supports; the ServiceMonitor and PrometheusRule against
the Prometheus Operator CRDs committed in tests/deploy/schemas/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.chart import CHART, CI_VALUES, helm, render

CRDS = Path(__file__).parent / "schemas" / "prometheus-operator"
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")  # Chart.yaml's kubeVersion floor, and the newest
OPERATOR_KINDS = {"ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
                  "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}
CASES = [None, *CI_VALUES]


def case_id(path: Path | None) -> str:
    return "defaults" if path is None else path.stem


def crd_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / OPERATOR_KINDS[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as `kubectl apply --validate=strict` does
    (the API server would silently prune them); objects that declare no properties, or keep
    unknown fields, stay open."""
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """Where `doc` breaks its CRD's schema. Not `jsonschema.validate`: that first checks the
    schema itself, and the CRDs hold Go regular expressions (`^(?i)(abort|warn)?$`) that
    Python's `re` refuses; they are only compiled where a document has the field."""
    validator = jsonschema.Draft7Validator(strict(crd_schema(doc["kind"])))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("values", CASES, ids=case_id)
def test_helm_lint_strict(values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    run = helm(*args)
    assert run.returncode == 0 and "0 chart(s) failed" in run.stdout, run.stdout + run.stderr
    assert "[WARNING]" not in run.stdout and "[ERROR]" not in run.stdout, run.stdout


@pytest.mark.parametrize("values", CASES, ids=case_id)
def test_rendered_manifests_are_valid_kubernetes(values: Path | None) -> None:
    docs = render([values] if values else None)
    checked = 0
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in OPERATOR_KINDS:
            assert crd_errors(doc) == [], where
            checked += 1
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{where} (Kubernetes {version}): {error.message} "
                            f"at {'.'.join(map(str, error.path))}")
        checked += 1
    assert checked == len(docs) >= 8


def test_the_ci_values_cover_the_issue() -> None:
    """External Redis, Kubernetes discovery, GPU workers with autoscaling, as the issue asks."""
    assert {p.stem for p in CI_VALUES} >= {"external-redis-values",
                                          "kubernetes-discovery-values",
                                          "gpu-autoscaling-values"}


def test_crd_schemas_catch_a_bad_servicemonitor() -> None:
    """The CRD check has teeth: a misspelt endpoint field and a wrong type are refused."""
    docs = render(sets=["monitoring.serviceMonitor.enabled=true"])
    (monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert crd_errors(monitor) == []
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert any("intervall" in e for e in crd_errors(monitor))
    del monitor["spec"]["endpoints"][0]["intervall"]
    monitor["spec"]["endpoints"][0]["port"] = 9090
    assert crd_errors(monitor) == ["spec.endpoints.0.port: 9090 is not of type 'string'"]


def test_kubernetes_validate_catches_an_unknown_field() -> None:
    (deployment, *_) = [d for d in render() if d["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_packaged_chart_carries_the_linked_files(tmp_path: Path) -> None:
    """`helm package` stores the contents of files/'s links, so a chart installed from the
    archive (away from this repository) still has the alerts and the dashboard."""
    run = helm("package", str(CHART), "--destination", str(tmp_path))
    assert run.returncode == 0, run.stderr
    (archive,) = tmp_path.glob("tandem-0.1.0.tgz")
    rendered = helm("template", "t", str(archive),
                    "--set", "monitoring.prometheusRule.enabled=true",
                    "--set", "monitoring.grafanaDashboard.enabled=true")
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    kinds = {d["kind"]: d for d in docs}
    assert kinds["PrometheusRule"]["spec"]["groups"]
    assert kinds["ConfigMap"]["data"]["tandem-dashboard.json"].startswith("{")
