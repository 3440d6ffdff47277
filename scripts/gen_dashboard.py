"""Writes the Grafana dashboard, built by `observability/dashboard.py`, to deploy/grafana/.

    python3 scripts/gen_dashboard.py             # rewrite deploy/grafana/tandem-dashboard.json
    python3 scripts/gen_dashboard.py --check     # exit 1 if the checked-in file is stale
    python3 scripts/gen_dashboard.py --out FILE  # write elsewhere
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from observability.dashboard import render  # noqa: E402

DASHBOARD = REPO / "deploy" / "grafana" / "tandem-dashboard.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DASHBOARD)
    parser.add_argument("--check", action="store_true",
                        help="compare with the file instead of writing it")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python3 scripts/gen_dashboard.py", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
