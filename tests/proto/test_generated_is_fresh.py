"""The checked-in `tandem_proto/` must be exactly what scripts/gen_proto.py makes from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    fresh = _tree(tmp_path / "tandem_proto")
    checked_in = _tree(REPO / "tandem_proto")
    assert fresh, "the generator wrote nothing"
    assert sorted(checked_in) == sorted(fresh), "files differ: run python3 scripts/gen_proto.py"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale generated files {stale}: run python3 scripts/gen_proto.py"


def test_generated_code_imports_under_tandem_proto() -> None:
    from tandem_proto.tandem.v1 import (
        decode_pb2_grpc,
        prefill_pb2_grpc,
        router_pb2,
        router_pb2_grpc,
    )

    request = router_pb2.GenerateRequest(token_ids=[1, 2, 3])
    assert list(request.token_ids) == [1, 2, 3] and request.text == ""
    assert router_pb2.DESCRIPTOR.name == "tandem/v1/router.proto"
    for module in (router_pb2_grpc, prefill_pb2_grpc, decode_pb2_grpc):
        assert module.__name__.startswith("tandem_proto.tandem.v1.")
