"""Process-wide logging: one format for every Tandem process (`TANDEM_LOG_LEVEL`).

Every line carries the request id and the trace id of the request it belongs to
(`[req=<id> trace=<32 hex>]`, "-" when absent), added by `observability.tracing.RequestLogFilter`
from the current context: bind the id with `observability.tracing.set_request_id`. Lines logged from
threads that did not inherit the request's context (the engine thread) show "-".
"""

from __future__ import annotations

import logging
import os

from observability.tracing import RequestLogFilter

LOG_FORMAT = ("%(asctime)s %(levelname)s %(processName)s %(name)s "
              "[req=%(request_id)s trace=%(trace_id)s]: %(message)s")


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("TANDEM_LOG_LEVEL", "INFO")).upper(),
        format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestLogFilter) for f in handler.filters):
            handler.addFilter(RequestLogFilter())
