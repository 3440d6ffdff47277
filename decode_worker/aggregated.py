"""`python -m decode_worker.aggregated --model DIR ...` (also `tandem aggregated ...`): one
aggregated worker, which prefills and decodes its own requests.

It is the decode worker under another role: the router never pairs it with a prefill worker,
and opens its Decode stream without a first token, so every prompt is prefilled here (the
decode worker's local prefill) and no KV is transferred. It registers with the same router and
is routed by the same policies as the pair it replaces (router/policies.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.roles import Role
from cluster.worker_main import run_worker
from decode_worker.__main__ import serve


def main(argv: Sequence[str] | None = None) -> None:
    run_worker(Role.AGGREGATED, serve, argv, __doc__)


if __name__ == "__main__":
    main()
