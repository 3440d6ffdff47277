"""publish_cpu.py runs the real writer against a private redis-server and reports per flush."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[3] / "loadtest" / "scripts" / "publish_cpu.py"


def test_it_reports_cpu_and_wall_time_per_flush() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--flushes", "20", "--blocks", "2"],
                          capture_output=True, text=True, timeout=120, check=True)
    match = re.fullmatch(r"20 flushes of 2 stored \+ 2 evicted blocks: ([\d.]+) ms CPU, "
                         r"([\d.]+) ms wall per flush\n", done.stdout)
    assert match is not None, done.stdout + done.stderr
    assert float(match[1]) > 0 and float(match[2]) > 0
