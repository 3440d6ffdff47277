"""Shared plumbing for the cluster's processes."""
