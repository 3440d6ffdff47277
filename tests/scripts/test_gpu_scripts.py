"""scripts/setup.sh's arguments (--help, --dry-run with --cuda: nothing installed) and
scripts/gpu_check.sh failing at once, before installing anything, on a machine without a GPU
(here: a PATH where nvidia-smi is absent or lists no GPU)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bash(script: str, *args: str, env: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], capture_output=True,
                          text=True, timeout=60, env=env)


def test_setup_help_and_dry_run_install_nothing() -> None:
    helped = bash("setup.sh", "--help")
    assert helped.returncode == 0 and "--cuda" in helped.stdout and "--dry-run" in helped.stdout
    dry = bash("setup.sh", "--cuda", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    lines = [line for line in dry.stdout.splitlines() if line.startswith("would run:")]
    assert lines[0] == ("would run: python3 -m pip install -q torch==2.13.0 --index-url "
                        "https://download.pytorch.org/whl/cu128")
    assert all(line.startswith("would") for line in dry.stdout.splitlines())
    cpu = bash("setup.sh", "--dry-run")
    assert "would run: python3 -m pip install -q torch==2.13.0\n" in cpu.stdout
    bad = bash("setup.sh", "--cdua")
    assert bad.returncode == 2 and "unknown argument --cdua" in bad.stderr


@pytest.mark.parametrize("nvidia_smi", [None, "echo 'No devices were found'"])
def test_gpu_check_without_a_gpu_fails_at_once(tmp_path: Path, nvidia_smi: str | None) -> None:
    """No nvidia-smi, or one that lists no GPU: exit 1 naming the cause, no step run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "grep", "dirname", "mktemp", "date", "timeout"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    if nvidia_smi is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!{shutil.which('bash')}\n{nvidia_smi}\n")
        fake.chmod(0o755)
    env = {**os.environ, "PATH": str(bin_dir), "TANDEM_GPU_CHECK_LOGS": str(tmp_path / "logs")}
    started = time.monotonic()
    result = bash("gpu_check.sh", env=env)
    assert time.monotonic() - started < 10
    assert result.returncode == 1
    assert "gpu_check: no NVIDIA GPU on this machine" in result.stderr
    assert "nothing was installed or run" in result.stderr
    assert result.stdout == "" and not (tmp_path / "logs").exists()


def test_gpu_check_help_and_bad_arguments() -> None:
    helped = bash("gpu_check.sh", "--help")
    assert helped.returncode == 0 and "TANDEM_TEST_DEVICE=cuda" in helped.stdout
    assert bash("gpu_check.sh", "--bogus").returncode == 2


def test_gpu_check_keeps_to_its_budget(tmp_path: Path) -> None:
    """With a GPU listed and every step taking 3 s, a 4 s budget lets the first step pass, cuts
    the next one's timeout to what is left, skips the rest, and still prints one summary."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sed", "grep", "dirname", "mktemp", "date", "timeout", "sleep", "tail",
                 "tr", "mkdir"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    for name, body in (("nvidia-smi", "echo 'GPU 0: Fake (UUID: GPU-0)'"),
                       ("python3", "sleep 3; echo '1 passed'")):
        (bin_dir / name).write_text(f"#!{shutil.which('bash')}\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": str(bin_dir), "TANDEM_GPU_CHECK_LOGS": str(tmp_path / "logs"),
           "TANDEM_GPU_CHECK_BUDGET_S": "4"}
    started = time.monotonic()
    result = bash("gpu_check.sh", "--no-setup", env=env)
    assert time.monotonic() - started < 15
    assert result.returncode == 1, result.stderr
    summary = result.stdout.split("gpu_check summary")[1].splitlines()[1:]
    steps = [line.split()[:2] for line in summary]
    assert steps[0] == ["PASS", "cuda"] and summary[0].endswith("1 passed ")
    assert steps[1] in (["FAIL", "kernels"], ["SKIP", "kernels"])  # 0 or 1 s were left
    assert steps[2:] == [["SKIP", "engine"], ["SKIP", "kv"], ["SKIP", "bench"]]
