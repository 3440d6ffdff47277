"""Test harnesses that are not part of the product (an OTLP receiver, a Prometheus launcher),
and their own tests."""
