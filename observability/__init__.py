"""Tracing, metrics, the dashboard generator and logging set-up: what every Tandem process
uses to be observed."""
