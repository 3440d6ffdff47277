"""The load-test harness: workloads, arrivals, targets, a bounded runner, summaries, reports,
plots and comparisons (`python -m loadtest` / `tandem bench`; see loadtest/README.md).

Nothing in the serving path imports this package.
"""
