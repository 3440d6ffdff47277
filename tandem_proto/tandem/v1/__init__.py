"""Generated code of proto package `tandem.v1` (Router, Prefill, Decode, Worker)."""
