"""Tests of `cluster`."""
