"""A process tree that keeps the CPU busy, for the bench's fairness tests: `python -m
tests.support.busy_tree` spins, starts a spinning child of its own, prints `ready <child pid>`
and spins until killed (`--idle`: both sleep instead of spinning)."""

from __future__ import annotations

import subprocess
import sys
import time


def spin(idle: bool) -> None:
    while True:
        if idle:
            time.sleep(1.0)


def main() -> None:
    idle = "--idle" in sys.argv
    if "--child" in sys.argv:
        spin(idle)
    child = subprocess.Popen([sys.executable, "-m", "tests.support.busy_tree", "--child",
                              *(["--idle"] if idle else [])])
    print(f"ready {child.pid}", flush=True)
    spin(idle)


if __name__ == "__main__":
    main()
