"""Tests of `router`."""
