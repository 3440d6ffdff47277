"""Runs the real helm binary on deploy/helm/tandem: lint, template, and the rendered documents.

helm is the official v4 binary that `scripts/install_helm.sh` (run by `scripts/setup.sh`)
installs, pinned and checksummed, at `.tools/bin/helm`; no Kubernetes API server is needed or
reached (`helm template` renders offline; `lookup` then finds nothing).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tandem"
HELM = REPO / ".tools" / "bin" / "helm"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "t"
NAMESPACE = "serving"


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str


def helm(*args: str) -> Run:
    """`helm ARGS`; fails the test with the way to install helm when it is missing."""
    assert HELM.is_file(), f"{HELM} is missing: run `bash scripts/install_helm.sh`"
    done = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120,
                          check=False)
    # helm logs each symbolic link it follows (files/ links to deploy/); not a problem
    stderr = "\n".join(line for line in done.stderr.splitlines()
                       if "found symbolic link in path" not in line)
    return Run(done.returncode, done.stdout, stderr)


def template_args(values: list[Path] | None = None, sets: list[str] | None = None) -> list[str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for path in values or []:
        args += ["-f", str(path)]
    for item in sets or []:
        args += ["--set", item]
    return args


def render(values: list[Path] | None = None, sets: list[str] | None = None) -> list[dict[str, Any]]:
    """The documents `helm template` renders (empty documents dropped); fails on an error."""
    run = helm(*template_args(values, sets))
    assert run.returncode == 0, run.stderr
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


def refused(values: list[Path] | None = None, sets: list[str] | None = None) -> str:
    """helm's error for values the chart must refuse (fails if it renders)."""
    run = helm(*template_args(values, sets))
    assert run.returncode != 0, f"rendered, but should have been refused: {sets or values}"
    return run.stderr


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container_env(deployment: dict[str, Any]) -> dict[str, str]:
    """The first container's variables as Kubernetes would give them: `$(VAR)` references to
    earlier variables expanded, values from the API (pod IP, name, namespace, Secrets) replaced
    by stand-ins."""
    stand_ins = {"status.podIP": "10.1.2.3", "metadata.name": "pod-0",
                 "metadata.namespace": NAMESPACE}
    env: dict[str, str] = {}
    for var in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]),
                                      var["value"])
        elif "fieldRef" in var["valueFrom"]:
            env[var["name"]] = stand_ins[var["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[var["name"]] = "secret-" + var["valueFrom"]["secretKeyRef"]["key"]
    return env


def chart_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values
