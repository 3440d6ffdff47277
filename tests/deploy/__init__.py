"""Tests of `deploy/` (dashboards, alert rules) against real Prometheus tools."""
