"""`tandem scale`: a small planner that sets the prefill and decode replica counts from the
router's own load figures (`decide.py`, pure), read from the router (`read.py`) and applied to
the Deployments' scale subresource (`scale.py`); `loop.py` runs it, `__main__.py` is the
process. Off unless started."""
