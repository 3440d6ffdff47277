"""The import rules of docs/architecture.md, checked in fresh interpreters.

- the router never loads torch or kv_transfer (nor the workers);
- openai_api/ (the router's HTTP front) loads no torch, no kv_transfer, no worker, no CLI;
- engine/ loads no network code, no protobuf, no other Tandem package;
- kv_transfer/ knows no roles: no workers, no router, no cluster plumbing;
- the two workers never import each other;
- observability/ and index/ load no torch and no service;
- cluster/ is plumbing: it imports none of the services that use it, nor the CLI;
- the block hash and tokenizer (shared with the router) load no torch;
- loadtest/ (the load harness) loads no torch and no service; no service loads it.
- discovery/ (how the router finds workers) loads no torch, no service, no CLI;
- planner/ (`tandem scale`) knows the router only through its proto: no router, no worker,
  no torch, no CLI, no Redis.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

SERVICES = {"router", "prefill_worker", "decode_worker"}


def loaded_after(imports: list[str]) -> set[str]:
    code = ("import sys\n" + "".join(f"import {m}\n" for m in imports)
            + "print('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


@pytest.mark.parametrize(("imports", "forbidden"), [
    (["router.__main__"],
     {"torch", "kv_transfer", "cli", "prefill_worker", "decode_worker", "loadtest"}),
    (["router.bench"], {"torch", "kv_transfer", "prefill_worker", "decode_worker"}),
    (["openai_api.app", "openai_api.server"],
     {"torch", "kv_transfer", "cli", "prefill_worker", "decode_worker"}),
    (["engine.engine", "engine.engine_loop", "engine.bench.__main__"],
     {"grpc", "google", "redis", "kv_transfer", "cluster", "observability", "index", "cli",
      "tandem_proto", *SERVICES}),
    (["kv_transfer", "kv_transfer.bench"], {"cluster", "index", "cli", *SERVICES}),
    (["prefill_worker.__main__"], {"decode_worker", "router", "cli", "loadtest"}),
    (["decode_worker.__main__"], {"prefill_worker", "router", "cli", "loadtest"}),
    (["observability.tracing", "observability.metrics", "observability.metrics_worker",
      "observability.dashboard", "observability.logging_setup", "observability.http_tracing"],
     {"torch", "engine", "kv_transfer", "cluster", "index", "cli", *SERVICES}),
    (["index.prefix_index", "index.prefix_tail", "index.registry"],
     {"torch", "kv_transfer", "cli", *SERVICES}),
    (["cluster.grpc_server", "cluster.worker_runtime", "cluster.convert"], {"cli", *SERVICES}),
    (["engine.block_hash", "engine.tokenizer", "engine.sampling", "engine.model_config"],
     {"torch"}),
    (["loadtest.__main__", "loadtest.session", "loadtest.compare",
      "loadtest.targets.tandem_grpc", "loadtest.targets.openai_http"],
     {"torch", "kv_transfer", "index", *SERVICES}),
    (["discovery.base", "discovery.kubernetes", "discovery.pods"],
     {"torch", "engine", "kv_transfer", "cli", "openai_api", "planner", *SERVICES}),
    (["planner.__main__"],
     {"torch", "engine", "kv_transfer", "cli", "index", "redis", "discovery", "openai_api",
      *SERVICES}),
])
def test_import_rules(imports: list[str], forbidden: set[str]) -> None:
    assert not loaded_after(imports) & forbidden
