"""Tests of `proto/` and the generated `tandem_proto` package."""
