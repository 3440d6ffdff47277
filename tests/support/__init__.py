"""Test harnesses that are not part of the product (an OTLP receiver, a Prometheus launcher,
the chaos soak: `python -m tests.support.soak`), and their own tests."""
