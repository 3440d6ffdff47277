"""Plumbing every cluster process shares: gRPC server and error mapping, protobuf conversions,
the worker runtime and configuration."""
