"""The import rules of ARCHITECTURE.md, checked in fresh interpreters.

- the router never loads torch or kv_transfer (nor the workers);
- engine/ loads no network code, no protobuf, no other Tandem package;
- kv_transfer/ knows no roles: no workers, no router;
- the two workers never import each other;
- the block hash and tokenizer (shared with the router) load no torch.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

TANDEM = ("engine", "kv_transfer", "cluster", "router", "prefill_worker", "decode_worker",
          "tandem_proto")


def loaded_after(imports: list[str]) -> set[str]:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in imports)
            + "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


@pytest.mark.parametrize(("imports", "forbidden"), [
    (["router.__main__", "router.bench"], {"torch", "kv_transfer", "prefill_worker",
                                           "decode_worker"}),
    (["engine.engine", "engine.engine_loop", "engine.bench.__main__"],
     {"grpc", "google", "redis", "kv_transfer", "cluster", "router", "prefill_worker",
      "decode_worker", "tandem_proto"}),
    (["kv_transfer", "kv_transfer.bench"], {"router", "prefill_worker", "decode_worker",
                                            "cluster"}),
    (["prefill_worker.__main__"], {"decode_worker", "router"}),
    (["decode_worker.__main__"], {"prefill_worker", "router"}),
    (["engine.block_hash", "engine.tokenizer", "engine.sampling", "engine.model_config"],
     {"torch"}),
])
def test_import_rules(imports: list[str], forbidden: set[str]) -> None:
    assert not loaded_after(imports) & forbidden
